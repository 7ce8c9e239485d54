"""`lowbit eval`: load the models, reuse what the reference record already holds, run what was asked, report.

The reference is a model, a saved record, or both (the record saves the reference's generation and predictions;
the model adds the exact full-vocabulary KL). Whatever the reference computes — its top-N predictions, its
perplexity NLLs, its task correctness — is cached in the record, so `--save-reference` once and
`--reference-record` afterwards never recompute the reference for another candidate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.eval import perplexity as ppl_mod
from lowbit.eval import tasks as tasks_mod
from lowbit.eval.divergence import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TOP_N,
    compare,
    make_record,
    summarize_divergence,
    text_record,
    worst_prompts,
)
from lowbit.eval.forward import DEFAULT_BATCH_TOKENS
from lowbit.eval.prompts import load_prompts
from lowbit.eval.record import ReferenceRecord, tokenizer_fingerprint
from lowbit.io.foreign import READABLE
from lowbit.model.architectures import text_config
from lowbit.model.loading import load, load_tokenizer
from lowbit.model.sources import resolve


@dataclass
class EvalConfig:
    reference: str | None = None
    candidate: str | None = None
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
    timings: dict = field(default_factory=dict)


def _context_length(model) -> int:
    return int(getattr(text_config(model), "max_position_embeddings", 2048) or 2048)


def _size(name: str) -> dict | None:
    """What the candidate takes on disk; bits per weight where the format says (lowbit checkpoints)."""
    source = resolve(name)
    if source.kind == "lowbit":
        from lowbit.io.checkpoint import read_header

        header = read_header(source.path)
        return {"bits_per_weight": header.get("bits_per_weight"), "bytes": header.get("bytes_on_disk"),
                "method": header.get("method"), "scheme": header.get("scheme")}
    if source.kind == "gguf":
        return {"bits_per_weight": None, "bytes": source.path.stat().st_size}
    if source.kind in ("hf", *READABLE):
        return {"bits_per_weight": None, "bytes": sum(p.stat().st_size for p in source.path.glob("*.safetensors")),
                **({"format": source.kind} if source.kind != "hf" else {})}
    return None


def _check_vocab(reference_vocab: int, candidate) -> None:
    cand_vocab = int(candidate.config.vocab_size)
    if cand_vocab != reference_vocab:
        raise LowbitError(f"the candidate's vocabulary has {cand_vocab} tokens and the reference's {reference_vocab}: "
                          f"their distributions cannot be compared token by token. Compare models that share a "
                          f"tokenizer.")


def evaluate(cfg: EvalConfig) -> dict:
    """Run the requested evaluations; returns the DESIGN.md JSON object."""
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
    prompts = load_prompts(cfg.prompts, cfg.max_prompts) if cfg.kl else None
    record = ReferenceRecord.load(cfg.reference_record) if cfg.reference_record else None

    t = time.perf_counter()
    # on a GPU both models run in 16 bits (the candidate's quantized layers on lowbit's kernels)
    reference = load(cfg.reference, device=cfg.device) if cfg.reference else None
    candidate = load(cfg.candidate, device=cfg.device) if cfg.candidate else None
    tokenizer = load_tokenizer(cfg.reference or cfg.candidate)
    cfg.timings["load"] = time.perf_counter() - t
    if record is not None:
        record.check_tokenizer(tokenizer, "reference" if cfg.reference else "candidate")
        if reference is not None and not record.made_by(reference):
            raise LowbitError(f"the reference record was made by another model ({record.meta.get('model')!r}) than "
                              f"--reference {cfg.reference!r}; drop one of them, or record again.")
    ref_vocab = int(reference.config.vocab_size) if reference is not None else int(record.meta["vocab_size"])
    if candidate is not None:
        _check_vocab(ref_vocab, candidate)
    if record is None:
        record = ReferenceRecord({"model": cfg.reference, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                                  "vocab_size": ref_vocab}, torch.zeros(0, dtype=torch.int32),
                                 torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.int32))

    out: dict = {"reference": cfg.reference or cfg.reference_record, "candidate": cfg.candidate}
    if cfg.kl:
        out["kl"] = _divergence(cfg, record, reference, candidate, tokenizer, prompts)
    if cfg.kl_text:
        out["kl_text"] = {name: _divergence_on_text(cfg, reference, candidate, tokenizer, name) for name in cfg.kl_text}
    if cfg.ppl:
        out["ppl"] = {name: _perplexity(cfg, record, reference, candidate, tokenizer, name) for name in cfg.ppl}
    if cfg.tasks:
        out["tasks"] = {name: _task(cfg, record, reference, candidate, tokenizer, name) for name in cfg.tasks}
    out["size"] = _size(cfg.candidate) if cfg.candidate else None
    out["timings_s"] = {k: round(v, 2) for k, v in cfg.timings.items()}
    if cfg.save_reference:
        record.save(cfg.save_reference, getattr(torch, cfg.record_dtype))
    return out


def _divergence(cfg, record, reference, candidate, tokenizer, prompts) -> dict | None:
    t = time.perf_counter()
    prompt_list, source = prompts
    if record.num_sequences == 0:
        if reference is None:
            raise LowbitError("the reference record holds no generations; make one with --reference MODEL --kl.")
        fresh = make_record(reference, tokenizer, prompt_list, source=source, model_name=cfg.reference,
                            max_new_tokens=cfg.max_new_tokens, top_n=cfg.top_n, progress=cfg.progress)
        fresh.extras = record.extras
        record.__dict__.update(fresh.__dict__)
        cfg.timings["kl_generation"] = time.perf_counter() - t
    elif cfg.max_prompts is not None and cfg.max_prompts < record.num_sequences:
        record = record.first(cfg.max_prompts)
    t = time.perf_counter()
    d = compare(record, candidate, reference, cfg.batch_tokens, cfg.progress)
    cfg.timings["kl_teacher_forcing"] = time.perf_counter() - t
    if d is None:
        return None
    summary = summarize_divergence(d, int(record.meta["top_n"]), cfg.seed)
    summary["worst"] = worst_prompts(d, record, tokenizer)
    summary["record"] = {k: record.meta.get(k) for k in ("model", "prompts", "max_new_tokens", "num_prompts",
                                                         "truncated_prompts")}
    return summary


def _divergence_on_text(cfg, reference, candidate, tokenizer, name: str) -> dict:
    t = time.perf_counter()
    seqlen = min(cfg.seqlen, _context_length(reference))
    wins = ppl_mod.windows(tokenizer, name, seqlen, cfg.max_windows)
    record = text_record(wins, {"top_n": cfg.top_n, "model": cfg.reference, "text": name})
    summary = summarize_divergence(compare(record, candidate, reference, cfg.batch_tokens, cfg.progress), cfg.top_n,
                                   cfg.seed)
    summary.update(dataset=name, seqlen=seqlen, windows=int(wins.shape[0]))
    cfg.timings[f"kl_text_{name}"] = time.perf_counter() - t
    return summary


def _perplexity(cfg, record, reference, candidate, tokenizer, name: str) -> dict:
    t = time.perf_counter()
    ctx = _context_length(reference if reference is not None else candidate)
    seqlen = min(cfg.seqlen, ctx)
    wins = ppl_mod.windows(tokenizer, name, seqlen, cfg.max_windows)
    key = f"ppl.{name}.{seqlen}"
    cached = record.extras.get(key)
    if cached is not None and cached.shape[0] >= wins.shape[0]:
        ref_nll = cached[: wins.shape[0]]
    elif reference is not None:
        ref_nll = ppl_mod.token_nll(reference, wins, f"perplexity {name} (reference)", cfg.progress)
        record.extras[key] = ref_nll
    else:
        raise LowbitError(f"the reference record has no {name} perplexity at seqlen {seqlen} for {wins.shape[0]} "
                          f"windows; add --reference MODEL.")
    result = {"reference": ppl_mod.ppl(ref_nll), "candidate": None, "seqlen": seqlen, "windows": int(wins.shape[0]),
              "tokens": int(ref_nll.numel())}
    if candidate is not None:
        cand_nll = ppl_mod.token_nll(candidate, wins, f"perplexity {name} (candidate)", cfg.progress)
        result["candidate"] = ppl_mod.ppl(cand_nll)
        result.update(ppl_mod.compare_ppl(ref_nll, cand_nll))
    cfg.timings[f"ppl_{name}"] = time.perf_counter() - t
    return result


def _task(cfg, record, reference, candidate, tokenizer, name: str) -> dict:
    t = time.perf_counter()
    items = tasks_mod.load_task(name, cfg.limit)
    max_len = _context_length(reference if reference is not None else candidate)
    key = f"task.{name}.{cfg.limit or 'all'}"
    if f"{key}.acc" in record.extras:
        ref_acc, ref_norm = (record.extras[f"{key}.{m}"].numpy().astype(bool) for m in ("acc", "acc_norm"))
    elif reference is not None:
        ref_acc, ref_norm = tasks_mod.correctness(reference, tokenizer, items, max_len, f"{name} (reference)",
                                                  cfg.progress)
        record.extras[f"{key}.acc"] = torch.from_numpy(ref_acc.astype(np.uint8))
        record.extras[f"{key}.acc_norm"] = torch.from_numpy(ref_norm.astype(np.uint8))
    else:
        raise LowbitError(f"the reference record has no results for task {name} (limit {cfg.limit}); add "
                          f"--reference MODEL.")
    result = {"n": len(items), "reference": float(ref_acc.mean()), "reference_acc_norm": float(ref_norm.mean()),
              "candidate": None, "candidate_acc_norm": None, "flips": None}
    if candidate is not None:
        acc, norm = tasks_mod.correctness(candidate, tokenizer, items, max_len, f"{name} (candidate)", cfg.progress)
        result.update(candidate=float(acc.mean()), candidate_acc_norm=float(norm.mean()),
                      flips=float((acc != ref_acc).mean()), flips_acc_norm=float((norm != ref_norm).mean()))
    cfg.timings[f"task_{name}"] = time.perf_counter() - t
    return result


def write_json(result: dict, path: str | Path) -> None:
    import json

    from lowbit.eval.report import write_text

    write_text(json.dumps(result, indent=1), path)
