"""A served candidate, teacher-forced on the reference record through an OpenAI-compatible API (Fireworks' method).

`teacher_force(record, tokenizer, endpoint, options)` checks the server (`GET /models`: reachable, the API key
taken, the model served), finds how it takes a prompt with one request (lowbit.eval.echo: token ids, else text; the
top-k it allows), then sends every sequence of the record — `options.concurrency` requests at a time, each with
`options.timeout` seconds and the retries of lowbit.eval.openai_client — and returns each sequence's answer
(lowbit.eval.echo.Answer) with a description of the run for the JSON (`info`). lowbit.eval.divergence's
`compare_answers` turns them into the usual statistics (lowbit.eval.stats.sparse_token_stats).
`generate(prompts, tokenizer, endpoint, options, max_new_tokens)` asks a served reference for its greedy
continuations the same way (lowbit.eval.complete; lowbit.eval.served_reference makes its record). Both are a `Job` —
the request's body and how its answer is read — run by one driver: the probe, the concurrent `Sender`, the `Cache`.

Partial results: each sequence's answer (the server's log-probs or generation, as it sent them) is written,
atomically, to `$LOWBIT_CACHE/served/<key>/seq-NNNNN.json` as soon as it arrives, where <key> hashes the API's URL,
the model's name, the sequences, k and (for a generation) its length; `meta.json` there says what the folder holds.
A rerun of the same evaluation reads them back (checking each again) and asks only for the rest, so a run that was
killed, or that failed on a server that went away, continues where it stopped. A different model served under the
same name is not noticed: give `--no-endpoint-cache` (or remove the folder) after changing what the server serves.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval import complete, echo
from lowbit.eval.endpoint import Endpoint
from lowbit.eval.openai_client import APIError, Client, RetryPolicy, Unreachable
from lowbit.eval.record import ReferenceRecord
from lowbit.eval.token_text import TokenTexts
from lowbit.io.atomic import atomic_file

DEFAULT_TOP_K = 20  # vLLM's default --max-logprobs; llama.cpp's server has no limit
FALLBACK_TOP_K = (20, 5, 1)  # tried in turn when a server refuses k (the OpenAI API allows 5)
PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class ServedOptions:
    api_key_env: str | None = None  # the environment variable that holds the API key
    top_k: int = DEFAULT_TOP_K
    concurrency: int = 4
    timeout: float = 300.0  # seconds per request (connect, and each read)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    cache: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise LowbitError(f"--endpoint-top-k must be at least 1 (got {self.top_k}).")
        if self.concurrency < 1:
            raise LowbitError(f"--concurrency must be at least 1 (got {self.concurrency}).")
        if self.timeout <= 0:
            raise LowbitError(f"--request-timeout must be positive (got {self.timeout:g}).")


@dataclass(frozen=True)
class Served:
    answers: list[echo.Answer]
    info: dict


@dataclass(frozen=True)
class Generated:
    generations: list[complete.Generation]
    info: dict


def api_key(options: ServedOptions) -> str | None:
    if not options.api_key_env:
        return None
    key = os.environ.get(options.api_key_env)
    if not key:
        raise LowbitError(f"--api-key-env {options.api_key_env}: that environment variable is not set (or empty); "
                          f"export the API key in it first.")
    return key


def connect(endpoint: Endpoint, options: ServedOptions) -> tuple[Client, str]:
    """A client of the API, after checking that the server answers, takes the key and serves the model; and the
    model's name (the only one it serves, when the spec names none)."""
    client = Client(endpoint.base_url, api_key(options), options.timeout, options.retry)
    url = f"{endpoint.base_url}/models"
    try:
        body = client.get("models", retry=False)
    except Unreachable as e:
        raise LowbitError(f"cannot reach the served model at {endpoint.base_url} ({e.reason}). Is the server running "
                          "and listening there? The URL is the API's base, e.g. openai+http://127.0.0.1:8000/v1#MODEL."
                          ) from None
    except APIError as e:
        raise _refused(e, endpoint, options, f"GET {url}") from None
    models = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)] if isinstance(body, dict) else []
    if not models:
        raise LowbitError(f"GET {url} lists no models ({str(body)[:200]}); is this an OpenAI-compatible API?")
    if endpoint.model is None:
        if len(models) > 1:
            raise LowbitError(f"the server at {endpoint.base_url} serves {len(models)} models ({_names(models)}); "
                              f"name one after '#': openai+{endpoint.base_url}#MODEL.")
        return client, models[0]
    if endpoint.model not in models:
        raise LowbitError(f"the server at {endpoint.base_url} has no model {endpoint.model!r}; it serves "
                          f"{_names(models)}. Name one of these after '#' (llama.cpp's server names its model by "
                          "--model_alias, else by the GGUF's path).")
    return client, endpoint.model


