"""Zero-shot (and 5-shot MMLU) tasks scored by log-likelihood, as lm-evaluation-harness defines them.

Each item offers choices, each a (context, continuation) request; the model's score for a choice is the sum of
the continuation tokens' log-probs given the context. acc picks the highest sum; acc_norm divides each sum by the
continuation's length in characters first. LAMBADA is scored by exact greedy match of the final word. `flips` is
the share of items whose correctness differs between reference and candidate (Dutta et al., arXiv 2407.09141).

Tokenization follows the harness: the continuation's tokens are those of tokenize(context + continuation) after
tokenize(context), so a space at the start of the continuation is tokenized as in running text.
"""

from __future__ import annotations

import bz2
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.data.datasets import data_root
from lowbit.errors import LowbitError
from lowbit.eval.forward import DEFAULT_BATCH_TOKENS, length_batches


@dataclass(frozen=True)
class Item:
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    greedy: bool = False  # scored by exact greedy match of the single continuation (LAMBADA)


def missing_task_data(path: Path) -> LowbitError:
    return LowbitError(f"task data {str(path)!r} is missing. Set LOWBIT_DATA to a folder laid out like "
                       "../shared/data (tasks/, hellaswag/, mmlu/), or leave the task out.")


def _jsonl(name: str) -> list[dict]:
    path = data_root() / "tasks" / f"{name}.jsonl"
    if not path.is_file():
        raise missing_task_data(path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _answer_after_query(name: str) -> list[Item]:
    """llm-foundry's query/choices/gold records as the harness prompts them: '<query>\\nAnswer: <choice>'."""
    items = []
    for r in _jsonl(name):
        query = r["query"].rstrip("\n")
        context = query if query.endswith("Answer:") else query + "\nAnswer:"
        items.append(Item(tuple([context] * len(r["choices"])), tuple(" " + c for c in r["choices"]), int(r["gold"])))
    return items


def _continuation_of_query(name: str) -> list[Item]:
    """Sentence completions (OpenBookQA, COPA): the choice continues the query directly."""
    return [Item(tuple([r["query"]] * len(r["choices"])), tuple(" " + c for c in r["choices"]), int(r["gold"]))
            for r in _jsonl(name)]


def _winogrande() -> list[Item]:
    """Partial evaluation: the same continuation scored after each filled-in context."""
    return [Item(tuple(r["context_options"]), tuple(" " + r["continuation"] for _ in r["context_options"]),
                 int(r["gold"])) for r in _jsonl("winogrande")]


def _lambada() -> list[Item]:
    return [Item((r["context"],), (" " + r["continuation"].strip(),), 0, greedy=True) for r in _jsonl("lambada_openai")]


def _hellaswag() -> list[Item]:
    """llama.cpp's text format: per item a context line, the gold index, then four endings."""
    path = data_root() / "hellaswag" / "hellaswag_val_full.txt.bz2"
    if not path.is_file():
        raise missing_task_data(path)
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    items = []
    for k in range(0, len(lines) - 5, 6):
        ctx, gold, endings = lines[k], int(lines[k + 1]), lines[k + 2:k + 6]
        items.append(Item(tuple([ctx] * 4), tuple(" " + e for e in endings), gold))
    return items


def _mmlu_question(row: list[str]) -> str:
    q, *choices, _ = row
    return q.strip() + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices, strict=True)) + "\nAnswer:"


def _mmlu(shots: int) -> list[Item]:
    root = data_root() / "mmlu"
    files = sorted((root / "test").glob("*_test.csv"))
    if not files:
        raise missing_task_data(root / "test" / "*_test.csv")
    items = []
    for f in files:
        subject = f.name.removesuffix("_test.csv")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if shots:
            dev = list(csv.reader(open(root / "dev" / f"{subject}_dev.csv", encoding="utf-8")))[1:shots + 1]
            header += "".join(_mmlu_question(r) + f" {'ABCD'[int(r[-1])]}\n\n" for r in dev)
        for row in list(csv.reader(open(f, encoding="utf-8")))[1:]:
            context = header + _mmlu_question(row)
            items.append(Item(tuple([context] * 4), (" A", " B", " C", " D"), int(row[-1])))
    return items


TASKS = {
    "piqa": lambda: _answer_after_query("piqa"),
    "arc_easy": lambda: _answer_after_query("arc_easy"),
    "arc_challenge": lambda: _answer_after_query("arc_challenge"),
    "boolq": lambda: _answer_after_query("boolq"),
    "siqa": lambda: _answer_after_query("siqa"),
    "commonsense_qa": lambda: _answer_after_query("commonsense_qa"),
    "openbook_qa": lambda: _continuation_of_query("openbook_qa"),
    "copa": lambda: _continuation_of_query("copa"),
    "winogrande": _winogrande,
    "hellaswag": _hellaswag,
    "lambada_openai": _lambada,
    "mmlu": lambda: _mmlu(0),
    "mmlu_5shot": lambda: _mmlu(5),
}


