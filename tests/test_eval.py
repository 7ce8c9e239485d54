"""The evaluation on stories260K: divergence, records, perplexity, tasks, CLI contract and bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from lowbit import api, cli
from lowbit.errors import LowbitError
from lowbit.eval import tasks as tasks_mod
from lowbit.eval.divergence import compare, make_record, summarize_divergence
from lowbit.eval.perplexity import compare_ppl, ppl, token_nll, windows
from lowbit.eval.prompts import load_prompts
from lowbit.eval.record import ReferenceRecord, model_fingerprint
from lowbit.eval.runner import EvalConfig
from lowbit.recipe import Recipe

PROMPTS = ["Once upon a time, there was a little dog.", "Tom and Sue went to the park.",
           "The sun was hot and the bird", "Lily had a red ball. One day"]


@pytest.fixture(scope="module")
def record(_stories, stories_tokenizer):
    return make_record(_stories, stories_tokenizer, PROMPTS, source="test", model_name="stories",
                       max_new_tokens=24, progress=False)


@pytest.fixture(scope="module")
def w3_model(_stories):
    return api.quantize(copy.deepcopy(_stories), Recipe(scheme="w3a16", group_size=0), progress=False).model


def test_identical_candidate_gives_zero(record, _stories):
    d = compare(record, copy.deepcopy(_stories), _stories, progress=False).divergence
    s = summarize_divergence(d, 16)
    for split in ("all", "prefill", "generation"):
        assert s[split]["mean"] == pytest.approx(0, abs=1e-7)
        assert s[split]["mean_full"] == pytest.approx(0, abs=1e-7)
        assert s[split]["token_rejection_rate"] == 0 and s[split]["same_top"] == 1
        assert s[split]["rms_dp"] == pytest.approx(0, abs=1e-7)


def test_the_record_is_a_value(record, _stories, w3_model):
    """compare leaves the record it was given as it was and returns the one it completed; a record and an
    evaluation's configuration cannot be changed in place."""
    assert record.top_ids is None
    tokens = record.tokens.clone()
    comparison = compare(record, w3_model, _stories, progress=False)
    assert record.top_ids is None and torch.equal(record.tokens, tokens)
    filled = comparison.record
    assert filled.top_ids.shape == (int(record.position_offsets()[-1]), 16) and filled.tokens is record.tokens
    again = compare(filled, w3_model, None, progress=False)
    assert again.record is filled
    np.testing.assert_array_equal(again.divergence.stats.kl, comparison.divergence.stats.kl)
    with pytest.raises(dataclasses.FrozenInstanceError):
        filled.top_ids = None
    with pytest.raises(TypeError):
        filled.extras["x"] = torch.zeros(1)
    with pytest.raises(TypeError):
        filled.meta["top_n"] = 3
    more = filled.with_extras(x=torch.zeros(1))
    assert "x" in more.extras and "x" not in filled.extras
    with pytest.raises(dataclasses.FrozenInstanceError):
        EvalConfig(reference="x").kl = True


def test_fingerprint_ignores_where_the_model_came_from(_stories, tmp_path):
    """The same weights saved in another directory match (a record made from one cache serves the other);
    one changed weight does not."""
    _stories.save_pretrained(tmp_path / "copy")
    moved = type(_stories).from_pretrained(tmp_path / "copy")
    assert moved.config._name_or_path != _stories.config._name_or_path
    assert model_fingerprint(moved) == model_fingerprint(_stories)
    with torch.no_grad():
        next(moved.parameters()).view(-1)[0] += 1
    assert model_fingerprint(moved) != model_fingerprint(_stories)


def test_shared_prompt_prefix_is_counted_once(_stories, stories_tokenizer, w3_model):
    """Prompts that open with the same text: the common prefix is found, its KL reported once, and the prefill
    statistics without it average exactly the other prefill positions."""
    prompts = ["Once upon a time, " + p for p in PROMPTS]
    rec = make_record(_stories, stories_tokenizer, prompts, source="test", model_name="stories", max_new_tokens=8,
                      progress=False)
    d = compare(rec, w3_model, _stories, progress=False).divergence
    assert d.shared == len(stories_tokenizer("Once upon a time,").input_ids)
    s = summarize_divergence(d, 16)
    first = (d.prompt == 0) & (d.position < d.shared)
    assert s["shared_prefix"]["mean"] == pytest.approx(float(d.stats.kl[first].mean()))
    for i in range(1, len(prompts)):  # the same predictions in every prompt
        np.testing.assert_allclose(d.stats.kl[(d.prompt == i) & (d.position < d.shared)], d.stats.kl[first],
                                   rtol=1e-4, atol=1e-6)
    rest = d.prefill & (d.position >= d.shared)
    assert s["prefill_unshared"]["mean"] == pytest.approx(float(d.stats.kl[rest].mean()))
    one = compare(rec.first(1), w3_model, _stories, progress=False).divergence
    assert "shared_prefix" not in summarize_divergence(one, 16)