@dataclass(frozen=True)
class Job:
    """What each sequence's request asks: its body (from the model's name, the prompt as ids or text, and k), how
    its answer is read (response, sequence, k, where → the answer), and what else keys its cache."""

    name: str  # the progress bar's label
    where: Callable[[int], str]  # names sequence i in errors
    request: Callable[[str, list[int] | str, int], dict]
    read: Callable[[dict, list[int], int, str], Any]
    protocol: str  # what is sent (the prompt aside), for the JSON and errors
    cache_meta: Mapping = field(default_factory=dict)


def teacher_force(record: ReferenceRecord, tokenizer, endpoint: Endpoint, options: ServedOptions) -> Served:
    """Every sequence of the record through the API; see the module's docstring."""
    if record.num_sequences == 0:
        raise LowbitError("the reference record holds no sequences to send to the served model.")
    texts = TokenTexts.of(tokenizer)
    seqs = [record.sequence(i).tolist() for i in range(record.num_sequences)]
    if max(max(s) for s in seqs) >= len(texts.texts):
        raise LowbitError("the record's token ids exceed the tokenizer's vocabulary; it was made with another "
                          "tokenizer than the one given.")

    def read(response: dict, seq: list[int], k: int, where: str) -> echo.Answer:
        return echo.read(response, seq, texts, k, where)

    job = Job("served model", _where, echo.request, read,
              "POST /completions, echo: true, logprobs: k, max_tokens: 1, temperature: 0")
    answers, plan, info = _run(job, seqs, tokenizer, endpoint, options, options.top_k)
    info = {**info, "top_k": plan["k"], "top_k_asked": options.top_k,
            "protocol": job.protocol + (", prompt_logprobs: k" if plan["mode"] == echo.IDS else "")}
    return Served(answers, info)


def generate(prompts: list[list[int]], tokenizer, endpoint: Endpoint, options: ServedOptions,
             max_new_tokens: int) -> Generated:
    """Each prompt's greedy continuation through the API (lowbit.eval.complete), with the concurrency, retries and
    cache of `teacher_force`."""
    if not prompts:
        raise LowbitError("there are no prompts for the served reference to generate from.")
    job = Job("served reference generates", lambda i: f"prompt {i}",
              lambda model, prompt, k: complete.request(model, prompt, k, max_new_tokens),
              lambda response, seq, k, where: complete.read(response, seq, tokenizer, where),
              f"POST /completions, max_tokens: {max_new_tokens}, temperature: 0, logprobs: 1, repeat_penalty: 1",
              {"job": "generation", "max_new_tokens": max_new_tokens})
    generations, _, info = _run(job, prompts, tokenizer, endpoint, options, 1)
    info = {**info, "protocol": job.protocol, "stopped": sum(g.stopped for g in generations),
            "tokens_as": "ids" if all(g.by_id for g in generations) else "text, tokenized here",
            "count_differs": sum(g.count_differs for g in generations)}
    return Generated(generations, info)


def _run(job: Job, seqs: list[list[int]], tokenizer, endpoint: Endpoint, options: ServedOptions,
         k: int) -> tuple[list, dict, dict]:
    """One request per sequence (the first one finds the plan: how the server takes a prompt, the k it allows),
    answers kept and reused by the cache; returns the answers in order, the plan and a description of the run."""
    start = time.perf_counter()
    client, model = connect(endpoint, options)
    cache = Cache.of(endpoint, model, seqs, k, job.cache_meta) if options.cache else None
    plan = cache.plan() if cache else None
    answers: dict[int, Any] = {}
    for i in range(len(seqs)):
        saved = cache.load(i) if cache and plan else None
        if saved is not None:
            answers[i] = job.read(saved, seqs[i], plan["k"], job.where(i))
    cached = len(answers)
    todo = [i for i in range(len(seqs)) if i not in answers]
    requests = 0
    if todo and plan is None:
        first = todo.pop(0)
        plan, response, answers[first], requests = _probe(client, model, job, seqs[first], tokenizer, k, endpoint,
                                                          options, job.where(first))
        if cache:
            cache.start(plan)
            cache.save(first, response)
    if todo:
        sender = Sender(client, model, job, tokenizer, plan, endpoint, options, cache)
        answers.update(sender.run(todo, seqs))
    requests += len(todo)
    info = {"url": endpoint.base_url, "model": model, "prompt_as": "token ids" if plan["mode"] == echo.IDS else "text",
            "requests": requests, "sequences": len(seqs), "sequences_from_cache": cached,
            "concurrency": options.concurrency, "seconds": round(time.perf_counter() - start, 2),
            "cache": str(cache.folder) if cache else None}
    return [answers[i] for i in range(len(seqs))], plan, info


