"""Teacher forcing through the completions API: one request per record sequence, its answer read per position.

The request: `POST /completions` with the sequence as the prompt, `echo: true, logprobs: k, max_tokens: 1,
temperature: 0` — the server scores the prompt's own tokens (echo) and generates one token, which is ignored
(`max_tokens: 0` makes llama-cpp-python generate up to its context instead). The prompt is the list of token ids
where the server takes ids (vLLM, which is then also asked for `prompt_logprobs: k`, keyed by id); else the text
decoded from the ids (llama-cpp-python 0.3.36 takes strings only), without the leading BOS token where the server
puts one before every prompt. `return_tokens_as_token_ids: true` asks vLLM to name tokens `token_id:N`.

The answer, per prompt token x_j (j ≥ 1), is the log-prob of x_j and the top-k of the distribution that predicted
it — the record's position j − 1. Servers do not score the first token; llama-cpp-python also nulls the second
(OpenAI's convention for the first echoed token, after it drops the BOS token), so there the record's position 0 —
the prediction after BOS, one context shared by every sequence — does not come back. Before anything is read, the
echoed tokens are checked against the record's ids (their count, the server's `usage.prompt_tokens`, and each
token's text or id): a server that tokenizes the text otherwise is refused at the first token that differs.
Texts are mapped back to ids by lowbit.eval.token_text (shared texts: see there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError
from lowbit.eval.token_text import TOKEN_ID, TokenTexts

IDS, TEXT = "ids", "text"


class CountMismatch(LowbitError):
    """The server read the prompt as another number of tokens than the record holds."""

    def __init__(self, message: str, server: int, record: int):
        super().__init__(message)
        self.server, self.record = server, record


def request(model: str, prompt: list[int] | str, k: int) -> dict:
    body = {"model": model, "prompt": prompt, "echo": True, "logprobs": k, "max_tokens": 1, "temperature": 0,
            "return_tokens_as_token_ids": True}
    if isinstance(prompt, list):
        body["prompt_logprobs"] = k
    return body


def prompt_text(tokenizer, ids: list[int], keep_bos: bool) -> str:
    """The text that tokenizes back to `ids` on the server (its special tokens spelled out, as llama.cpp parses
    them); without a leading BOS token unless `keep_bos`."""
    bos = tokenizer.bos_token_id
    body = ids if keep_bos or not ids or ids[0] != bos else ids[1:]
    return tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class Answer:
    """What the server said about one sequence of n + 1 tokens, at its n predicting positions."""

    ids: np.ndarray  # int32 [n, W]: the ids that came back at each position, −1 where none
    logprobs: np.ndarray  # float32 [n, W]: their log-probs, −inf where none
    next_logprob: np.ndarray  # float32 [n]: the log-prob of the token that comes next, NaN where not returned
    returned: np.ndarray  # bool [n]: the position came back
    hidden_logprob: np.ndarray  # float32 [n]: the largest value of a key left out (a shared text), −inf where none
    hidden_ids: tuple[tuple[int, ...], ...]  # per position, the ids that read as that key
    keys_left_out: int = 0  # keys whose text names no one id (lowbit.eval.token_text), or none


def read(response: dict, seq: list[int], texts: TokenTexts, k: int, where: str) -> Answer:
    """Check and read one sequence's answer (a completions response). `where` names the sequence in errors."""
    choice = first_choice(response, where)
    answer = _read_choice(choice, seq, texts, k, where)
    check_prompt_count(response, seq, where)
    return answer


