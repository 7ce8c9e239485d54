"""Greedy generation through the completions API, for a served reference: the request, and the token ids read from
its answer.

The request: `POST /completions` with the prompt (token ids, else text, as lowbit.eval.echo sends a sequence),
`max_tokens: N, temperature: 0, logprobs: 1` and the penalties off (`repeat_penalty: 1`: llama-cpp-python's server
applies 1.1 by default, before its greedy pick). The generated tokens are the ids the server names (`token_id:N`,
vLLM's `return_tokens_as_token_ids`); else the generated text is tokenized locally after the prompt's text, so that
it reads as it does in the whole sequence. The teacher forcing that follows sends each whole sequence back and
checks, token by token, that the server reads it as these ids (lowbit.eval.echo): a generation that the local
tokenizer reads otherwise is refused there. A generation that stopped (`finish_reason: "stop"`: the model's end of
sequence, which servers leave out of the text) ends with the tokenizer's EOS token, as a local reference's does.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.eval.echo import check_prompt_count, first_choice
from lowbit.eval.token_text import TOKEN_ID


def request(model: str, prompt: list[int] | str, k: int, max_new_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "logprobs": k,
            "repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
            "return_tokens_as_token_ids": True}


@dataclass(frozen=True)
class Generation:
    ids: list[int]  # the prompt, the generated tokens and, where the generation stopped, EOS
    stopped: bool  # the server stopped at the end of the sequence (not at max_tokens)
    by_id: bool  # the server named the generated tokens by id (else their text was tokenized here)
    count_differs: bool  # the server counted another number of generated tokens than the ids hold


def read(response: dict, prompt: list[int], tokenizer, where: str) -> Generation:
    """Check and read one prompt's generation (a completions response). `where` names the prompt in errors."""
    choice = first_choice(response, where)
    check_prompt_count(response, prompt, where)
    text = choice.get("text")
    if not isinstance(text, str):
        raise LowbitError(f"{where}: the server's answer holds no generated text (choices[0].text); a served reference "
                          "must generate through the completions API (max_tokens, temperature: 0).")
    logprobs = choice.get("logprobs")
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    named = [TOKEN_ID.fullmatch(t) if isinstance(t, str) else None for t in tokens or []]
    by_id = bool(named) and all(named)
    new = [int(m.group(1)) for m in named] if by_id else _tokenize_after(tokenizer, prompt, text)
    stopped = choice.get("finish_reason") == "stop"
    if not new and not stopped:
        raise LowbitError(f"{where}: the server generated nothing (finish_reason {choice.get('finish_reason')!r}); a "
                          "served reference must generate: lowbit asks for max_tokens (--max-new-tokens) tokens at "
                          "temperature 0.")
    usage = response.get("usage")
    counted = usage.get("completion_tokens") if isinstance(usage, dict) else None
    eos = tokenizer.eos_token_id
    if stopped and eos is not None and (not new or new[-1] != eos):
        new.append(eos)
    return Generation(prompt + new, stopped, by_id,
                      isinstance(counted, int) and counted not in (len(new), len(new) - stopped))


def _tokenize_after(tokenizer, prompt: list[int], text: str) -> list[int]:
    """The ids of `text` where it follows `prompt`: the whole text tokenized, with or without the prompt's leading
    special token and the tokenizer's own (the way that gives the prompt's ids back); else `text` on its own."""
    for start, special in ((0, False), (1, True), (0, True), (1, False)):
        head = tokenizer.decode(prompt[start:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        ids = tokenizer(head + text, add_special_tokens=special, verbose=False)["input_ids"]
        if ids[:len(prompt)] == prompt:
            return list(ids[len(prompt):])
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
