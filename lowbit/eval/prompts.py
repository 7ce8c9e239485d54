"""Prompt sets for the divergence evaluation, and their tokenization with the model's chat template."""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.data.datasets import data_root
from lowbit.errors import LowbitError

NAMED_SETS = {"mt_bench": "mt_bench_question.jsonl", "vicuna_bench": "vicuna_bench_question.jsonl"}
DEFAULT_SETS = ("mt_bench", "vicuna_bench")

# Used when no data folder exists: short, varied requests written for lowbit.
BUILTIN_PROMPTS = (
    "Explain why the sky looks blue during the day and red at sunset.",
    "Write a short poem about a lighthouse keeper who befriends a seagull.",
    "List three practical tips for keeping a sourdough starter alive.",
    "What is the difference between a list and a tuple in Python? Give an example of each.",
    "Summarize the plot of a heist story in four sentences, in the style of a news report.",
    "A train leaves at 3:40 pm and the trip takes 2 hours 35 minutes. When does it arrive? Explain.",
    "Give me a packing list for a two-day hiking trip in autumn.",
    "Translate 'Where is the nearest library?' into French and Spanish, and explain the word order.",
)


def _read_jsonl_first_turns(path: Path) -> list[str]:
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowbitError(f"{str(path)!r} line {n} is not valid JSON ({e}).") from None
        turns = record.get("turns") if isinstance(record, dict) else None
        text = turns[0] if isinstance(turns, list) and turns else (record.get("prompt") if isinstance(record, dict)
                                                                   else None)
        if not isinstance(text, str):
            raise LowbitError(f"{str(path)!r} line {n} has no 'turns' list (MT-bench format) or 'prompt' string.")
        prompts.append(text)
    return prompts


def load_prompts(spec: str | None = None, max_prompts: int | None = None) -> tuple[list[str], str]:
    """Prompts and a description of where they came from.

    spec: None (MT-bench and Vicuna-bench first turns from the data folder, or the built-in prompts when there is
    no data folder), a set name (mt_bench, vicuna_bench, builtin), a .jsonl file (MT-bench format: first of
    `turns`) or a .txt file (one prompt per line).
    """
    if spec is None or spec == "default":
        try:
            root = data_root() / "prompts"
            prompts = [p for name in DEFAULT_SETS for p in _read_jsonl_first_turns(root / NAMED_SETS[name])]
            source = "MT-bench + Vicuna-bench first turns"
        except (LowbitError, OSError):
            prompts, source = list(BUILTIN_PROMPTS), "lowbit's built-in prompts (no data folder found)"
    elif spec == "builtin":
        prompts, source = list(BUILTIN_PROMPTS), "lowbit's built-in prompts"
    elif spec in NAMED_SETS:
        prompts, source = _read_jsonl_first_turns(data_root() / "prompts" / NAMED_SETS[spec]), spec
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise LowbitError(f"prompts file {spec!r} does not exist; give a .jsonl file in MT-bench format, a .txt "
                              f"file with one prompt per line, or one of: {', '.join([*NAMED_SETS, 'builtin'])}.")
        if path.suffix == ".jsonl":
            prompts = _read_jsonl_first_turns(path)
        else:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = str(path)
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    if not prompts:
        raise LowbitError(f"the prompt set {source!r} is empty: the divergence evaluation needs at least one prompt.")
    return prompts, source


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids per prompt, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        out = []
        for p in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=True)
            out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
        return out
    return [tokenizer(p, verbose=False)["input_ids"] for p in prompts]


def _shared_length(seqs: list[list[int]]) -> int:
    """How many leading ids every sequence has in common."""
    n = 0
    for column in zip(*seqs, strict=False):
        if len(set(column)) > 1:
            break
        n += 1
    return n


def prompt_starts(record, tokenizer, words: int = 8) -> list[str]:
    """The first words of each prompt of a record (a lowbit.eval.record.ReferenceRecord), so that a report can say
    which prompt is which. What every prompt shares at its start and end (a chat template's tokens) is left out."""
    prompts = [record.sequence(i)[: int(record.prompt_lens[i])].tolist() for i in range(record.num_sequences)]
    head = tail = 0
    if len(prompts) > 1:
        head = _shared_length(prompts)
        tail = min(_shared_length([p[::-1] for p in prompts]), min(map(len, prompts)) - head)
    out = []
    for p in prompts:
        text = tokenizer.decode(p[head: len(p) - tail] or p, skip_special_tokens=True).split()
        out.append(" ".join(text[:words]) + (" …" if len(text) > words else ""))
    return out