def _probe(client: Client, model: str, job: Job, seq: list[int], tokenizer, k: int, endpoint: Endpoint,
           options: ServedOptions, where: str) -> tuple[dict, dict, Any, int]:
    """Send the first sequence as ids, then as text (without, then with, the leading BOS token: a server that puts
    none before a text prompt reads one token fewer), with k or the largest of FALLBACK_TOP_K the server takes.
    Returns the plan {mode, keep_bos, k}, the response, its answer and the number of requests."""
    requests = 0
    for k_try in [k] + [x for x in FALLBACK_TOP_K if x < k]:
        refusals = []
        try:
            requests += 1
            response = _post(client, job.request(model, seq, k_try), endpoint, options, where)
            plan = {"mode": echo.IDS, "keep_bos": False, "k": k_try}
            return plan, response, job.read(response, seq, k_try, where), requests
        except _BadRequest as e:
            refusals.append(e.error.message)
        if seq[0] != tokenizer.bos_token_id:
            raise LowbitError(f"the server does not take token ids ({_short(refusals[0])}), and the record's sequences "
                              "do not start with the BOS token, without which llama-cpp-python's echoed log-probs are "
                              "one position off (its issue #1983). Record with a reference whose prompts start with "
                              "BOS, or serve the model with vLLM.")
        first_error = None
        for keep_bos in (False, True):
            try:
                requests += 1
                response = _post(client, job.request(model, echo.prompt_text(tokenizer, seq, keep_bos), k_try),
                                 endpoint, options, where)
            except _BadRequest as e:
                refusals.append(e.error.message)
                break
            try:
                answer = job.read(response, seq, k_try, where)
            except echo.CountMismatch as e:
                if keep_bos or e.server != e.record - 1:
                    raise
                first_error = e
                continue  # the server puts no BOS before a text prompt: spell it out
            except LowbitError:
                if first_error is not None:
                    raise first_error from None
                raise
            return {"mode": echo.TEXT, "keep_bos": keep_bos, "k": k_try}, response, answer, requests
        if not any("logprob" in r.lower() for r in refusals):
            break
    raise LowbitError(f"the server refused lowbit's completions request: {_short(refusals[-1], 300)}. lowbit sends "
                      f"{job.protocol}, with the prompt as token ids or text; the server must take it.")


class _BadRequest(Exception):
    def __init__(self, error: APIError):
        self.error = error


def _permanent(status: int, message: str) -> bool:
    """A 5xx that retrying does not cure: the request does not validate (llama-cpp-python answers 500 to a prompt of
    token ids), the server cannot give log-probs, or the prompt exceeds its context."""
    return _invalid(message) or any(w in message.lower() for w in ("logprob", "logits_all", "context", "exceed"))


def _invalid(message: str) -> bool:
    return "validation error" in message.lower()


def _post(client: Client, body: dict, endpoint: Endpoint, options: ServedOptions, where: str) -> dict:
    try:
        return client.post("completions", body, permanent=_permanent)
    except Unreachable as e:
        raise LowbitError(f"{where}: the served model at {endpoint.base_url} stopped answering ({e.reason}; "
                          f"{e.retries} retries over {e.waited:.0f} s). The answers received so far are kept; run "
                          "the same command again when the server is back to continue.") from None
    except APIError as e:
        if e.status in (400, 422) or _invalid(e.message):
            raise _BadRequest(e) from None
        raise _refused(e, endpoint, options, where) from None


def _refused(e: APIError, endpoint: Endpoint, options: ServedOptions, where: str) -> LowbitError:
    if e.status in (401, 403):
        if options.api_key_env:
            return LowbitError(f"the server at {endpoint.base_url} refused the API key in ${options.api_key_env} "
                               f"({e.status}: {_short(e.message)}). Put the key the server expects in that "
                               "environment variable.")
        return LowbitError(f"the server at {endpoint.base_url} wants an API key ({e.status}: {_short(e.message)}). "
                           "Put it in an environment variable and name that variable with --api-key-env.")
    if e.status == 404:
        return LowbitError(f"{where}: {e.url} answered 404 ({_short(e.message)}); the served model's URL should be "
                           "the base of an OpenAI-compatible API, e.g. openai+http://127.0.0.1:8000/v1#MODEL.")
    text = e.message.lower()
    if "logprob" in text or "logits_all" in text:
        return echo.no_logprobs(where, f"it answered {e.status}: {_short(e.message)}")
    if "context" in text or "exceed" in text:
        return LowbitError(f"{where}: the sequence does not fit the served model's context ({e.status}: "
                           f"{_short(e.message)}). Start the server with a larger context (llama.cpp: --n_ctx), or "
                           "record shorter sequences (--max-new-tokens).")
    retried = f" after {e.retries} retries over {e.waited:.0f} s" if e.retries else ""
    return LowbitError(f"{where}: the server answered {e.status}{retried}: {_short(e.message, 300)}. The answers "
                       "received so far are kept; run the same command again to continue.")


