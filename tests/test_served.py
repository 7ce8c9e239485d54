"""A served candidate (`--candidate openai+http://…/v1#MODEL`) against llama-cpp-python's real OpenAI-compatible server,
started here on 127.0.0.1 with GGUFs that lowbit exports from stories260K: the endpoint's numbers equal the local
evaluation of the same GGUF within llama.cpp's own arithmetic, a quantized GGUF ranks the same way, a server killed
mid-run is waited for, a failed run resumes, and bad input (no server, a wrong key, an unknown model, a server
without log-probs, another tokenization) is a clear error. A served reference (`--reference openai+…`) likewise: its
sparse record against the same GGUF evaluated locally, the ranking of a quantized GGUF, the saved record's round
trip, and what it refuses."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit import cli
from lowbit.errors import LowbitError
from lowbit.eval import complete, echo
from lowbit.eval.divergence import compare, compare_answers, reference_returned
from lowbit.eval.endpoint import parse_endpoint
from lowbit.eval.forward import logprobs, pad_right
from lowbit.eval.openai_client import RetryPolicy
from lowbit.eval.record import ReferenceRecord, tokenizer_fingerprint
from lowbit.eval.runner import EvalConfig, evaluate
from lowbit.eval.served import ServedOptions, teacher_force
from lowbit.eval.served_reference import served_record
from lowbit.eval.stats import sparse_token_stats, token_stats
from lowbit.eval.token_text import TokenTexts

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] (fastapi, uvicorn) is not installed")

TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog.",
    "Tom and Sue went to the park. They saw a big tree and a red ball. \"Let's play!\" said Tom.",
    "The sun was hot and the bird sang a happy song. The cat wanted to catch the bird, but it flew away.",
    "Lily had a red ball. One day, she lost it in the garden. She looked and looked, and then she found it.",
    "Ben was 3 years old. He liked to eat apples and cookies.\nHis mom said no more cookies today.",
    "One day, a little fish swam in the sea. It met a big whale. The whale was kind and friendly.",
    "Sara wanted to bake a cake with her mom. They put flour, eggs and sugar in a big bowl.",
    "The dog ran fast. He wanted to find the bone he hid yesterday under the old tree.",
    "Mia saw a shiny star in the sky. She made a wish and closed her eyes.",
    "Once upon a time, a small bunny lived in a hole. He was scared of the dark.",
    "Max and his friend Sam built a tower of blocks. It was very tall, and then it fell down!",
    "The little boat sailed on the lake. The wind was strong, but the boat was brave.",
]
PROMPTS = [t.split(".")[0] + "." for t in TEXTS[:4]]  # a served reference's prompts: first sentences
SERVED_NEW_TOKENS = 24
KEY = "sk-lowbit-test-0c5e1f9a77d2"  # the API key of the keyed server: must appear in no output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m llama_cpp.server` on 127.0.0.1, serving one GGUF under `alias`; ready when GET /v1/models is 200."""

    def __init__(self, model: Path, alias: str, log: Path, logits_all: bool = True, api_key: str | None = None):
        self.model, self.alias, self.log, self.logits_all, self.api_key = model, alias, log, logits_all, api_key
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def spec(self, name: str | None = None) -> str:
        return f"openai+{self.base}#{name or self.alias}"

    def start(self, timeout: float = 90) -> Server:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "1",
               "--logits_all", "true" if self.logits_all else "false", "--verbose", "false",
               "--model_alias", self.alias]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{self.base}/models", headers=headers),
                                            timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not answer within {timeout} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def ggufs(stories_path, tmp_path_factory) -> dict[str, Path]:
    """stories260K through lowbit's GGUF exporter: "f16" keeps every layer but one small q8_0 projection in F16 (the
    exporter writes quantized layers only), "q4" has every attention projection in Q4_0."""
    from lowbit import api
    from lowbit.io.export import export
    from lowbit.recipe import Recipe

    out = tmp_path_factory.mktemp("gguf")
    recipes = {"f16": Recipe(method="rtn", scheme="q8_0", targets=(r"layers\.0\.self_attn\.q_proj",)),
               "q4": Recipe(method="rtn", scheme="q4_0", targets=(r"self_attn",))}
    for name, recipe in recipes.items():
        export(api.quantize(str(stories_path), recipe, progress=False), "gguf", out / f"{name}.gguf")
    return {name: out / f"{name}.gguf" for name in recipes}


