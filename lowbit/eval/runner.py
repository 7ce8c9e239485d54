"""`lowbit eval`: load the models, reuse what the reference record already holds, run what was asked, report.

The reference is a model, a saved record, or both (the record saves the reference's generation and predictions;
the model adds the exact full-vocabulary KL). The candidate can also be a served model (`openai+http://…/v1#MODEL`):
it is teacher-forced on the record through its API (lowbit.eval.served), which needs a local tokenizer. So can the
reference (--kl only, with --tokenizer): it generates and is teacher-forced through its API, and its record holds the
top-k the server returns, with holes where it returns none (lowbit.eval.served_reference); a local or a served
candidate is compared with it on the positions it holds.
Whatever the reference computes — its top-N predictions, its perplexity NLLs, its task correctness — is cached in
the record, so `--save-reference` once and `--reference-record` afterwards never recompute the reference for another
candidate.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.eval import perplexity as ppl_mod
from lowbit.eval import tasks as tasks_mod
from lowbit.eval.divergence import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TOP_N,
    compare,
    compare_answers,
    make_record,
    reference_returned,
    summarize_divergence,
    text_record,
    worst_prompts,
)
from lowbit.eval.endpoint import Endpoint, parse_endpoint
from lowbit.eval.forward import DEFAULT_BATCH_TOKENS
from lowbit.eval.prompts import load_prompts, prompt_starts
from lowbit.eval.record import ReferenceRecord, tokenizer_fingerprint
from lowbit.eval.served import ServedOptions, api_key, teacher_force
from lowbit.eval.served_reference import SERVED_REFERENCE_DEFINITION, served_record
from lowbit.hardware import resolve_device
from lowbit.io.foreign import READABLE
from lowbit.model.architectures import text_config
from lowbit.model.loading import load, load_tokenizer
from lowbit.model.sources import is_served, resolve

SERVED_DEFINITION = ("per position, the served model's top-k log-probs (and its log-prob of the next token) through "
                     "the completions API with echo; KL over the reference's top-N ids that came back, both "
                     "distributions renormalized over them; rejection: the most likely id the server returned differs "
                     "from the reference's top-1; dp from the server's log-prob of the next token. Positions the "
                     "server does not return, or where none of the reference's top-N came back, are left out.")


@dataclass(frozen=True)
class EvalConfig:
    reference: str | torch.nn.Module | None = None  # a model lowbit loads, or one in memory (Python callers)
    candidate: str | torch.nn.Module | None = None
    kl: bool = False
    kl_text: tuple[str, ...] = ()
    ppl: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    prompts: str | None = None
    max_prompts: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    top_n: int = DEFAULT_TOP_N
    save_reference: str | None = None
    reference_record: str | None = None
    record_dtype: str = "float32"
    seqlen: int = ppl_mod.DEFAULT_SEQLEN
    max_windows: int | None = None
    limit: int | None = None
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    tokenizer: str | None = None  # a local model whose tokenizer a served candidate or reference uses
    served: ServedOptions = dataclasses.field(default_factory=ServedOptions)


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the block to timings[key]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _context_length(model) -> int:
    return int(getattr(text_config(model), "max_position_embeddings", 2048) or 2048)


def _size(name: str) -> dict | None:
    """What the candidate takes on disk; bits per weight where the format says (lowbit checkpoints)."""
    source = resolve(name)
    if source.kind == "lowbit":
        from lowbit.io.checkpoint import read_header

        header = read_header(source.path)
        return {"bits_per_weight": header.get("bits_per_weight"), "bytes": header.get("bytes_on_disk"),
                "bytes_16bit": (header.get("size") or {}).get("bytes_16bit"),
                **{k: header.get(k) for k in ("method", "scheme", "recipe", "calibration", "allocation",
                                              "lowbit_version")}}  # lowbit_version: the one that quantized it
    if source.kind == "gguf":
        return {"bits_per_weight": None, "bytes": source.path.stat().st_size}
    if source.kind in ("hf", *READABLE):
        return {"bits_per_weight": None, "bytes": sum(p.stat().st_size for p in source.path.glob("*.safetensors")),
                **({"format": source.kind} if source.kind != "hf" else {})}
    return None


def _in_memory(cfg: EvalConfig) -> tuple[EvalConfig, dict[str, torch.nn.Module]]:
    """The models given in memory, set aside, and the config with a name in their place (for the JSON). Such a model
    is used where it is (its device must be `cfg.device`'s), and its tokenizer is read from where it was loaded
    (its config's name_or_path) unless `cfg.tokenizer` names one."""
    given = {role: m for role in ("reference", "candidate")
             if isinstance(m := getattr(cfg, role), torch.nn.Module)}
    if not given:
        return cfg, {}
    device = resolve_device(cfg.device)
    for role, model in given.items():
        where = next(model.parameters()).device
        if where.type != device.type:
            raise LowbitError(f"the {role} model is on {where} but the evaluation runs on {device}: move the model "
                              f"(model.to(...)) or pass device={str(where)!r}.")
    origins = {role: str(getattr(m, "name_or_path", "") or "") for role, m in given.items()}
    names = {role: f"{role} in memory" + (f" (loaded from {origins[role]})" if origins[role] else "")
             for role in given}
    tokenizer = cfg.tokenizer
    if tokenizer is None and "reference" in given:
        tokenizer = next((o for o in (origins["reference"], origins.get("candidate", "")) if _loadable(o)), None) \
            or (cfg.candidate if isinstance(cfg.candidate, (str, Path)) else None)
        if tokenizer is None:
            raise LowbitError("the reference model in memory does not say where it was loaded from, so its tokenizer "
                              "is unknown: give tokenizer=PATH (a model directory or built-in name with its "
                              "tokenizer).")
    return dataclasses.replace(cfg, **names, tokenizer=tokenizer), given


def _loadable(name: str) -> bool:
    if not name:
        return False
    try:
        resolve(name)
        return True
    except LowbitError:
        return False


def _size_in_memory(model: torch.nn.Module) -> dict:
    """A candidate in memory: its bits per weight and the bytes a checkpoint of it would take (nothing on disk)."""
    from lowbit.api import size_report

    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = torch.bfloat16 if torch.bfloat16 in floats else torch.float16
    sizes = size_report(model, dtype)
    return {"bits_per_weight": sizes["bits_per_weight"], "bytes": None, "bytes_predicted": sizes["bytes_predicted"],
            "bytes_16bit": sizes["bytes_16bit"], "in_memory": True}


def _check_vocab(reference_vocab: int, candidate, exact: bool = True) -> None:
    """The candidate's vocabulary is the reference's (`exact`), or at least covers the reference's tokenizer (a served
    reference, whose model's vocabulary size is not known here)."""
    cand_vocab = int(candidate.config.vocab_size)
    if cand_vocab != reference_vocab if exact else cand_vocab < reference_vocab:
        whose = "the reference's" if exact else "the reference's tokenizer's"
        raise LowbitError(f"the candidate's vocabulary has {cand_vocab} tokens and {whose} {reference_vocab}: "
                          f"their distributions cannot be compared token by token. Compare models that share a "
                          f"tokenizer.")


def evaluate(cfg: EvalConfig) -> dict:
    """Run the requested evaluations; returns the DESIGN.md JSON object. The reference and the candidate may be
    models already in memory (Python callers): see `_in_memory`."""
    cfg, given = _in_memory(cfg)
    if cfg.reference is None and cfg.reference_record is None:
        raise LowbitError("give a reference: --reference MODEL, --reference-record FILE, or both.")
    if not (cfg.kl or cfg.kl_text or cfg.ppl or cfg.tasks):
        raise LowbitError("nothing to evaluate: ask for at least one of --kl, --kl-text DATASETS, --ppl DATASETS, "
                          "--tasks TASKS.")
    if cfg.kl_text and (cfg.reference is None or cfg.candidate is None):
        raise LowbitError("--kl-text compares two models on a text: give both --reference MODEL and --candidate.")
    if cfg.candidate is None and cfg.save_reference is None:
        raise LowbitError("give a --candidate to compare with the reference (or --save-reference FILE to only "
                          "record the reference).")
    for task in cfg.tasks:
        if task not in tasks_mod.TASKS:
            raise LowbitError(f"unknown task {task!r}; available: {', '.join(tasks_mod.TASKS)}.")
    served_reference, served = _check_served(cfg)
    prompts = load_prompts(cfg.prompts, cfg.max_prompts) if cfg.kl else None
    record = ReferenceRecord.load(cfg.reference_record) if cfg.reference_record else None

    timings: dict[str, float] = {}
    with timed(timings, "load"):
        # on a GPU both models run in 16 bits (the candidate's quantized layers on lowbit's kernels)
        reference = given["reference"] if "reference" in given else \
            load(cfg.reference, device=cfg.device, progress=cfg.progress) \
            if cfg.reference and served_reference is None else None
        candidate = given["candidate"] if "candidate" in given else \
            load(cfg.candidate, device=cfg.device, progress=cfg.progress) if cfg.candidate and served is None else None
        tokenizer = load_tokenizer(_tokenizer_source(cfg, served, record))
    if record is not None:
        record.check_tokenizer(tokenizer, "--tokenizer" if cfg.tokenizer else
                               "reference" if cfg.reference else "candidate")
        _check_record_source(cfg, record, reference, served_reference)
    if reference is not None:
        ref_vocab = int(reference.config.vocab_size)
    else:
        ref_vocab = int(record.meta["vocab_size"]) if record is not None else len(tokenizer)
    if candidate is not None:
        sparse = served_reference is not None or (record is not None and record.meta.get("sparse"))
        _check_vocab(ref_vocab, candidate, exact=not sparse)
    if record is None:
        record = ReferenceRecord({"model": cfg.reference, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                                  "vocab_size": ref_vocab}, torch.zeros(0, dtype=torch.int32),
                                 torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.int32))

    models = Models(reference, candidate, tokenizer, served, served_reference)
    out: dict = {"reference": cfg.reference or cfg.reference_record, "candidate": cfg.candidate,
                 "lowbit_version": __version__, "date": datetime.now().astimezone().isoformat(timespec="seconds")}
    if cfg.kl:
        out["kl"], record = _divergence(cfg, record, models, prompts, timings)
        for key in ("endpoint", "reference_endpoint"):
            if out["kl"] is not None and key in out["kl"]:
                out[key] = out["kl"].pop(key)
    if cfg.kl_text:
        out["kl_text"] = {}
        for name in cfg.kl_text:
            with timed(timings, f"kl_text_{name}"):
                out["kl_text"][name] = _divergence_on_text(cfg, models, name)
    if cfg.ppl:
        out["ppl"] = {}
        for name in cfg.ppl:
            with timed(timings, f"ppl_{name}"):
                out["ppl"][name], record = _perplexity(cfg, record, models, name)
    if cfg.tasks:
        out["tasks"] = {}
        for name in cfg.tasks:
            with timed(timings, f"task_{name}"):
                out["tasks"][name], record = _task(cfg, record, models, name)
    out["size"] = _size_in_memory(candidate) if "candidate" in given else \
        _size(cfg.candidate) if cfg.candidate and served is None else None
    out["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    if cfg.save_reference:
        record.save(cfg.save_reference, getattr(torch, cfg.record_dtype))
    return out


@dataclass(frozen=True)
class Models:
    reference: torch.nn.Module | None
    candidate: torch.nn.Module | None
    tokenizer: object
    served: Endpoint | None = None  # a served candidate (then `candidate` is None)
    served_reference: Endpoint | None = None  # a served reference (then `reference` is None)


def _check_served(cfg: EvalConfig) -> tuple[Endpoint | None, Endpoint | None]:
    """The served reference and candidate, if any, after refusing what cannot be done with them (before anything
    loads)."""
    reference = _check_served_reference(cfg) if is_served(cfg.reference) else None
    candidate = None
    if is_served(cfg.candidate):
        candidate = parse_endpoint(cfg.candidate)
        if cfg.kl_text or cfg.ppl or cfg.tasks:
            raise LowbitError("a served candidate is measured by --kl only (teacher-forced log-probs through its "
                              "API); --kl-text, --ppl and --tasks need the candidate's files.")
        if not cfg.kl:
            raise LowbitError("a served candidate is measured by --kl: add --kl.")
    if reference or candidate:
        api_key(cfg.served)  # a missing key is said before anything loads
    return reference, candidate


def _check_served_reference(cfg: EvalConfig) -> Endpoint:
    endpoint = parse_endpoint(cfg.reference)
    if cfg.kl_text or cfg.ppl or cfg.tasks:
        raise LowbitError("a served reference (--reference openai+…) is measured by --kl only: its API gives the "
                          "top-k log-probs of the sequences it generates. --ppl and --tasks need the reference "
                          "model's full distribution, --kl-text its files: give a local copy of the model as "
                          "--reference MODEL for those.")
    if not cfg.kl:
        raise LowbitError("a served reference is measured by --kl: add --kl.")
    if not cfg.tokenizer:
        raise LowbitError("a served reference needs --tokenizer MODEL (a local model, .gguf or Hugging Face "
                          "directory with the served model's tokenizer): lowbit tokenizes the prompts with its chat "
                          "template, as for a local reference, and reads the server's tokens back into ids with it.")
    return endpoint


def _check_record_source(cfg: EvalConfig, record: ReferenceRecord, reference,
                         served_reference: Endpoint | None) -> None:
    """Refuse a record that another model than --reference made."""
    served = record.meta.get("served")
    if served_reference is not None:
        same = served and served.get("url") == served_reference.base_url and \
            served_reference.model in (None, served.get("model"))
        if not same:
            raise LowbitError(f"the reference record was made by {record.meta.get('model')!r}, not by --reference "
                              f"{cfg.reference!r}; drop one of them, or record again.")
    elif reference is not None and served:
        raise LowbitError(f"the reference record was made by the served model {record.meta.get('model')!r}; "
                          f"--reference {cfg.reference!r} would be a second reference. Drop --reference (the record "
                          "is the reference), or record again from the local model.")
    elif reference is not None and not record.made_by(reference):
        raise LowbitError(f"the reference record was made by another model ({record.meta.get('model')!r}) than "
                          f"--reference {cfg.reference!r}; drop one of them, or record again.")


def _tokenizer_source(cfg: EvalConfig, served: Endpoint | None, record: ReferenceRecord | None) -> str:
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.reference:
        return cfg.reference
    if served is None:
        return cfg.candidate
    named = record.meta.get("model") if record is not None else None
    if named and not is_served(named):
        try:
            resolve(named)
            return named
        except LowbitError:
            pass
    raise LowbitError("a served candidate needs the reference's tokenizer here: the record holds token ids, and the "
                      "server names tokens by text. Give --tokenizer MODEL (a local model or Hugging Face directory "
                      "with that tokenizer) or --reference MODEL.")


def _divergence(cfg: EvalConfig, record: ReferenceRecord, m: Models, prompts,
                timings: dict[str, float]) -> tuple[dict | None, ReferenceRecord]:
    """The divergence summary, and the record (with the reference's generations and predictions, when it had none)."""
    prompt_list, source = prompts
    options = dataclasses.replace(cfg.served, progress=cfg.served.progress and cfg.progress)
    reference_run = None
    if record.num_sequences == 0:
        if m.served_reference is not None:
            with timed(timings, "kl_served_reference"):
                fresh, reference_run = served_record(m.served_reference, m.tokenizer, prompt_list, source=source,
                                                     max_new_tokens=cfg.max_new_tokens, top_n=cfg.top_n,
                                                     options=options)
        elif m.reference is None:
            raise LowbitError("the reference record holds no generations; make one with --reference MODEL --kl.")
        else:
            with timed(timings, "kl_generation"):
                fresh = make_record(m.reference, m.tokenizer, prompt_list, source=source, model_name=cfg.reference,
                                    max_new_tokens=cfg.max_new_tokens, top_n=cfg.top_n, progress=cfg.progress)
        record = dataclasses.replace(fresh, extras=record.extras)
    elif cfg.max_prompts is not None and cfg.max_prompts < record.num_sequences:
        record = record.first(cfg.max_prompts)
    served_info = None
    if m.served is not None:
        if record.top_ids is None:
            with timed(timings, "kl_teacher_forcing"):
                record = compare(record, None, m.reference, cfg.batch_tokens, cfg.progress).record
        with timed(timings, "kl_served"):
            answers = teacher_force(record, m.tokenizer, m.served, options)
        d, counts = compare_answers(record, answers.answers)
        served_info = {**answers.info, **counts, "definition": SERVED_DEFINITION}
        if not len(d.prompt):
            raise LowbitError(f"the served model returned no position that can be compared ({counts}).")
    else:
        with timed(timings, "kl_teacher_forcing"):
            comparison = compare(record, m.candidate, m.reference, cfg.batch_tokens, cfg.progress)
        record, d = comparison.record, comparison.divergence
        if d is not None and not len(d.prompt):
            raise LowbitError("the reference record holds no prediction to compare with: its served reference returned "
                              "no position.")
    if d is None:
        return None, record
    summary = summarize_divergence(d, int(record.meta["top_n"]), cfg.seed)
    if served_info is not None:
        summary["endpoint"] = served_info
    if record.meta.get("served"):
        held = reference_returned(record)
        summary["reference_endpoint"] = {**record.meta["served"], "positions": len(held),
                                         "positions_not_in_reference": int((~held).sum()),
                                         "positions_compared": len(d.prompt),
                                         "definition": SERVED_REFERENCE_DEFINITION,
                                         **({"run": reference_run} if reference_run else {})}
    summary["worst"] = worst_prompts(d, record, m.tokenizer)
    summary["prompt_starts"] = prompt_starts(record, m.tokenizer)
    summary["record"] = {k: record.meta.get(k) for k in ("model", "prompts", "max_new_tokens", "num_prompts",
                                                         "truncated_prompts")}
    return summary, record


def _divergence_on_text(cfg: EvalConfig, m: Models, name: str) -> dict:
    seqlen = min(cfg.seqlen, _context_length(m.reference))
    wins = ppl_mod.windows(m.tokenizer, name, seqlen, cfg.max_windows)
    record = text_record(wins, {"top_n": cfg.top_n, "model": cfg.reference, "text": name})
    d = compare(record, m.candidate, m.reference, cfg.batch_tokens, cfg.progress).divergence
    summary = summarize_divergence(d, cfg.top_n, cfg.seed)
    summary.update(dataset=name, seqlen=seqlen, windows=int(wins.shape[0]))
    return summary


def _perplexity(cfg: EvalConfig, record: ReferenceRecord, m: Models, name: str) -> tuple[dict, ReferenceRecord]:
    ctx = _context_length(m.reference if m.reference is not None else m.candidate)
    seqlen = min(cfg.seqlen, ctx)
    wins = ppl_mod.windows(m.tokenizer, name, seqlen, cfg.max_windows)
    key = f"ppl.{name}.{seqlen}"
    cached = record.extras.get(key)
    if cached is not None and cached.shape[0] >= wins.shape[0]:
        ref_nll = cached[: wins.shape[0]]
    elif m.reference is not None:
        ref_nll = ppl_mod.token_nll(m.reference, wins, f"perplexity {name} (reference)", cfg.progress)
        record = record.with_extras(**{key: ref_nll})
    else:
        raise LowbitError(f"the reference record has no {name} perplexity at seqlen {seqlen} for {wins.shape[0]} "
                          f"windows; add --reference MODEL.")
    result = {"reference": ppl_mod.ppl(ref_nll), "candidate": None, "seqlen": seqlen, "windows": int(wins.shape[0]),
              "tokens": int(ref_nll.numel())}
    if m.candidate is not None:
        cand_nll = ppl_mod.token_nll(m.candidate, wins, f"perplexity {name} (candidate)", cfg.progress)
        result["candidate"] = ppl_mod.ppl(cand_nll)
        result.update(ppl_mod.compare_ppl(ref_nll, cand_nll))
    return result, record


def _task(cfg: EvalConfig, record: ReferenceRecord, m: Models, name: str) -> tuple[dict, ReferenceRecord]:
    items = tasks_mod.load_task(name, cfg.limit)
    max_len = _context_length(m.reference if m.reference is not None else m.candidate)
    key = f"task.{name}.{cfg.limit or 'all'}"
    if f"{key}.acc" in record.extras:
        ref_acc, ref_norm = (record.extras[f"{key}.{k}"].numpy().astype(bool) for k in ("acc", "acc_norm"))
    elif m.reference is not None:
        ref_acc, ref_norm = tasks_mod.correctness(m.reference, m.tokenizer, items, max_len, f"{name} (reference)",
                                                  cfg.progress)
        record = record.with_extras(**{f"{key}.acc": torch.from_numpy(ref_acc.astype(np.uint8)),
                                       f"{key}.acc_norm": torch.from_numpy(ref_norm.astype(np.uint8))})
    else:
        raise LowbitError(f"the reference record has no results for task {name} (limit {cfg.limit}); add "
                          f"--reference MODEL.")
    result = {"n": len(items), "reference": float(ref_acc.mean()), "reference_acc_norm": float(ref_norm.mean()),
              "candidate": None, "candidate_acc_norm": None, "flips": None}
    if m.candidate is not None:
        acc, norm = tasks_mod.correctness(m.candidate, m.tokenizer, items, max_len, f"{name} (candidate)",
                                          cfg.progress)
        result.update(candidate=float(acc.mean()), candidate_acc_norm=float(norm.mean()),
                      flips=float((acc != ref_acc).mean()), flips_acc_norm=float((norm != ref_norm).mean()))
    return result, record


def write_json(result: dict, path: str | Path) -> None:
    import json

    from lowbit.eval.report import write_text

    write_text(json.dumps(result, indent=1), path)