def first_choice(response: dict, where: str) -> dict:
    """choices[0] of a completions answer, else an error saying the answer is not one."""
    choices = response.get("choices") if isinstance(response, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(choice, dict):
        raise LowbitError(f"{where}: the server's answer has no choices[0]; it is not an OpenAI completions answer "
                          f"({_brief(response)}).")
    return choice


def check_prompt_count(response: dict, seq: list[int], where: str) -> None:
    """Refuse (CountMismatch) an answer whose `usage.prompt_tokens` is not the sequence's length."""
    usage = response.get("usage")
    prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if isinstance(prompt_tokens, int) and prompt_tokens != len(seq):
        raise CountMismatch(f"{where}: the server read the prompt as {prompt_tokens} tokens; the record's sequence has "
                            f"{len(seq)}" + (" (it puts a BOS token before every prompt, and the record's sequences "
                                             "do not start with one)" if prompt_tokens == len(seq) + 1 else "")
                            + ". The served model must read the sequences as the reference did.",
                            prompt_tokens, len(seq))


def _read_choice(choice: dict, seq: list[int], texts: TokenTexts, k: int, where: str) -> Answer:
    if isinstance(choice.get("prompt_logprobs"), list):
        return _read_prompt_logprobs(choice["prompt_logprobs"], seq, texts, where)
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("top_logprobs"), list) or \
            not isinstance(lp.get("tokens"), list) or not isinstance(lp.get("token_logprobs"), list):
        raise no_logprobs(where, f"its answer holds logprobs = {_brief(lp)}")
    tokens, token_lp, top = lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]
    if len(seq) > 2 and not any(isinstance(t, dict) and t for t in top):
        raise no_logprobs(where, "every position's top_logprobs is empty")
    align = _align(tokens, seq, texts, where)
    n = len(seq) - 1
    rows: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    next_lp = np.full(n, np.nan, dtype=np.float32)
    dropped, seen, unknown = 0, 0, []
    hidden_lp = np.full(n, -np.inf, dtype=np.float32)
    hidden_ids: list[tuple[int, ...]] = [()] * n
    v = len(texts.texts)
    for e, j in enumerate(align):
        if j < 1 or e >= len(top) or not isinstance(top[e], dict) or not top[e] or token_lp[e] is None:
            continue
        actual, actual_lp, actual_text = seq[j], float(token_lp[e]), tokens[e]
        entries = top[e]
        others = [float(x) for t, x in entries.items() if t != actual_text and x is not None]
        inside = not others or actual_lp >= min(others) - 1e-6
        collided = len(entries) < min(k, v) + (0 if inside else 1)
        row = {actual: actual_lp}
        for text, value in entries.items():
            if text == actual_text or value is None:
                continue
            seen += 1
            if not texts.ids(text):  # no id reads so: left out, and too many of them mean another tokenizer
                unknown.append(text)
                continue
            exact = TOKEN_ID.fullmatch(text) is not None
            if not exact and texts.shared(text) and (collided or texts.canonical(text) is None):
                dropped += 1
                if float(value) > hidden_lp[j - 1]:
                    hidden_lp[j - 1], hidden_ids[j - 1] = float(value), texts.ids(text)
                continue
            row.setdefault(texts.canonical(text), float(value))
        rows[j - 1] = list(row.items())
        next_lp[j - 1] = actual_lp
    if len(unknown) > max(2, seen // 20):
        raise LowbitError(f"{where}: the server names {len(unknown)} of {seen} top tokens by texts that no token of "
                          f"the local tokenizer reads as (e.g. {unknown[:3]!r}); the served model uses another "
                          "tokenizer. Compare models that share one.")
    return _pack(rows, next_lp, hidden_lp, tuple(hidden_ids), dropped + len(unknown))


def _read_prompt_logprobs(plp: list, seq: list[int], texts: TokenTexts, where: str) -> Answer:
    """vLLM's `prompt_logprobs`: per prompt token, None (the first) or {id: {"logprob", "rank", …}}."""
    if len(plp) != len(seq):
        raise CountMismatch(f"{where}: the server scored {len(plp)} prompt tokens; the record's sequence has "
                            f"{len(seq)}. It read the token ids otherwise.", len(plp), len(seq))
    n = len(seq) - 1
    rows: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    next_lp = np.full(n, np.nan, dtype=np.float32)
    for j in range(1, len(seq)):
        entry = plp[j]
        if not isinstance(entry, dict) or not entry:
            continue
        row = {}
        for key, value in entry.items():
            i = int(key) if str(key).lstrip("-").isdigit() else texts.canonical(str(key))
            x = value.get("logprob") if isinstance(value, dict) else value
            if i is not None and x is not None and math.isfinite(float(x)):
                row[i] = float(x)
        if seq[j] not in row:
            raise LowbitError(f"{where}: at token {j} the server's prompt_logprobs lack the record's token {seq[j]} "
                              f"({texts.render(seq[j])!r}); it read the prompt otherwise.")
        rows[j - 1] = list(row.items())
        next_lp[j - 1] = row[seq[j]]
    return _pack(rows, next_lp, np.full(n, -np.inf, dtype=np.float32), ((),) * n, 0)


def _align(tokens: list, seq: list[int], texts: TokenTexts, where: str) -> list[int]:
    """For each echoed token, the index of the record token it is. Servers echo every prompt token (vLLM) or drop
    BOS tokens (llama-cpp-python); one generated token may follow. Refuses at the first token that differs."""
    every = list(range(len(seq)))
    bos = _bos(texts, seq)
    no_bos = [j for j in every if seq[j] != bos] if bos is not None else every
    candidates = [every] if no_bos == every else [every, no_bos]
    best, best_at = None, -1
    for align in candidates:
        if len(tokens) not in (len(align), len(align) + 1):
            continue
        at = _first_difference(tokens, align, seq, texts)
        if at is None:
            return align
        if at > best_at:
            best, best_at = align, at
    if best is None:
        if len(tokens) <= 1 < len(seq):
            raise no_logprobs(where, "it did not echo the prompt (echo: true)")
        best = min(candidates, key=lambda a: abs(len(tokens) - len(a)))
        at = _first_difference(tokens, best, seq, texts)
        best_at = at if at is not None else min(len(tokens), len(best))
    raise _mismatch(tokens, best, seq, texts, best_at, where)


def _bos(texts: TokenTexts, seq: list[int]) -> int | None:
    """The BOS id, where the sequence starts with a control token (the only BOS a record has)."""
    return seq[0] if seq and seq[0] in texts.special else None


def _same(server: object, token_id: int, texts: TokenTexts) -> bool:
    if not isinstance(server, str):
        return False
    m = TOKEN_ID.fullmatch(server)
    return int(m.group(1)) == token_id if m else server == texts.render(token_id)


def _first_difference(tokens: list, align: list[int], seq: list[int], texts: TokenTexts) -> int | None:
    for e, j in enumerate(align):
        if e >= len(tokens) or not _same(tokens[e], seq[j], texts):
            return e
    return None


def _mismatch(tokens: list, align: list[int], seq: list[int], texts: TokenTexts, e: int, where: str) -> LowbitError:
    if e < len(align):
        j = align[e]
        theirs = repr(tokens[e]) if e < len(tokens) else "nothing (its tokens end there)"
        return LowbitError(f"{where}: the server tokenizes the sequence differently from the record. At token {j} the "
                           f"record has id {seq[j]} ({texts.render(seq[j])!r}), the server {theirs}. The served model "
                           "must use the reference's tokenizer, and its server must read the prompt's text (or ids) "
                           "as given; compare models that share a tokenizer.")
    return LowbitError(f"{where}: the server reads the sequence as {len(tokens)} tokens after the record's "
                       f"{len(align)}; it tokenizes the text differently from the record. The served model must use "
                       "the reference's tokenizer.")


def no_logprobs(where: str, detail: str) -> LowbitError:
    return LowbitError(f"{where}: the server returns no log-probs of the prompt's tokens ({detail}). lowbit needs "
                       "the completions API with echo and logprobs: start llama.cpp's Python server with "
                       "--logits_all true, vLLM with --max-logprobs at least the top-k asked for.")


def _pack(rows: list[list[tuple[int, float]]], next_lp: np.ndarray, hidden_lp: np.ndarray,
          hidden_ids: tuple[tuple[int, ...], ...], dropped: int) -> Answer:
    n = len(rows)
    width = max((len(r) for r in rows), default=0) or 1
    ids = np.full((n, width), -1, dtype=np.int32)
    lps = np.full((n, width), -np.inf, dtype=np.float32)
    for t, row in enumerate(rows):
        row = sorted(row, key=lambda x: -x[1])
        if row:
            ids[t, : len(row)] = [i for i, _ in row]
            lps[t, : len(row)] = [x for _, x in row]
    return Answer(ids, lps, next_lp, np.array([bool(r) for r in rows], dtype=bool), hidden_lp, hidden_ids, dropped)


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"