class Sender:
    """The remaining sequences, `options.concurrency` requests at a time, with a progress bar in requests/s."""

    def __init__(self, client: Client, model: str, job: Job, tokenizer, plan: dict, endpoint: Endpoint,
                 options: ServedOptions, cache: Cache | None):
        self.client, self.model, self.job, self.tokenizer = client, model, job, tokenizer
        self.plan, self.endpoint, self.options, self.cache = plan, endpoint, options, cache

    def one(self, i: int, seq: list[int]) -> Any:
        prompt = seq if self.plan["mode"] == echo.IDS else echo.prompt_text(self.tokenizer, seq, self.plan["keep_bos"])
        where = self.job.where(i)
        try:
            response = _post(self.client, self.job.request(self.model, prompt, self.plan["k"]), self.endpoint,
                             self.options, where)
        except _BadRequest as e:
            raise LowbitError(f"{where}: the server refused the request ({e.error.status}: "
                              f"{_short(e.error.message, 300)}), which it took for the first sequence.") from None
        answer = self.job.read(response, seq, self.plan["k"], where)
        if self.cache:
            self.cache.save(i, response)
        return answer

    def run(self, todo: list[int], seqs: list[list[int]]) -> dict[int, Any]:
        out: dict[int, Any] = {}
        bar = tqdm(total=len(todo), desc=self.job.name, unit="req", disable=not self.options.progress,
                   dynamic_ncols=True)
        pool = ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="lowbit-served")
        try:
            pending = {pool.submit(self.one, i, seqs[i]): i for i in todo}
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    i = pending.pop(future)
                    out[i] = future.result()  # the first failure is raised here; the rest are cancelled
                    bar.update(1)
        except Exception:
            pool.shutdown(wait=True, cancel_futures=True)  # what is in flight ends (and is kept) before the error
            raise
        except BaseException:  # an interrupt: leave at once; requests in flight end (and are kept) on their own
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()
        pool.shutdown(wait=True)
        return out


class Cache:
    """One folder per (API URL, model name, sequences, k, and what else the job says — a generation's length): the
    plan and each sequence's answer."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta

    @classmethod
    def of(cls, endpoint: Endpoint, model: str, seqs: list[list[int]], k: int, job_meta: Mapping) -> Cache:
        from lowbit.model.builtin import cache_dir

        offsets = np.cumsum([0, *map(len, seqs)], dtype=np.int64)
        tokens = np.array([t for s in seqs for t in s], dtype=np.int32)
        record_hash = hashlib.sha256(tokens.tobytes() + offsets.tobytes()).hexdigest()
        meta = {"protocol": PROTOCOL_VERSION, "url": endpoint.base_url, "model": model, "top_k_asked": k,
                "record_sequences_sha256": record_hash, "sequences": len(seqs), **job_meta}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
        return cls(cache_dir() / "served" / key, meta)

    def plan(self) -> dict | None:
        try:
            saved = json.loads((self.folder / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return saved.get("plan") if all(saved.get(k) == v for k, v in self.meta.items()) else None

    def start(self, plan: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.folder / "meta.json") as tmp:
            tmp.write_text(json.dumps({**self.meta, "plan": plan}, indent=1))

    def load(self, i: int) -> dict | None:
        try:
            return json.loads((self.folder / f"seq-{i:05d}.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def save(self, i: int, response: dict) -> None:
        kept = ("logprobs", "prompt_logprobs", "text", "finish_reason")
        keep = {"usage": response.get("usage"),
                "choices": [{k: v for k, v in c.items() if k in kept} for c in response.get("choices", [])[:1]]}
        with atomic_file(self.folder / f"seq-{i:05d}.json") as tmp:
            tmp.write_text(json.dumps(keep))


def _where(i: int) -> str:
    return f"sequence {i}"


def _names(models: list) -> str:
    return ", ".join(repr(m) for m in models[:10]) + (f" and {len(models) - 10} more" if len(models) > 10 else "")


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"