def test_first_prompts_of_a_record(record, _stories, w3_model):
    """--max-prompts on a saved record: its first n sequences, scored exactly as they are inside the whole one."""
    sub = record.first(2)
    assert sub.num_sequences == 2 and sub.meta["num_prompts"] == 2
    assert torch.equal(sub.sequence(1), record.sequence(1))
    whole = compare(record, w3_model, _stories, progress=False).divergence
    part = compare(sub, w3_model, _stories, progress=False).divergence
    mine = whole.prompt < 2
    np.testing.assert_allclose(part.stats.kl, whole.stats.kl[mine], rtol=1e-4, atol=1e-6)
    assert (part.prefill == whole.prefill[mine]).all()
    with pytest.raises(LowbitError, match="cannot take the first 9"):
        record.first(9)


def test_generation_and_split(record, _stories, stories_tokenizer, w3_model):
    lengths = (record.offsets[1:] - record.offsets[:-1]).tolist()
    assert all(p < n <= p + 24 for p, n in zip(record.prompt_lens.tolist(), lengths, strict=True))
    rec, d = (lambda c: (c.record, c.divergence))(compare(record, w3_model, _stories, progress=False))
    s = summarize_divergence(d, 16)
    assert s["prefill"]["tokens"] == int((record.prompt_lens - 1).sum())
    assert s["generation"]["tokens"] == sum(n - p for p, n in zip(record.prompt_lens.tolist(), lengths, strict=True))
    assert s["all"]["tokens"] == s["prefill"]["tokens"] + s["generation"]["tokens"]
    assert 0 < s["all"]["mean"] < s["all"]["mean_full"] * 2
    assert sum(b["tokens"] for b in s["by_position"]) == s["generation"]["tokens"]
    # greedy generation picked the reference's top token: teacher forcing agrees at (almost) every generated token
    agree = []
    for i in range(rec.num_sequences):
        seq, start = rec.sequence(i).long(), int(rec.position_offsets()[i])
        p = int(rec.prompt_lens[i])
        agree += (rec.top_ids[start + p - 1:start + len(seq) - 1, 0].long() == seq[p:]).tolist()
    assert len(agree) == s["generation"]["tokens"] and np.mean(agree) > 0.95


def test_batching_does_not_change_results(record, _stories, w3_model):
    small = compare(record, w3_model, _stories, batch_tokens=40, progress=False).divergence
    large = compare(record, w3_model, _stories, batch_tokens=100_000, progress=False).divergence
    np.testing.assert_allclose(small.stats.kl, large.stats.kl, rtol=1e-4, atol=1e-6)


def test_record_round_trip(record, _stories, w3_model, tmp_path, stories_tokenizer):
    comparison = compare(record, w3_model, _stories, progress=False)
    rec, in_memory = comparison.record, comparison.divergence
    rec.save(tmp_path / "r.safetensors")
    loaded = ReferenceRecord.load(tmp_path / "r.safetensors")
    loaded.check_tokenizer(stories_tokenizer, "reference")
    again = compare(loaded, w3_model, None, progress=False).divergence
    np.testing.assert_array_equal(in_memory.stats.kl, again.stats.kl)
    assert again.stats.kl_full is None
    rec.save(tmp_path / "r16.safetensors", torch.float16)
    half = compare(ReferenceRecord.load(tmp_path / "r16.safetensors"), w3_model, None, progress=False).divergence
    np.testing.assert_allclose(half.stats.kl.mean(), in_memory.stats.kl.mean(), rtol=1e-2)
    assert (tmp_path / "r16.safetensors").stat().st_size < (tmp_path / "r.safetensors").stat().st_size


def test_long_prompts_are_truncated_to_the_context(_stories, stories_tokenizer):
    rec = make_record(_stories, stories_tokenizer, ["Once upon a time " * 200, "Tom ran."], source="test",
                      model_name="stories", max_new_tokens=32, progress=False)
    assert rec.meta["truncated_prompts"] == 1
    assert max(len(rec.sequence(i)) for i in range(2)) <= 512
    with pytest.raises(LowbitError, match="no room for a prompt"):
        make_record(_stories, stories_tokenizer, ["x"], source="t", model_name="s", max_new_tokens=510,
                    progress=False)


