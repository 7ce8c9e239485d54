"""`lowbit eval` over several candidates into one folder, resumable: the reference is recorded once
(`DIR/reference.safetensors`, unless a record is given), each candidate's results are written as they finish
(`DIR/<candidate>.json`, atomically), and a rerun of the same command keeps every candidate whose results were made
with the same settings from the same files — a run killed on the fifth candidate does the fifth again, not the
first four. `DIR/report.html` compares them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.eval.report import comparison_report, write_text
from lowbit.eval.runner import EvalConfig, evaluate, write_json
from lowbit.model.sources import is_served, resolve

RECORD = "reference.safetensors"
REPORT = "report.html"
# settings that change no number: where the output goes, whether bars show
_UNCOUNTED = ("candidate", "progress", "save_reference", "served")


def candidate_identity(name: str) -> str:
    """What a candidate is, cheaply: a lowbit checkpoint's header (it hashes every file), else the names, sizes and
    modification times of its files; a served model's spec."""
    if is_served(name):
        return name
    source = resolve(name)
    if source.kind == "builtin":
        return source.name
    if source.kind == "lowbit":
        return hashlib.sha256((source.path / "lowbit.json").read_bytes()).hexdigest()
    files = sorted(source.path.iterdir()) if source.path.is_dir() else [source.path]
    return hashlib.sha256(json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files
                                      if p.is_file()]).encode()).hexdigest()


def settings_key(cfg: EvalConfig, candidate: str, record: Path) -> str:
    """The hash of everything a candidate's numbers depend on: the settings, the record, the candidate's files."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _UNCOUNTED}
    settings["served_top_k"] = cfg.served.top_k
    parts = [json.dumps(settings, sort_keys=True, default=str), candidate_identity(candidate),
             hashlib.sha256(record.read_bytes()).hexdigest() if record.is_file() else ""]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def result_name(candidate: str, taken: set[str]) -> str:
    """A file name for a candidate's results: its last path component, made unique."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", candidate.rstrip("/").split("#")[-1].split("/")[-1]) or "candidate"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name + ".json"


def evaluate_many(cfg: EvalConfig, candidates: list[str], out: str | Path) -> list[tuple[str, dict]]:
    """Evaluate each candidate against one reference record into `out`, keeping what an earlier run finished."""
    if len(set(candidates)) != len(candidates):
        raise LowbitError("a candidate is given twice; give each once.")
    if cfg.save_reference:
        raise LowbitError("with several candidates and --out, the reference record is kept in the output folder "
                          f"({RECORD}); drop --save-reference.")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise LowbitError(f"--out {str(out)!r} exists and is not a folder; choose another.")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.reference_record:
        record = Path(cfg.reference_record)
    else:
        record = out / RECORD
        if not record.is_file() and (cfg.kl or cfg.ppl or cfg.tasks):  # --kl-text records nothing
            _say(f"recording the reference once, in {record}")
            evaluate(dataclasses.replace(cfg, candidate=None, kl_text=(), save_reference=str(record)))
        if record.is_file():
            cfg = dataclasses.replace(cfg, reference_record=str(record))
    runs, taken = [], set()
    for i, candidate in enumerate(candidates, 1):
        path = out / result_name(candidate, taken)
        key = settings_key(cfg, candidate, record)
        done = _read(path)
        if done is not None and done.get("settings_key") == key:
            _say(f"[{i}/{len(candidates)}] {candidate}: done before, kept ({path.name})")
            runs.append((candidate, done))
            continue
        _say(f"[{i}/{len(candidates)}] {candidate}")
        result = {**evaluate(dataclasses.replace(cfg, candidate=candidate)), "settings_key": key}
        write_json(result, path)
        runs.append((candidate, result))
    write_text(comparison_report(runs), out / REPORT)
    return runs


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _say(text: str) -> None:
    print(f"lowbit: {text}", file=sys.stderr, flush=True)


def summary_lines(runs: list[tuple[str, dict]]) -> list[str]:
    """One line per candidate: mean KL with its interval, token rejection, perplexities."""
    lines = []
    for name, r in runs:
        kl = (r.get("kl") or {}).get("all") or {}
        parts = [f"{name}:"]
        if kl:
            lo, hi = kl.get("ci95") or (None, None)
            parts.append(f"KL {kl['mean']:.4f}" + (f" [{lo:.4f}, {hi:.4f}]" if lo is not None else "")
                         + f", token rejection {kl.get('token_rejection_rate', 0):.3f}")
        for dataset, p in (r.get("ppl") or {}).items():
            if p.get("candidate") is not None:
                parts.append(f"ppl {dataset} {p['candidate']:.3f} (reference {p['reference']:.3f})")
        lines.append("  ".join(parts))
    return lines