def load_task(name: str, limit: int | None = None) -> list[Item]:
    """A task's items; with `limit`, an evenly spaced subset (so MMLU's limit spans every subject)."""
    if name not in TASKS:
        raise LowbitError(f"unknown task {name!r}; available: {', '.join(TASKS)}.")
    items = TASKS[name]()
    if limit is not None and limit < len(items):
        pick = np.unique(np.linspace(0, len(items) - 1, max(limit, 1)).round().astype(int))
        items = [items[i] for i in pick]
    return items


@dataclass(frozen=True)
class Request:
    """Token ids ending with the continuation's `n_cont` tokens; or, with `targets`, a context whose next-token
    log-probs are read for each target (single-token choices sharing one context: one pass for all of them)."""

    ids: tuple[int, ...]
    n_cont: int = 0
    targets: tuple[int, ...] = ()


def encode_item(tokenizer, item: Item, max_len: int) -> list[Request]:
    """One request per choice, or a single shared-context request when every choice is one token."""
    ctx_ids, cont_ids = [], []
    for context, continuation in zip(item.contexts, item.continuations, strict=True):
        whole = tokenizer(context + continuation, verbose=False)["input_ids"]
        ctx = tokenizer(context, verbose=False)["input_ids"]
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            ctx_ids.append(ctx)
            cont_ids.append(whole[len(ctx):])
        else:
            ctx_ids.append(ctx)
            cont_ids.append(tokenizer(continuation, add_special_tokens=False)["input_ids"] or whole[-1:])
    if not item.greedy and all(len(c) == 1 for c in cont_ids) and all(c == ctx_ids[0] for c in ctx_ids):
        return [Request(tuple(ctx_ids[0][-max_len:]), 0, tuple(c[0] for c in cont_ids))]
    out = []
    for ctx, cont in zip(ctx_ids, cont_ids, strict=True):
        ids = (ctx + cont)[-max_len:]
        out.append(Request(tuple(ids), min(len(cont), len(ids) - 1)))
    return out


@torch.no_grad()
def _kept_logprobs(model: nn.Module, seqs: list[tuple[int, ...]], keep: int) -> torch.Tensor:
    """Log-probs at the last `keep` positions of each sequence (left padding): [B, keep, V]."""
    longest = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, longest - len(s):] = torch.tensor(s)
        mask[r, longest - len(s):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    args = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device),
            "use_cache": False}
    try:
        logits = model(**args, logits_to_keep=keep).logits
    except TypeError:  # an architecture without logits_to_keep
        logits = model(**args).logits
    return torch.log_softmax(logits[:, -keep:].float(), dim=-1).cpu()


def score(model: nn.Module, requests: list[Request], batch_tokens: int = DEFAULT_BATCH_TOKENS,
          desc: str = "tasks", progress: bool = True) -> list[tuple[np.ndarray, bool]]:
    """Per request: the log-likelihood of each choice it covers, and whether its continuation is all greedy."""
    out: list[tuple[np.ndarray, bool] | None] = [None] * len(requests)
    lengths = [len(r.ids) for r in requests]
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
    for rows in length_batches(lengths, batch_tokens):
        keep = max(requests[i].n_cont for i in rows) + 1
        lp = _kept_logprobs(model, [requests[i].ids for i in rows], keep)
        for r, i in enumerate(rows):
            req = requests[i]
            if req.targets:
                out[i] = (lp[r, -1, list(req.targets)].numpy().astype(float), False)
                continue
            cont = torch.tensor(req.ids[-req.n_cont:])
            pred = lp[r, keep - req.n_cont - 1:keep - 1]
            out[i] = (np.array([pred.gather(-1, cont.unsqueeze(-1)).sum().item()]),
                      bool((pred.argmax(-1) == cont).all()))
        bar.update(len(rows))
    bar.close()
    return out


def correctness(model: nn.Module, tokenizer, items: list[Item], max_len: int, desc: str = "tasks",
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per item: correct by acc and by acc_norm (equal for greedy-match items)."""
    encoded = [encode_item(tokenizer, it, max_len) for it in items]
    flat = [req for reqs in encoded for req in reqs]
    scored = score(model, flat, desc=desc, progress=progress)
    acc, acc_norm, k = np.zeros(len(items), bool), np.zeros(len(items), bool), 0
    for j, (it, reqs) in enumerate(zip(items, encoded, strict=True)):
        results = scored[k:k + len(reqs)]
        k += len(reqs)
        if it.greedy:
            acc[j] = acc_norm[j] = results[0][1]
            continue
        ll = np.concatenate([r[0] for r in results])
        acc[j] = int(np.argmax(ll)) == it.gold
        acc_norm[j] = int(np.argmax(ll / np.array([len(c) for c in it.continuations]))) == it.gold
    return acc, acc_norm