def test_record_from_another_tokenizer_is_refused(record, stories_tokenizer):
    other = copy.deepcopy(stories_tokenizer)
    other.add_tokens(["<an-extra-token>"])
    with pytest.raises(LowbitError, match="another tokenizer"):
        record.check_tokenizer(other, "candidate")


def test_prompt_sets(tmp_path):
    prompts, source = load_prompts()
    assert len(prompts) == 160 and "MT-bench" in source
    assert load_prompts("mt_bench", 5)[0][0].startswith("Compose an engaging travel blog post")
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert load_prompts(str(tmp_path / "p.txt"))[0] == ["first", "second"]
    with pytest.raises(LowbitError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(LowbitError, match="empty"):
        load_prompts(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"question": 1}\n')
    with pytest.raises(LowbitError, match="no 'turns'"):
        load_prompts(str(tmp_path / "bad.jsonl"))


def test_perplexity_matches_a_plain_transformers_loop(_stories, stories_tokenizer):
    wins = windows(stories_tokenizer, "wikitext2", 512, 3)
    ours = ppl(token_nll(_stories, wins, progress=False))
    with torch.no_grad():
        losses = [_stories(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in wins]
    assert ours == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)


def test_perplexity_ratio(_stories, stories_tokenizer, w3_model):
    wins = windows(stories_tokenizer, "ptb", 256, 2)
    ref = token_nll(_stories, wins, progress=False)
    assert compare_ppl(ref, ref)["ln_ratio"] == 0
    r = compare_ppl(ref, token_nll(w3_model, wins, progress=False))
    assert r["ln_ratio"] > 0 and 0 < r["ln_ratio_stderr"] < r["ln_ratio"]
    assert windows(stories_tokenizer, "c4", 256, 1).shape == (1, 256)


@torch.no_grad()
def _direct_loglik(model, tokenizer, context: str, continuation: str) -> float:
    whole = tokenizer(context + continuation)["input_ids"]
    n_ctx = len(tokenizer(context)["input_ids"])
    lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(lp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


@pytest.mark.parametrize("task", ["piqa", "winogrande", "mmlu", "hellaswag"])
def test_task_scores_equal_direct_computation(task, _stories, stories_tokenizer):
    items = tasks_mod.load_task(task, 3)
    for item in items:
        reqs = tasks_mod.encode_item(stories_tokenizer, item, 512)
        got = np.concatenate([r[0] for r in tasks_mod.score(_stories, reqs, progress=False)])
        want = [_direct_loglik(_stories, stories_tokenizer, c, t) for c, t in
                zip(item.contexts, item.continuations, strict=True)]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_single_token_choices_share_one_pass(_stories, stories_tokenizer):
    context = "Once upon a time, there was a little girl. She went to"
    item = tasks_mod.Item((context,) * 3, (" the", " a", " and"), 0)
    reqs = tasks_mod.encode_item(stories_tokenizer, item, 512)
    assert len(reqs) == 1 and len(reqs[0].targets) == 3
    got = tasks_mod.score(_stories, reqs, progress=False)[0][0]
    want = [_direct_loglik(_stories, stories_tokenizer, context, c) for c in item.continuations]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_task_limits_and_formats():
    items = tasks_mod.load_task("mmlu", 57)
    assert len(items) == 57 and len({it.contexts[0].split(" about ")[1].split(".")[0] for it in items}) > 40
    assert tasks_mod.load_task("piqa", 5) == tasks_mod.load_task("piqa", 5)
    piqa = tasks_mod.load_task("piqa")[0]
    assert piqa.contexts[0].endswith("\nAnswer:") and piqa.continuations[0].startswith(" ")
    lam = tasks_mod.load_task("lambada_openai", 2)[0]
    assert lam.greedy and len(lam.continuations) == 1
    five = tasks_mod.load_task("mmlu_5shot", 1)[0]
    assert five.contexts[0].count("Answer:") == 6
    with pytest.raises(LowbitError, match="unknown task"):
        tasks_mod.load_task("trivia")


DESIGN_KL_FIELDS = {"tokens", "mean", "ci95", "mean_full", "median", "p99", "max", "token_rejection_rate",
                    "spec_rejection", "same_top", "rms_dp"}


def test_cli_json_has_every_design_key(capsys, stories_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert cli.main(["quantize", str(stories_path), "--scheme", "w4a16", "--group-size", "0", "--out", str(ckpt),
                     "--quiet"]) == 0
    out, report, rec = tmp_path / "out.json", tmp_path / "r.html", tmp_path / "ref.safetensors"
    args = ["eval", "--reference", str(stories_path), "--candidate", str(ckpt), "--kl", "--ppl", "wikitext2",
            "--tasks", "piqa", "--max-prompts", "3", "--max-new-tokens", "16", "--max-windows", "2", "--limit", "10",
            "--json", str(out), "--report", str(report), "--save-reference", str(rec), "--quiet"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "prefill" in printed and "generation" in printed and "piqa" in printed
    result = json.loads(out.read_text())
    assert {"reference", "candidate", "kl", "ppl", "tasks", "size"} <= set(result)
    assert {"top_n", "prompts", "all", "prefill", "generation", "by_position"} <= set(result["kl"])
    for split in ("all", "prefill", "generation"):
        assert DESIGN_KL_FIELDS <= set(result["kl"][split])
    assert {"start", "end", "mean", "tokens"} <= set(result["kl"]["by_position"][0])
    assert {"reference", "candidate", "seqlen", "windows", "tokens"} <= set(result["ppl"]["wikitext2"])
    assert result["ppl"]["wikitext2"]["seqlen"] == 512  # capped at the model's context
    assert {"n", "reference", "candidate", "flips"} <= set(result["tasks"]["piqa"])
    assert {"bits_per_weight", "bytes"} <= set(result["size"])
    page = report.read_text()
    assert result["kl"]["prompts"] == 3 and page.count("<img") == 2 and page.count("<svg") == 1

    # the record is reused: the same numbers without the reference model (no full KL then)
    again = tmp_path / "again.json"
    assert cli.main(["eval", "--reference-record", str(rec), "--candidate", str(ckpt), "--kl", "--ppl", "wikitext2",
                     "--tasks", "piqa", "--max-windows", "2", "--limit", "10", "--json", str(again), "--quiet"]) == 0
    second = json.loads(again.read_text())
    assert second["kl"]["all"]["mean"] == pytest.approx(result["kl"]["all"]["mean"], rel=1e-6)
    assert second["kl"]["all"]["mean_full"] is None
    assert second["ppl"]["wikitext2"]["reference"] == pytest.approx(result["ppl"]["wikitext2"]["reference"])
    assert second["tasks"]["piqa"]["reference"] == result["tasks"]["piqa"]["reference"]


def test_many_candidates_into_a_folder_resume(capsys, stories_path, tmp_path, monkeypatch):
    """Several candidates into one folder: the reference recorded once, each candidate's results written as it
    finishes; a run killed on the second candidate is rerun and evaluates only that one and the ones after it, with
    the same numbers as a run that was never killed. A changed candidate is evaluated again."""
    from lowbit.eval import many

    ckpts = []
    for bits in (3, 4, 8):
        ckpts.append(str(tmp_path / f"w{bits}"))
        assert cli.main(["quantize", str(stories_path), "--scheme", f"w{bits}a16", "--group-size", "0", "--out",
                         ckpts[-1], "--quiet"]) == 0
    common = ["eval", "--reference", str(stories_path), "--kl", "--max-prompts", "3", "--max-new-tokens", "12",
              "--quiet", *[a for c in ckpts for a in ("--candidate", c)]]
    assert cli.main([*common, "--out", str(tmp_path / "whole")]) == 0
    whole = {p.name: json.loads(p.read_text()) for p in (tmp_path / "whole").glob("*.json")}
    assert sorted(whole) == ["w3.json", "w4.json", "w8.json"] and (tmp_path / "whole" / "report.html").is_file()
    assert whole["w3.json"]["kl"]["all"]["mean"] > whole["w8.json"]["kl"]["all"]["mean"]

    real, seen = many.evaluate, []

    def killed_on_the_second(cfg):
        seen.append(cfg.candidate)
        if cfg.candidate == ckpts[1]:
            raise KeyboardInterrupt
        return real(cfg)

    monkeypatch.setattr(many, "evaluate", killed_on_the_second)
    assert cli.main([*common, "--out", str(tmp_path / "q")]) == 130
    assert sorted(p.name for p in (tmp_path / "q").glob("*.json")) == ["w3.json"]
    monkeypatch.setattr(many, "evaluate", lambda cfg: (seen.append(cfg.candidate), real(cfg))[1])
    seen.clear()
    assert cli.main([*common, "--out", str(tmp_path / "q")]) == 0
    assert seen == ckpts[1:]  # w3 was finished: kept, not evaluated again
    assert "done before, kept" in capsys.readouterr().err
    for name, result in whole.items():
        again = json.loads((tmp_path / "q" / name).read_text())
        assert again["kl"]["all"]["mean"] == pytest.approx(result["kl"]["all"]["mean"], rel=1e-6), name
    seen.clear()
    assert cli.main(["quantize", str(stories_path), "--scheme", "w8a16", "--group-size", "0", "--out", ckpts[2],
                     "--quiet", "--overwrite", "--asym"]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "q")]) == 0
    assert seen == [ckpts[2]]  # only the candidate whose files changed
    code = cli.main([*common, "--json", str(tmp_path / "x.json")])
    assert code == 2 and "give --out DIR" in capsys.readouterr().err


def _tiny_llama_with_vocab(path, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
                     ).save_pretrained(path)


def test_eval_bad_inputs(capsys, stories_path, tmp_path):
    m = str(stories_path)
    _tiny_llama_with_vocab(tmp_path / "other-vocab", 600)
    (tmp_path / "empty.txt").write_text("\n")
    cases = [
        (["--reference", m, "--candidate", m, "--kl", "--prompts", str(tmp_path / "nope.jsonl")], "does not exist"),
        (["--reference", m, "--candidate", m, "--kl", "--prompts", str(tmp_path / "empty.txt")], "is empty"),
        (["--reference", m, "--candidate", str(tmp_path / "other-vocab"), "--ppl", "wikitext2"],
         "vocabulary has 600 tokens and the reference's 512"),
        (["--reference", m, "--candidate", m], "nothing to evaluate"),
        (["--candidate", m, "--kl"], "give a reference"),
        (["--reference", m, "--candidate", m, "--tasks", "trivia"], "unknown task 'trivia'"),
        (["--reference-record", str(tmp_path / "none.safetensors"), "--candidate", m, "--kl"], "does not exist"),
        (["--reference", m, "--candidate", m, "--ppl", "nosuchset"], "unknown perplexity set"),
    ]
    for argv, message in cases:
        code = cli.main(["eval", *argv, "--quiet"])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_kl_on_a_fixed_text(capsys, stories_path, tmp_path):
    """--kl-text: every position is prefill; an identical candidate gives exactly zero."""
    out = tmp_path / "t.json"
    m = str(stories_path)
    assert cli.main(["eval", "--reference", m, "--candidate", m, "--kl-text", "wikitext2", "--max-windows", "2",
                     "--json", str(out), "--quiet"]) == 0
    k = json.loads(out.read_text())["kl_text"]["wikitext2"]
    assert k["windows"] == 2 and k["generation"]["tokens"] == 0 and k["prefill"]["tokens"] == 2 * 511
    assert k["all"]["mean"] == 0 and k["all"]["same_top"] == 1


def test_a_record_without_generations_round_trips(capsys, stories_path, tmp_path):
    rec = tmp_path / "ppl-only.safetensors"
    m = str(stories_path)
    assert cli.main(["eval", "--reference", m, "--save-reference", str(rec), "--ppl", "ptb", "--max-windows", "1",
                     "--quiet"]) == 0
    assert cli.main(["eval", "--reference-record", str(rec), "--candidate", m, "--ppl", "ptb", "--max-windows", "1",
                     "--quiet"]) == 0
    code = cli.main(["eval", "--reference-record", str(rec), "--candidate", m, "--kl", "--quiet"])
    assert code == 2 and "holds no generations" in capsys.readouterr().err


def test_a_record_from_another_reference_model_is_refused(capsys, stories_path, tmp_path):
    rec, m = tmp_path / "r.safetensors", str(stories_path)
    assert cli.main(["eval", "--reference", m, "--save-reference", str(rec), "--kl", "--max-prompts", "2",
                     "--max-new-tokens", "8", "--quiet"]) == 0
    other = tmp_path / "w8"
    assert cli.main(["quantize", m, "--scheme", "w8a16", "--out", str(other), "--quiet"]) == 0
    code = cli.main(["eval", "--reference", str(other), "--reference-record", str(rec), "--candidate", m, "--kl",
                     "--quiet"])
    assert code == 2 and "made by another model" in " ".join(capsys.readouterr().err.split())