@pytest.fixture(scope="module")
def record(_stories, stories_tokenizer, stories_path) -> ReferenceRecord:
    """A record of twelve stories (a third of each the prompt), completed with the reference's top-16."""
    seqs = [stories_tokenizer(t).input_ids for t in TEXTS]
    assert all(s[0] == stories_tokenizer.bos_token_id for s in seqs)
    meta = {"model": str(stories_path), "tokenizer_fingerprint": tokenizer_fingerprint(stories_tokenizer),
            "vocab_size": 512, "top_n": 16, "num_prompts": len(seqs), "prompts": "test"}
    lengths = torch.tensor([len(s) for s in seqs])
    bare = ReferenceRecord(meta, torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
                           torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
                           torch.tensor([max(2, len(s) // 3) for s in seqs], dtype=torch.int32))
    return compare(bare, None, _stories, progress=False).record


@pytest.fixture(scope="module")
def record_file(record, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("record") / "stories.safetensors"
    record.save(path)
    return path


@pytest.fixture(scope="module")
def servers(ggufs, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    running = {name: Server(path, name, logs / f"{name}.log") for name, path in ggufs.items()}
    try:
        for s in running.values():
            s.start()
        yield running
    finally:
        for s in running.values():
            s.stop()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Each test keeps its served answers in its own cache."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))


def _quick(**kw) -> ServedOptions:
    return ServedOptions(progress=False, retry=RetryPolicy(first_wait=0.1, max_wait=0.5, total=kw.pop("total", 20)),
                         **kw)


def _served(record, tokenizer, spec: str, **kw):
    answers = teacher_force(record, tokenizer, parse_endpoint(spec), _quick(**kw))
    d, counts = compare_answers(record, answers.answers)
    return d, {**answers.info, **counts}, answers


def _engine_gap(path: Path, record: ReferenceRecord, model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp (llama-cpp-python, in this process) against transformers on the same GGUF, per position of the
    record: max_v |Δ log p_v|, the full-vocabulary KL(transformers ‖ llama.cpp), and transformers' top-2 gap."""
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, n_threads=1, verbose=False)
    delta, kl, gap = [], [], []
    for i in range(record.num_sequences):
        seq = record.sequence(i).long()
        llm.reset()
        llm.eval(seq.tolist())
        theirs = torch.log_softmax(torch.tensor(np.array(llm.scores[: len(seq)])), -1)[:-1]
        ids, mask = pad_right([seq])
        ours = logprobs(model, ids, mask)[0, :-1]
        delta.append((ours - theirs).abs().amax(-1))
        kl.append((ours.exp() * (ours - theirs)).sum(-1))
        top2 = ours.topk(2, -1).values
        gap.append(top2[:, 0] - top2[:, 1])
    return tuple(torch.cat(x).numpy() for x in (delta, kl, gap))


def _check_within_engine_gap(local, served, record, delta, gap) -> dict:
    """At every position the server returned: |ΔKL| ≤ 2δ (KL = −Σ P log Q + const, and renormalizing Q over the same
    ids moves each log Q by at most δ again), |ΔΔp| ≤ e^δ − 1, and a rejection differs only at a near tie (the
    transformers top-2 gap ≤ 2δ). δ = max_v |log p_llama.cpp − log p_transformers| at that position."""
    at = record.position_offsets().numpy()[served.prompt] + served.position  # the local index of each served one
    d = delta[at]
    dkl = np.abs(served.stats.kl - local.stats.kl[at])
    ddp = np.abs(served.stats.dp - local.stats.dp[at])
    flips = served.stats.rejected != local.stats.rejected[at]
    assert (dkl <= 2 * d + 1e-6).all(), (dkl - 2 * d).max()
    assert (ddp <= np.expm1(d) + 1e-6).all(), (ddp - np.expm1(d)).max()
    assert (gap[at][flips] <= 2 * d[flips] + 1e-6).all()
    return {"max_dkl": float(dkl.max()), "mean_dkl": float(dkl.mean()), "max_ddp": float(ddp.max()),
            "flips": int(flips.sum()), "positions": len(at),
            "mean_kl_local": float(local.stats.kl[at].mean()), "mean_kl_served": float(served.stats.kl.mean())}


# --- no server needed ---------------------------------------------------------------------------------------------

def test_endpoint_specs_and_paths(tmp_path, monkeypatch):
    from lowbit.model.sources import resolve

    e = parse_endpoint("openai+http://127.0.0.1:8000/v1#my%20model")
    assert (e.base_url, e.model) == ("http://127.0.0.1:8000/v1", "my model")
    assert parse_endpoint("openai+https://api.example.com/v1/").model is None
    for bad, match in (("openai+ftp://h/v1#m", "http or https"), ("openai+http:///v1#m", "with a host"),
                       ("openai+http://u:pw@h/v1#m", "credentials"), ("openai+http://h:99999/v1#m", "port")):
        with pytest.raises(LowbitError, match=match):
            parse_endpoint(bad)
    # a file or folder of that name changes nothing: the spec is never a path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai+http:").mkdir()
    assert resolve("openai+http://h:1/v1#m", served=True).kind == "served"
    with pytest.raises(LowbitError, match="served model"):
        resolve("openai+http://h:1/v1#m")


def test_sparse_statistics_equal_the_full_ones_when_k_covers_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    t, v, n = 40, 50, 8
    ref = torch.log_softmax(torch.randn(t, v, generator=g) * 2, -1)
    cand = torch.log_softmax(ref + torch.randn(t, v, generator=g) * 0.5, -1)
    lp, ids = ref.topk(n, -1)
    nxt = torch.randint(0, v, (t,), generator=g)
    ref_next = ref.gather(-1, nxt[:, None])[:, 0]
    full = token_stats(ids, lp, ref_next, cand, nxt)
    perm = torch.stack([torch.randperm(v, generator=g) for _ in range(t)])  # any order of the returned ids
    sparse = sparse_token_stats(ids, lp, ref_next, perm, cand.gather(-1, perm), cand.gather(-1, nxt[:, None])[:, 0])
    for name in ("kl", "rejected", "spec_rejection", "dp"):
        np.testing.assert_allclose(getattr(sparse, name), getattr(full, name), atol=1e-6)
    # with fewer ids: KL over the intersection, NaN where there is none
    few = torch.full((t, 3), -1)
    few[:, :2] = ids[:, :2]
    few[0] = torch.tensor([v - 1 if ids[0, 0] != v - 1 else 0, -1, -1])
    few[0, 0] = next(i for i in range(v) if i not in ids[0].tolist())
    part = sparse_token_stats(ids, lp, ref_next, few, cand.gather(-1, few.clamp(min=0)), ref_next)
    assert np.isnan(part.kl[0]) and np.isfinite(part.kl[1:]).all()
    p, q = lp[1, :2], cand[1, ids[1, :2]]
    p, q = p - p.logsumexp(0), q - q.logsumexp(0)
    assert part.kl[1] == pytest.approx(float((p.exp() * (p - q)).sum()), abs=1e-6)


def test_token_texts_read_as_llama_cpp_writes_them(ggufs, stories_tokenizer):
    """Every id's text as llama-cpp-python's server shows it (its detokenize of one token), and back."""
    llm = llama_cpp.Llama(model_path=str(ggufs["f16"]), vocab_only=True, verbose=False)
    texts = TokenTexts.of(stories_tokenizer)
    theirs = [llm.detokenize([i]).decode("utf-8", errors="ignore") for i in range(llm.n_vocab())]
    assert list(texts.texts) == theirs
    assert texts.canonical(" Once") == stories_tokenizer.convert_tokens_to_ids("▁Once")
    assert texts.canonical(",") == stories_tokenizer.convert_tokens_to_ids(",")  # not its byte twin <0x2C>
    assert texts.canonical("") is None and texts.canonical("token_id:7") == 7


def test_a_generation_is_read_into_ids(stories_tokenizer):
    """What a served reference's generation request gets back: ids where the server names them (vLLM), else the text
    tokenized after the prompt; EOS added where the server stopped; a wrong prompt count or no text refused."""
    prompt, text = stories_tokenizer(PROMPTS[0]).input_ids, " She loved to play."
    more = stories_tokenizer(PROMPTS[0] + text).input_ids[len(prompt):]
    usage = {"prompt_tokens": len(prompt), "completion_tokens": len(more)}

    def answer(**choice) -> dict:
        return {"choices": [{"text": text, "finish_reason": "length", **choice}], "usage": usage}

    by_id = complete.read(answer(logprobs={"tokens": [f"token_id:{i}" for i in [*more, 7]]}), prompt,
                          stories_tokenizer, "p")
    assert by_id.ids == [*prompt, *more, 7] and by_id.by_id
    by_text = complete.read(answer(logprobs={"tokens": ["x"]}, finish_reason="stop"), prompt, stories_tokenizer, "p")
    assert by_text.ids == prompt + more + [stories_tokenizer.eos_token_id] and by_text.stopped
    assert not by_text.by_id and not by_text.count_differs
    with pytest.raises(echo.CountMismatch):
        complete.read({**answer(), "usage": {"prompt_tokens": len(prompt) - 1}}, prompt, stories_tokenizer, "p")
    with pytest.raises(LowbitError, match="holds no generated text"):
        complete.read(answer(text=None), prompt, stories_tokenizer, "p")
    with pytest.raises(LowbitError, match="generated nothing"):
        complete.read(answer(text=""), prompt, stories_tokenizer, "p")


def _llama_cpp_answer(seq: list[int], lp: np.ndarray, k: int, texts: TokenTexts, bos: int) -> dict:
    """What llama-cpp-python 0.3.36's server answers to the text of `seq` (llama.py's echo branch, rewritten): BOS
    tokens are skipped, each top-k dict is keyed by token text (a later, less likely token overwrites an earlier one
    of the same text), the actual token's entry is set last, and the first token's log-probs are nulled. Row t of
    `lp` is the distribution after seq[:t + 1]."""
    tokens, token_lp, top = [], [], []
    for j in range(1, len(seq)):
        if seq[j] == bos:
            continue
        row = lp[j - 1]
        entries = {texts.render(int(i)): float(row[i]) for i in np.argsort(-row, kind="stable")[:k]}
        entries[texts.render(seq[j])] = float(row[seq[j]])
        tokens.append(texts.render(seq[j]))
        token_lp.append(float(row[seq[j]]))
        top.append(entries)
    token_lp[0], top[0] = None, None
    return {"choices": [{"logprobs": {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top}}],
            "usage": {"prompt_tokens": len(seq)}}


def test_answers_read_back_to_the_right_ids(stories_tokenizer):
    """Text keys (llama.cpp) and id keys (vLLM's prompt_logprobs, `token_id:N`) read back to exactly the ids and
    log-probs the server had; a key two ids share is left out where they collided, and a most likely token that
    reads '' (EOS here) is compared by its text."""
    texts, tok = TokenTexts.of(stories_tokenizer), stories_tokenizer
    seq = tok(TEXTS[0]).input_ids
    n, eos, unk = len(seq) - 1, tok.eos_token_id, tok.unk_token_id
    logits = torch.randn(n, 512, generator=torch.Generator().manual_seed(1)) * 3
    logits[:, sorted(texts.byte_fallback | texts.special)] -= 20  # as a trained model has them
    logits[5, eos] = 60  # the most likely token reads '', and is not the next one
    logits[7, unk], logits[7, eos] = 60, 59  # two '' ids in the top-k: they collide
    logits[9, texts.canonical(",")], logits[9, tok.convert_tokens_to_ids("<0x2C>")] = 60, 59  # ',' and its twin
    lp = torch.log_softmax(logits, -1).numpy()
    a = echo.read(_llama_cpp_answer(seq, lp, 20, texts, tok.bos_token_id), seq, texts, 20, "s")
    t, c = np.nonzero(a.ids >= 0)
    np.testing.assert_array_equal(a.logprobs[t, c], lp[t, a.ids[t, c]])  # every id read back has its own value
    assert not a.returned[0] and a.returned[1:].all()
    np.testing.assert_array_equal(a.next_logprob[1:], lp[np.arange(1, n), seq[2:]])
    assert eos not in a.ids[5] and a.hidden_logprob[5] == lp[5, eos] and eos in a.hidden_ids[5]
    assert texts.canonical(",") not in a.ids[9] and (a.ids[7:8] >= 0).sum() < 20  # collided: shared texts left out
    record = ReferenceRecord({"top_n": 16}, torch.tensor(seq, dtype=torch.int32), torch.tensor([0, len(seq)]),
                             torch.tensor([3], dtype=torch.int32))
    top = torch.from_numpy(lp).topk(16, -1)
    record = record.with_predictions(top.indices.int(), top.values, torch.from_numpy(lp[np.arange(n), seq[1:]]))
    d, counts = compare_answers(record, [a])
    assert counts["positions_argmax_by_text"] >= 2 and counts["keys_left_out"] >= 3
    assert d.stats.rejected.sum() == 0  # the reference's top-1 is EOS at 5 and reads '' as the server's does
    assert np.allclose(d.stats.kl, 0, atol=1e-6)

    plp = [None] + [{str(i): {"logprob": float(lp[j - 1, i]), "rank": 1} for i in
                     {*np.argsort(-lp[j - 1])[:5].tolist(), seq[j]}} for j in range(1, len(seq))]
    b = echo.read({"choices": [{"prompt_logprobs": plp}], "usage": {"prompt_tokens": len(seq)}}, seq, texts, 5, "s")
    assert b.returned.all()  # vLLM scores the first token after BOS too
    t, c = np.nonzero(b.ids >= 0)
    np.testing.assert_array_equal(b.logprobs[t, c], lp[t, b.ids[t, c]])
    by_id = {"tokens": [f"token_id:{i}" for i in seq] + ["token_id:5"],
             "token_logprobs": [None] + [float(lp[j - 1, seq[j]]) for j in range(1, len(seq))] + [-1.0],
             "top_logprobs": [None] + [{f"token_id:{i}": float(lp[j - 1, i]) for i in np.argsort(-lp[j - 1])[:5]}
                                       for j in range(1, len(seq))] + [{}]}
    c_ = echo.read({"choices": [{"logprobs": by_id}]}, seq, texts, 5, "s")
    assert c_.returned.all() and np.array_equal(c_.ids, b.ids) and np.array_equal(c_.logprobs, b.logprobs)


# --- against the real server ------------------------------------------------------------------------------------

def test_endpoint_equals_the_local_evaluation_of_the_same_gguf(servers, ggufs, record, stories_tokenizer):
    """The served F16 GGUF, position by position, against lowbit's local evaluation of the same file (transformers'
    GGUF reader): within the bounds that the measured difference between llama.cpp's and transformers' arithmetic
    gives. The served log-probs are llama.cpp's own (its in-process logits, to 1e-5)."""
    import lowbit

    model = lowbit.load(ggufs["f16"])
    local = compare(record, model, None, progress=False).divergence
    served, info, answers = _served(record, stories_tokenizer, servers["f16"].spec())
    assert info["prompt_as"] == "text" and info["top_k"] == 20 and info["positions_no_overlap"] == 0
    # llama-cpp-python drops the first echoed token's log-probs: position 0 (after BOS) of each sequence
    assert info["positions_not_returned"] == record.num_sequences
    assert info["positions_compared"] == info["positions"] - record.num_sequences
    llm = llama_cpp.Llama(model_path=str(ggufs["f16"]), logits_all=True, n_ctx=512, n_threads=1, verbose=False)
    for i, a in enumerate(answers.answers):
        llm.reset()
        llm.eval(record.sequence(i).tolist())
        theirs = torch.log_softmax(torch.tensor(np.array(llm.scores[: len(a.returned)])), -1).numpy()
        t, c = np.nonzero(a.ids >= 0)
        np.testing.assert_allclose(a.logprobs[t, c], theirs[t, a.ids[t, c]], atol=1e-5)
    delta, _, gap = _engine_gap(ggufs["f16"], record, model)
    numbers = _check_within_engine_gap(local, served, record, delta, gap)
    assert abs(numbers["mean_kl_served"] - numbers["mean_kl_local"]) <= 2 * delta.mean()


def test_a_quantized_gguf_ranks_through_the_endpoint_as_locally(servers, ggufs, record, stories_tokenizer):
    import lowbit

    means = {}
    for name in ("f16", "q4"):
        model = lowbit.load(ggufs[name])
        local = compare(record, model, None, progress=False).divergence
        served, _, _ = _served(record, stories_tokenizer, servers[name].spec())
        delta, _, gap = _engine_gap(ggufs[name], record, model)
        numbers = _check_within_engine_gap(local, served, record, delta, gap)
        means[name] = (numbers["mean_kl_local"], numbers["mean_kl_served"],
                       float(local.stats.rejected.mean()), float(served.stats.rejected.mean()))
    assert means["q4"][0] > 10 * means["f16"][0] and means["q4"][1] > 10 * means["f16"][1]
    assert means["q4"][2] > means["f16"][2] and means["q4"][3] > means["f16"][3]


def test_cli_json_and_report_name_the_endpoint_and_never_the_key(ggufs, record_file, stories_path, tmp_path,
                                                                  monkeypatch, capsys, caplog):
    server = Server(ggufs["f16"], "stories", tmp_path / "keyed.log", api_key=KEY).start()
    try:
        monkeypatch.setenv("LOWBIT_TEST_KEY", KEY)
        caplog.set_level(logging.DEBUG)
        out, html = tmp_path / "r.json", tmp_path / "r.html"
        args = ["eval", "--reference-record", str(record_file), "--tokenizer", str(stories_path), "--candidate",
                server.spec(), "--kl", "--quiet", "--concurrency", "2"]
        assert cli.main([*args, "--api-key-env", "LOWBIT_TEST_KEY", "--json", str(out), "--report", str(html)]) == 0
        result = json.loads(out.read_text())
        ep = result["endpoint"]
        assert (ep["url"], ep["model"], ep["top_k"], ep["prompt_as"]) == (server.base, "stories", 20, "text")
        assert ep["positions_compared"] == result["kl"]["all"]["tokens"] > 0 and "definition" in ep
        assert result["candidate"] == server.spec() and result["size"] is None
        assert result["kl"]["worst"][0]["kl"][0] is None  # position 0 did not come back
        # a rerun takes every answer from the cache: no completions request
        assert cli.main([*args, "--api-key-env", "LOWBIT_TEST_KEY", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["endpoint"]["requests"] == 0
        # a wrong key and no key are 401s, said as such (without the key)
        monkeypatch.setenv("LOWBIT_TEST_KEY", "wrong-key")
        assert cli.main([*args, "--api-key-env", "LOWBIT_TEST_KEY", "--no-endpoint-cache"]) == 2
        assert "refused the API key in $LOWBIT_TEST_KEY (401" in capsys.readouterr().err.replace("\n", " ")
        assert cli.main([*args, "--no-endpoint-cache"]) == 2
        assert "wants an API key (401" in capsys.readouterr().err.replace("\n", " ")
        monkeypatch.delenv("LOWBIT_TEST_KEY")
        assert cli.main([*args, "--api-key-env", "LOWBIT_TEST_KEY"]) == 2
        assert "is not set" in capsys.readouterr().err
    finally:
        server.stop()
    written = [out.read_text(), html.read_text(), caplog.text, server.log.read_text()]
    written += [p.read_text() for p in (tmp_path / "cache").rglob("*.json")]
    assert not any(KEY in text for text in written)


def test_unknown_model_unreachable_server_and_a_missing_tokenizer(servers, record, record_file, stories_path,
                                                                   tmp_path):
    base = dict(reference_record=str(record_file), tokenizer=str(stories_path), kl=True, progress=False)
    with pytest.raises(LowbitError, match=r"has no model 'nope'; it serves 'f16'"):
        evaluate(EvalConfig(candidate=servers["f16"].spec("nope"), **base))
    start = time.monotonic()
    with pytest.raises(LowbitError, match=r"cannot reach the served model at http://127.0.0.1:.*connection refused"):
        evaluate(EvalConfig(candidate=f"openai+http://127.0.0.1:{_free_port()}/v1#f16", **base))
    assert time.monotonic() - start < 5  # said at once, not after minutes of retries
    with pytest.raises(LowbitError, match=r"answered 404.*base of an OpenAI-compatible API"):
        evaluate(EvalConfig(candidate=f"openai+http://127.0.0.1:{servers['f16'].port}/nope#f16", **base))
    with pytest.raises(LowbitError, match="--kl only"):
        evaluate(EvalConfig(candidate=servers["f16"].spec(), ppl=("wikitext2",), **base))
    # the tokenizer: --tokenizer, --reference, else the record's model where it is here
    result = evaluate(EvalConfig(candidate=servers["f16"].spec(), reference_record=str(record_file), kl=True,
                                 progress=False))
    assert result["endpoint"]["positions_compared"] > 0
    elsewhere = dataclasses.replace(ReferenceRecord.load(record_file), meta={**record.meta, "model": "/nowhere"})
    elsewhere.save(tmp_path / "elsewhere.safetensors")
    with pytest.raises(LowbitError, match=r"needs the reference's tokenizer here.*--tokenizer MODEL"):
        evaluate(EvalConfig(candidate=servers["f16"].spec(), reference_record=str(tmp_path / "elsewhere.safetensors"),
                            kl=True, progress=False))


def test_a_server_without_log_probs(ggufs, servers, record, stories_tokenizer, tmp_path):
    """llama-cpp-python started with --logits_all false cannot give them (it answers 500, which is not retried);
    and an answer without `logprobs` — the real server's answer to a request that asks for none — is refused by
    the response's shape."""
    server = Server(ggufs["f16"], "f16", tmp_path / "nologits.log", logits_all=False).start()
    try:
        start = time.monotonic()
        with pytest.raises(LowbitError, match=r"returns no log-probs.*--logits_all true"):
            _served(record, stories_tokenizer, server.spec())
        assert time.monotonic() - start < 10
        with pytest.raises(LowbitError, match=r"returns no log-probs.*--logits_all true"):  # nor a served reference
            served_record(parse_endpoint(server.spec()), stories_tokenizer, PROMPTS[:1], source="test",
                          max_new_tokens=4, top_n=16, options=_quick(cache=False))
    finally:
        server.stop()
    seq = record.sequence(0).tolist()
    body = {k: v for k, v in echo.request("f16", echo.prompt_text(stories_tokenizer, seq, False), 5).items()
            if k != "logprobs"}
    request = urllib.request.Request(f"{servers['f16'].base}/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        answer = json.loads(r.read())
    assert answer["choices"][0]["logprobs"] is None
    with pytest.raises(LowbitError, match="returns no log-probs"):
        echo.read(answer, seq, TokenTexts.of(stories_tokenizer), 5, "sequence 0")


def test_a_record_the_server_tokenizes_otherwise_is_refused(servers, record, stories_tokenizer, _stories):
    """A record whose ids are not what its text tokenizes to (a word split in two pieces): refused at that token,
    naming both."""
    texts = TokenTexts.of(stories_tokenizer)
    seq = record.sequence(0).tolist()
    for j, t in enumerate(seq[1:], 1):  # the first word that two other tokens spell
        word = texts.render(t)
        split = next(((a, b) for c in range(2, len(word)) if (a := texts.canonical(word[:c])) is not None
                      and (b := texts.canonical(word[c:])) is not None and texts.render(b)[:1] != " "), None)
        if split and j > 2:
            break
    bad = seq[:j] + list(split) + seq[j + 1:]
    bare = ReferenceRecord(record.meta, torch.tensor(bad, dtype=torch.int32), torch.tensor([0, len(bad)]),
                           torch.tensor([3], dtype=torch.int32))
    bad_record = compare(bare, None, _stories, progress=False).record
    with pytest.raises(LowbitError, match=rf"At token {j} the record has id {split[0]} \({texts.render(split[0])!r}\)"
                                          rf", the server {word!r}"):
        _served(bad_record, stories_tokenizer, servers["f16"].spec())


@pytest.fixture(scope="module")
def served_reference(servers, stories_tokenizer) -> ReferenceRecord:
    """The served F16 GGUF's record of PROMPTS: its greedy continuations and top-16, through the API."""
    record, run = served_record(parse_endpoint(servers["f16"].spec()), stories_tokenizer, PROMPTS, source="test",
                                max_new_tokens=SERVED_NEW_TOKENS, top_n=16, options=_quick(cache=False))
    assert run["generation"]["requests"] >= len(PROMPTS) and run["teacher_forcing"]["requests"] >= len(PROMPTS)
    return record


def test_a_served_reference_against_the_same_gguf_locally(served_reference, ggufs):
    """The served F16 GGUF as the reference, the same file evaluated locally (transformers) as the candidate: at every
    position the record holds, the KL stays within what the measured difference between llama.cpp's and
    transformers' arithmetic allows (KL over the same ids ≤ 2δ); the holes are position 0 of each sequence (llama-cpp-
    python does not return it), padded −1 / NaN and left out; the continuations are the server's greedy ones."""
    import lowbit

    record, served = served_reference, served_reference.meta["served"]
    assert record.meta["sparse"] and record.meta["top_n"] == served["top_k"] == 16
    assert served["generation"]["count_differs"] == 0 and served["positions_top_unknown"] == 0
    held = reference_returned(record)
    starts = record.position_offsets()[:-1].numpy()
    assert not held[starts].any() and held.sum() == len(held) - record.num_sequences
    assert (record.top_ids[~held] == -1).all() and torch.isnan(record.next_logprob[~held]).all()
    assert torch.isfinite(record.next_logprob[held]).all()
    # greedy: each generated token is the reference's own most likely one, up to llama.cpp's rounding
    for i in range(record.num_sequences):
        assert len(record.sequence(i)) - record.prompt_lens[i] == SERVED_NEW_TOKENS
        at = np.arange(int(record.prompt_lens[i]) - 1, len(record.sequence(i)) - 1) + starts[i]
        assert (record.top_logprobs[at, 0] - record.next_logprob[at] < 1e-4).all()

    model = lowbit.load(ggufs["f16"])
    d = compare(record, model, None, progress=False).divergence
    assert len(d.prompt) == held.sum()
    delta, _, gap = _engine_gap(ggufs["f16"], record, model)
    at = starts[d.prompt] + d.position
    assert (d.stats.kl <= 2 * delta[at] + 1e-5).all(), (d.stats.kl - 2 * delta[at]).max()
    assert (gap[at][d.stats.rejected > 0] <= 2 * delta[at][d.stats.rejected > 0] + 1e-5).all()
    assert d.stats.kl.mean() <= 2 * delta[at].mean()


def test_a_served_reference_ranks_a_quantized_gguf_as_locally(served_reference, servers, ggufs, stories_tokenizer):
    """Against the served F16 reference, Q4_0 is far from F16 — evaluated locally or served — as against a local
    reference; served candidates are compared on the positions both servers returned."""
    import lowbit

    record = served_reference
    means = {}
    for name in ("f16", "q4"):
        local = compare(record, lowbit.load(ggufs[name]), None, progress=False).divergence
        served, info, _ = _served(record, stories_tokenizer, servers[name].spec())
        assert info["positions_not_in_reference"] == record.num_sequences == info["positions_not_returned"]
        assert info["positions_compared"] == len(served.prompt) == len(local.prompt)  # the same holes
        means[name] = [float(x) for x in (local.stats.kl.mean(), served.stats.kl.mean(), local.stats.rejected.mean(),
                                          served.stats.rejected.mean())]
    assert means["q4"][0] > 10 * means["f16"][0] and means["q4"][1] > 10 * means["f16"][1]
    assert means["q4"][2] > means["f16"][2] and means["q4"][3] > means["f16"][3]


def test_a_served_reference_record_round_trips(ggufs, stories_path, tmp_path, monkeypatch):
    """`--reference openai+… --save-reference FILE` and then `--reference-record FILE`: the same numbers; a rerun of
    the first takes the generations and log-probs from the cache; the API key is in no file."""
    server = Server(ggufs["f16"], "f16", tmp_path / "ref.log", api_key=KEY).start()
    try:
        monkeypatch.setenv("LOWBIT_TEST_KEY", KEY)
        prompts, saved = tmp_path / "prompts.txt", tmp_path / "served.safetensors"
        prompts.write_text("\n".join(PROMPTS))
        candidate = ["--candidate", str(ggufs["q4"]), "--kl", "--quiet"]
        served = ["--reference", server.spec(), "--tokenizer", str(stories_path), "--api-key-env", "LOWBIT_TEST_KEY",
                  "--prompts", str(prompts), "--max-new-tokens", str(SERVED_NEW_TOKENS)]
        outs = [tmp_path / f"{n}.json" for n in ("made", "reused", "again")]
        assert cli.main(["eval", *served, *candidate, "--save-reference", str(saved), "--json", str(outs[0])]) == 0
        assert cli.main(["eval", "--reference-record", str(saved), *candidate, "--json", str(outs[1])]) == 0
        assert cli.main(["eval", *served, *candidate, "--json", str(outs[2])]) == 0
    finally:
        server.stop()
    made, reused, again = (json.loads(p.read_text()) for p in outs)
    ref = made["reference_endpoint"]
    assert (ref["url"], ref["model"], ref["top_k"], made["kl"]["top_n"]) == (server.base, "f16", 16, 16)
    assert ref["positions_compared"] == made["kl"]["all"]["tokens"] == ref["positions"] - len(PROMPTS)
    assert "definition" in ref and ref["run"]["generation"]["requests"] > 0
    assert again["reference_endpoint"]["run"]["generation"]["requests"] == 0
    assert again["reference_endpoint"]["run"]["teacher_forcing"]["requests"] == 0
    assert "run" not in reused["reference_endpoint"]
    assert made["kl"]["all"]["mean"] > 0
    assert reused["kl"] == made["kl"] == again["kl"]
    record = ReferenceRecord.load(saved)
    assert record.meta["served"]["url"] == server.base and record.meta["model"] == server.spec()
    written = [saved.read_bytes(), *(p.read_bytes() for p in outs)]
    written += [p.read_bytes() for p in (tmp_path / "cache").rglob("*.json")]
    assert not any(KEY.encode() in b for b in written)


def test_a_served_reference_refuses_what_it_cannot_do(servers, served_reference, stories_path, tmp_path):
    spec = servers["f16"].spec()
    base = dict(reference=spec, candidate=str(stories_path), kl=True, progress=False)
    with pytest.raises(LowbitError, match=r"a served reference needs --tokenizer MODEL"):
        evaluate(EvalConfig(**base))
    for asked in ({"ppl": ("wikitext2",)}, {"tasks": ("piqa",)}):
        with pytest.raises(LowbitError, match=r"--kl only.*--ppl and --tasks need the reference model's full"):
            evaluate(EvalConfig(**base, tokenizer=str(stories_path), **asked))
    assert cli.main(["eval", "--reference", spec, "--candidate", str(stories_path), "--kl", "--quiet"]) == 2
    # a record and a reference that are not the same model
    served_reference.save(tmp_path / "served.safetensors")
    with pytest.raises(LowbitError, match=r"made by the served model .* would be a second reference"):
        evaluate(EvalConfig(reference=str(stories_path), reference_record=str(tmp_path / "served.safetensors"),
                            candidate=str(stories_path), kl=True, progress=False))
    with pytest.raises(LowbitError, match=r"the reference record was made by .*, not by --reference"):
        evaluate(EvalConfig(**{**base, "reference": servers["q4"].spec()}, tokenizer=str(stories_path),
                            reference_record=str(tmp_path / "served.safetensors")))


def _same_numbers(d, e) -> None:
    """The same statistics. Measured: identical to the bit. 1e-5 is allowed where llama.cpp's arithmetic may depend
    on how a prompt is split into batches: llama-cpp-python reuses the KV cache of the common prefix with the prompt
    before, so a prompt that follows another one, or comes first after a restart, is evaluated in other pieces."""
    for name in ("kl", "spec_rejection", "dp"):
        np.testing.assert_allclose(getattr(d.stats, name), getattr(e.stats, name), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(d.stats.rejected, e.stats.rejected)
    np.testing.assert_array_equal(d.position, e.position)


def test_server_killed_mid_run_is_waited_for_and_a_failed_run_resumes(ggufs, servers, record, stories_tokenizer,
                                                                      tmp_path, caplog):
    """SIGKILL the server after two answers and start it again on the same port: the run retries (a log line each
    time) and ends with an uninterrupted run's numbers (up to llama.cpp's rounding, `_same_numbers`). Killed for
    longer than the retries last, the run fails saying so, keeps what it had, and the rerun asks only for the
    rest."""
    uninterrupted, _, _ = _served(record, stories_tokenizer, servers["f16"].spec(), cache=False)
    server = Server(ggufs["f16"], "f16", tmp_path / "fault.log").start()
    cache = tmp_path / "cache" / "served"
    done: dict = {}

    def run(**kw):
        try:
            done["result"] = _served(record, stories_tokenizer, server.spec(), concurrency=1, **kw)
        except Exception as e:  # handed to the test's thread
            done["error"] = e

    def answers_saved() -> int:
        return len(list(cache.rglob("seq-*.json")))

    caplog.set_level(logging.WARNING, logger="lowbit.eval.served")
    try:
        worker = threading.Thread(target=run)
        worker.start()
        while answers_saved() < 2 and worker.is_alive():
            time.sleep(0.01)
        server.kill()
        assert worker.is_alive(), "the run ended before the server was killed"
        time.sleep(1.0)
        server.start()
        worker.join(60)
        assert "error" not in done, done.get("error")
        d, info, _ = done["result"]
        # every sequence once, and the first once more: as token ids, which llama-cpp-python does not take
        assert "retry 1 in" in caplog.text and info["requests"] == record.num_sequences + 1
        _same_numbers(d, uninterrupted)

        for f in cache.rglob("seq-*.json"):  # again from the third answer on; this time the server stays away
            if int(f.stem.split("-")[1]) >= 3:
                f.unlink()
        done.clear()
        worker = threading.Thread(target=run, kwargs={"total": 1.0})
        worker.start()
        while answers_saved() < 6 and worker.is_alive():
            time.sleep(0.01)
        server.kill()
        worker.join(60)
        assert isinstance(done.get("error"), LowbitError), done
        assert "stopped answering" in str(done["error"]) and "run the same command again" in str(done["error"])
        assert not [p for p in cache.rglob("*") if "partial" in p.name]  # nothing half-written
        kept = answers_saved()
        assert 6 <= kept < record.num_sequences
        server.start()
        run()
        d, info, _ = done["result"]
        assert info["sequences_from_cache"] == kept and info["requests"] == record.num_sequences - kept
        _same_numbers(d, uninterrupted)
    finally:
        server.stop()


def test_the_record_and_the_config_stay_values(servers, record, stories_tokenizer):
    tokens = record.tokens.clone()
    cfg = EvalConfig(candidate=servers["f16"].spec())
    _served(record, stories_tokenizer, servers["f16"].spec(), cache=False)
    assert torch.equal(record.tokens, tokens)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.served.top_k = 3  # type: ignore[misc]
    assert os.environ["LOWBIT_CACHE"]
