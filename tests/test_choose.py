"""Choosing: the budget allocator and the Pareto frontier against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from lowbit.choose.allocate import Choice, allocate, smallest_bits
from lowbit.choose.pareto import dominates, frontier
from lowbit.errors import LowbitError
from lowbit.io.checkpoint import weight_files


def _instance(rng: random.Random, n_layers: int, n_choices: int) -> dict[str, list[Choice]]:
    layers = {}
    for i in range(n_layers):
        size = rng.choice([64, 96, 128])
        opts = []
        for b in rng.sample([2, 3, 4, 5, 6, 8, 16], n_choices):
            bits = size * b + rng.choice([0, 16, 32])  # statistics
            opts.append(Choice(f"{b}-bit", bits, 0.0 if b == 16 else rng.random() / b))
        layers[f"layer{i}"] = opts
    return layers


def _brute(layers: dict[str, list[Choice]], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*layers.values()):
        if sum(c.bits for c in combo) <= budget:
            best = min(best, sum(c.cost for c in combo))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_allocation_is_optimal_and_within_budget(seed):
    rng = random.Random(seed)
    layers = _instance(rng, rng.randint(1, 5), rng.randint(1, 4))
    lo, hi = smallest_bits(layers), sum(max(c.bits for c in o) for o in layers.values())
    for budget in sorted({lo, hi, rng.randint(lo, hi), rng.randint(lo, hi)}):
        a = allocate(layers, budget)
        assert a.exact and a.bits <= budget
        assert a.bits == sum(c.bits for c in a.choices.values()) and list(a.choices) == list(layers)
        assert a.cost == pytest.approx(_brute(layers, budget), abs=1e-12)


def test_coarse_resolution_never_exceeds_the_budget():
    rng = random.Random(7)
    layers = _instance(rng, 6, 4)
    lo, hi = smallest_bits(layers), sum(max(c.bits for c in o) for o in layers.values())
    for budget in range(lo + 50, hi, 97):
        a = allocate(layers, budget, max_states=40)
        assert a.bits <= budget
        assert a.cost >= _brute(layers, budget) - 1e-12


def test_impossible_budget_is_explained():
    layers = {"a": [Choice("4-bit", 400, 0.1), Choice("16-bit", 1600, 0.0)]}
    with pytest.raises(LowbitError, match="below the smallest allocation, 400 bits"):
        allocate(layers, 399)
    with pytest.raises(LowbitError, match="at least one choice"):
        allocate({"a": []}, 1000)


@pytest.mark.parametrize("seed", range(20))
def test_frontier_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(0, 30)
    dims = 2 if seed % 3 else 3
    pts = [tuple(float(rng.randint(0, 6)) for _ in range(dims)) for _ in range(n)]
    brute = [i for i, p in enumerate(pts) if not any(dominates(q, p) for q in pts)]
    assert sorted(frontier(pts)) == brute
    got = frontier(pts)
    assert [pts[i][0] for i in got] == sorted(pts[i][0] for i in got)


def test_margins_are_paired_token_weighted_differences():
    import numpy as np

    from lowbit.choose.frontier import margins, margins_markdown

    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 60, size=40)
    uniform = rng.gamma(2.0, 0.05, size=40)
    per_prompt = {"mixed": uniform * 0.8 + rng.normal(0, 0.002, 40), "u3.9": uniform * 2, "u4": uniform,
                  "u4.5": uniform * 0.8 + rng.normal(0, 0.002, 40)}

    def row(label, bpw, mixed=False):
        kl = float((per_prompt[label] * tokens).sum() / tokens.sum())
        return {"label": label, "point": {"target_bpw": 4.0 if mixed else None}, "bits_per_weight": bpw, "kl": kl}

    results = [row("mixed", 3.99, True), row("u3.9", 3.9), row("u4", 4.0), row("u4.5", 4.5),
               {"label": "failed", "point": {}, "error": "x"}]
    rows = margins(results, {k: list(v) for k, v in per_prompt.items()}, tokens)
    assert [r["uniform"] for r in rows] == ["u4", "u4.5"]  # only points with as many bits per weight or more
    kl = {r["label"]: r["kl"] for r in results if "kl" in r}
    for r in rows:
        assert r["margin"] == pytest.approx(kl[r["uniform"]] - kl["mixed"], rel=1e-12)
        assert r["margin_ci95"][0] <= r["margin"] <= r["margin_ci95"][1]
    assert rows[0]["margin_ci95"][0] > 0  # 20% less KL on every prompt: the interval excludes zero
    assert rows[1]["margin_ci95"][0] < 0 < rows[1]["margin_ci95"][1]  # the same KL up to noise: it does not
    same = margins([row("mixed", 3.99, True), {**row("mixed", 4.0), "label": "copy", "point": {}}],
                   {"mixed": per_prompt["mixed"], "copy": per_prompt["mixed"]}, tokens)
    assert same[0]["margin"] == 0 and same[0]["margin_ci95"] == [0.0, 0.0]
    assert "| mixed | 3.990 | u4 | 4.000 | +" in margins_markdown(rows)


@pytest.fixture(scope="module")
def stories_probe(_stories, stories_tokenizer):
    import copy

    from lowbit.choose.sensitivity import probe
    from lowbit.eval.divergence import make_record
    from lowbit.eval.prompts import load_prompts
    from lowbit.methods.registry import get_method
    from lowbit.model.loading import family_of
    from lowbit.model.targets import select_layers
    from lowbit.recipe import Recipe

    model = copy.deepcopy(_stories)
    texts, source = load_prompts(None, 3)
    record = make_record(model, stories_tokenizer, texts, source=source, model_name="stories", max_new_tokens=24,
                         progress=False)
    plan = select_layers(model, family_of(model), Recipe(scheme="w2a16", group_size=0))
    return probe(model, family_of(model), record, plan, get_method("rtn"), 16, progress=False), record, plan


def test_measured_kl_equals_lowbit_eval_of_that_layer_alone(stories_probe, stories_tokenizer):
    from lowbit.api import fake_quantize_model
    from lowbit.choose.sensitivity import measure_kl
    from lowbit.eval.divergence import compare
    from lowbit.formats import fake_quantize

    pr, record, plan = stories_probe
    name = "model.layers.2.mlp.up_proj"
    weight = pr.model.get_submodule(name).weight.detach()
    ours = measure_kl(pr, {name: fake_quantize(weight, plan[name].weight)})
    theirs = compare(record, fake_quantize_model(pr.model, {name: plan[name]}), reference=pr.model, progress=False)
    assert ours == pytest.approx(float(theirs.divergence.stats.kl.mean()), rel=1e-5)
    assert ours > 1e-4
    assert measure_kl(pr, {name: weight.clone()}) == 0.0


def test_fisher_estimate_matches_its_formula_and_ranks_the_layers(stories_probe):
    import torch

    from lowbit.choose.sensitivity import group_units, rank_correlation, sensitivity, statistics
    from lowbit.methods.registry import get_method
    from lowbit.model.loading import family_of

    pr, record, plan = stories_probe
    name = "model.layers.1.self_attn.v_proj"
    # G_r against autograd of the summed log-likelihood with respect to the layer's output, sequence by sequence
    layer = pr.model.get_submodule(name)
    expect = torch.zeros(layer.out_features, dtype=torch.float64)
    for i in range(record.num_sequences):
        ids = record.sequence(i).long()[None]
        out = {}
        handle = layer.register_forward_hook(lambda _m, _a, o, out=out: out.setdefault("y", o))
        emb = pr.model.get_input_embeddings()
        h2 = emb.register_forward_hook(lambda _m, _a, o: o.requires_grad_(True))
        with torch.enable_grad():
            lp = torch.log_softmax(pr.model(input_ids=ids, use_cache=False).logits.float(), -1)
            loss = lp[0, :-1].gather(-1, ids[0, 1:, None]).sum()
            (g,) = torch.autograd.grad(loss, out["y"])
        handle.remove()
        h2.remove()
        expect += g.double().pow(2).flatten(0, -2).sum(0)
    seqs = [record.sequence(i).long()[None] for i in range(record.num_sequences)]
    for p in pr.model.parameters():
        p.grad = None
    wanted = [p.requires_grad for p in pr.model.parameters()]
    got = statistics(pr.model, seqs, {name: plan[name]}, get_method("rtn"), progress=False)[1][name]
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-12)
    assert all(p.grad is None for p in pr.model.parameters())  # no weight gradient was formed
    assert [p.requires_grad for p in pr.model.parameters()] == wanted
    rows = sensitivity(pr, group_units(list(plan), family_of(pr.model), "layer"), {"w2": plan}, get_method("rtn"),
                       progress=False)
    assert all(r.kl > 0 and r.proxy > 0 for r in rows)
    assert rank_correlation([r.proxy for r in rows], [r.kl for r in rows]) > 0.6


def test_rank_correlation_with_ties():
    from lowbit.choose.sensitivity import rank_correlation

    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks with ties: a → [1, 2.5, 2.5, 4] (0-based here, same correlation), b → [1, 2, 3, 4]
    assert rank_correlation([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert rank_correlation([1, 1, 1], [1, 2, 3]) is None and rank_correlation([1, 2], [2, 1]) is None


def test_sensitivity_command_writes_its_files(tmp_path, stories_path, capsys):
    import json

    from lowbit.cli import main

    out = tmp_path / "sens"
    assert main(["sensitivity", str(stories_path), "--scheme", "w2a16,w3a16", "--group-size", "0", "--by", "type",
                 "--max-prompts", "2", "--max-new-tokens", "8", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "sensitivity.json").read_text())
    assert result["formats"] == ["w2a16 per-channel", "w3a16 per-channel"] and len(result["rows"]) == 14
    by_unit = {(r["unit"], r["fmt"]): r for r in result["rows"]}
    for kind in ("self_attn.q_proj", "mlp.down_proj"):  # fewer bits, more damage
        assert by_unit[(kind, "w2a16 per-channel")]["kl"] > by_unit[(kind, "w3a16 per-channel")]["kl"]
    assert {p.name for p in out.iterdir()} == {"sensitivity.json", "sensitivity.csv", "sensitivity.md",
                                               "sensitivity.html"}
    assert "| 1 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--method", "awq"], "transforms groups of layers"),
    (["--scheme", "w9a16"], "2 to 8 bits"),
    (["--scheme", "w4a16", "--group-size", "3"], "Group sizes that divide"),
])
def test_sensitivity_bad_input(tmp_path, stories_path, capsys, argv, match):
    from lowbit.cli import main

    assert main(["sensitivity", str(stories_path), *argv, "--out", str(tmp_path / "o"), "--quiet",
                 "--max-prompts", "1", "--max-new-tokens", "4"]) == 2
    assert match in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "o").exists()


def test_a_record_from_another_model_is_refused(tmp_path, stories_path, stories, stories_tokenizer, capsys):
    import torch

    from lowbit.cli import main
    from lowbit.eval.divergence import make_record

    with torch.no_grad():
        stories.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    record = make_record(stories, stories_tokenizer, ["Once upon a time"], source="x", model_name="changed",
                         max_new_tokens=4, progress=False)
    record.save(tmp_path / "r.safetensors")
    assert main(["sensitivity", str(stories_path), "--reference-record", str(tmp_path / "r.safetensors"),
                 "--out", str(tmp_path / "o"), "--quiet", "--group-size", "0"]) == 2
    assert "made by another model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


MENU = "w2a16:0,w3a16:0,w4a16:0,w8a16:0,16"


@pytest.mark.slow
def test_target_bpw_stays_in_budget_and_its_recipe_reproduces_the_checkpoint(tmp_path, stories_path, capsys):
    import json

    import torch
    from safetensors.torch import load_file

    from lowbit.cli import main

    common = ["--method", "gptq", "--calib-samples", "4", "--calib-seqlen", "64", "--quiet"]
    assert main(["quantize", str(stories_path), "--target-bpw", "5", "--choices", MENU, *common,
                 "--out", str(tmp_path / "mixed")]) == 0
    assert "allocation" in capsys.readouterr().out
    header = json.loads((tmp_path / "mixed" / "lowbit.json").read_text())
    alloc = header["allocation"]
    assert alloc["bits_per_weight_measured"] <= 5 and alloc["bits_per_weight"] == alloc["bits_per_weight_measured"]
    assert len(alloc["layers"]) >= 2 and sum(alloc["layers"].values()) == 35
    assert header["recipe"]["overrides"]
    assert main(["quantize", str(stories_path), "--recipe", str(tmp_path / "mixed" / "recipe.yaml"), *common,
                 "--out", str(tmp_path / "again")]) == 0
    a, b = ({k: v for f in weight_files(tmp_path / d) for k, v in load_file(f).items()} for d in ("mixed", "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cached_costs_give_the_same_allocation_without_a_second_costing(tmp_path, stories, stories_tokenizer,
                                                                         monkeypatch):
    from lowbit.choose import mixed
    from lowbit.data.calibration import CalibConfig
    from lowbit.model.loading import family_of
    from lowbit.recipe import Recipe

    args = (stories, stories_tokenizer, family_of(stories), Recipe(method="gptq", scheme="w4a16", group_size=0))
    menu, calib = mixed.parse_choices(MENU), CalibConfig(samples=2, seqlen=32)
    first = mixed.choose(*args, 3.5, menu, calib, progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("costs-*.json"))) == 1

    def no_probe(*a, **k):
        raise AssertionError("costed again")

    monkeypatch.setattr(mixed, "probe", no_probe)
    again = mixed.choose(*args, 3.5, menu, calib, progress=False, cache_dir=tmp_path)
    assert again.allocation == first.allocation and again.recipe == first.recipe
    other = mixed.choose(*args, 5.0, menu, calib, progress=False, cache_dir=tmp_path)  # another budget: the same costs
    assert other.allocation.bits > first.allocation.bits
    with pytest.raises(AssertionError, match="costed again"):  # other calibration: other costs
        mixed.choose(*args, 3.5, menu, CalibConfig(samples=3, seqlen=32), progress=False, cache_dir=tmp_path)


@pytest.mark.parametrize("argv,match", [
    (["--target-bpw", "0"], "not a budget"),
    (["--target-bpw", "16.5"], "not a budget"),
    (["--target-bpw", "2", "--choices", MENU], "below the smallest allocation the choices allow, 2.268"),
    (["--target-bpw", "4", "--choices", "w4a16:x"], "must be an integer"),
    (["--target-bpw", "4", "--choices", "w3a16:0,w3a16:0"], "lists a format twice"),
    (["--target-bpw", "4", "--choices", "w9a16:0"], "2 to 8 bits"),
    (["--target-bpw", "8", "--method", "smoothquant"], "quantizes activations too"),
    (["--target-size", "lots"], "is not a size"),
    (["--target-size", "1KB", "--choices", MENU], "does not even hold the tensors that are not quantized"),
    (["--target-size", "0.6MB", "--choices", MENU, "--calib-samples", "2", "--calib-seqlen", "32"],
     "keeps every targeted layer in 16 bits"),
    (["--target-size", "1MB", "--target-bpw", "4"], "not both"),
])
def test_target_bpw_bad_input(tmp_path, stories_path, capsys, argv, match):
    from lowbit.cli import main

    assert main(["quantize", str(stories_path), *argv, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert match in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "o").exists()


def test_allocation_recipe_patterns_select_exactly_their_layers(stories):
    from lowbit.choose.allocate import Allocation, Choice
    from lowbit.choose.mixed import allocation_recipe, parse_choices
    from lowbit.model.loading import family_of
    from lowbit.model.targets import select_layers
    from lowbit.recipe import Recipe

    family = family_of(stories)
    names = list(select_layers(stories, family, Recipe(scheme="w4a16", group_size=0)))
    menu = parse_choices(MENU)
    labels = [m.label for m in menu]
    picks = {n: labels[(i * 7) % len(labels)] for i, n in enumerate(names)}
    alloc = Allocation({n: Choice(label, 1, 0.0) for n, label in picks.items()}, len(names), 0.0, True)
    recipe = allocation_recipe(Recipe(method="gptq", scheme="w4a16", group_size=0), alloc, menu, family.blocks)
    plan = select_layers(stories, family, recipe)
    for n, label in picks.items():
        if label == "16":
            assert n not in plan
        else:
            scheme = label.partition(":")[0]
            assert plan[n].weight.bits == int(scheme[1]) and plan[n].weight.granularity.to_dict()["type"] == \
                "per_channel", (n, label)


GRID = """
methods: [rtn, gptq]
schemes: [w4a16, w2a16]
group_sizes: [0]
calib: {samples: 2, seqlen: 32}
eval: {max_prompts: 2, max_new_tokens: 8, ppl: [wikitext2], max_windows: 1, seqlen: 64}
size_budget_bpw: 4.5
"""


@pytest.mark.slow
def test_sweep_interrupted_and_resumed_gives_the_same_table(tmp_path, stories_path, monkeypatch, capsys):
    import json

    from lowbit.choose import sweep as sweep_mod
    from lowbit.cli import main

    (tmp_path / "grid.yaml").write_text(GRID)
    argv = ["sweep", str(stories_path), "--grid", str(tmp_path / "grid.yaml"), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    whole = (tmp_path / "whole" / "sweep.md").read_text()
    assert whole.count("| rtn ") == 2 and whole.count("| gptq ") == 2 and "Within 4.5 bits per weight" in whole

    real, calls = sweep_mod.run_point, []

    def interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:  # killed in the middle of the third point
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_mod, "run_point", interrupted)
    assert main([*argv, "--out", str(tmp_path / "split")]) == 130
    assert len([p for p in (tmp_path / "split" / "points").glob("*.json") if not p.name.endswith(".eval.json")]) == 2
    monkeypatch.setattr(sweep_mod, "run_point", real)
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "split")]) == 0
    assert capsys.readouterr().out.count("done before, kept") == 2
    assert (tmp_path / "split" / "sweep.md").read_text() == whole
    data = json.loads((tmp_path / "split" / "sweep.json").read_text())
    fits = [r for r in data["results"] if r["bits_per_weight"] <= 4.5]
    assert data["recommendation"]["best_within_size"] == min(fits, key=lambda r: r["kl"])["label"]


def test_a_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path, stories_path, monkeypatch):
    from lowbit.choose import sweep as sweep_mod
    from lowbit.choose.sweep import Grid, sweep

    def fake(model_name, point, grid, record, work, progress=True):
        if point.method == "gptq":
            raise RuntimeError("out of memory")
        return {"label": point.label, "point": {}, "bits_per_weight": 4.0 if "w4" in point.scheme else 2.0,
                "bytes": 1, "kl": 0.1, "kl_ci95": [0.09, 0.11], "token_rejection_rate": 0.1, "ppl": {}}

    monkeypatch.setattr(sweep_mod, "run_point", fake)
    monkeypatch.setattr(sweep_mod, "make_record", lambda *a, **k: None)
    grid = Grid.from_dict({"methods": ["rtn", "gptq"], "schemes": ["w4a16", "w2a16"], "group_sizes": [0]})
    results = sweep(str(stories_path), grid, tmp_path / "s", progress=False, log=lambda *_: None)
    assert [("error" in r) for r in results] == [False, False, True, True]
    assert "out of memory" in results[2]["error"]


@pytest.mark.parametrize("grid,match", [
    ({"methods": ["rtn"], "schemes": ["w4a16"], "group_size": [64]}, "unknown key.*group_size"),
    ({"methods": ["magic"], "schemes": ["w4a16"]}, "unknown method 'magic'"),
    ({"methods": ["rtn"], "schemes": ["w4a17"]}, "unknown scheme"),
    ({"methods": ["rtn"]}, "give 'schemes'"),
    ({"schemes": ["w4a16"]}, "'methods' is required"),
    ({"methods": ["gptq"], "budgets": [17]}, "not a budget"),
    ({"methods": ["rtn"], "schemes": ["w4a16"], "eval": {"prompt": "x"}}, "unknown eval key"),
    ({"methods": ["rtn"], "schemes": ["w4a16"], "parts": ["nothing"]}, "nothing"),
])
def test_bad_grids_are_refused(grid, match):
    from lowbit.choose.sweep import Grid

    with pytest.raises(LowbitError, match=match):
        Grid.from_dict(grid)


def test_sweep_refuses_a_record_from_another_model(tmp_path, stories_path, stories, stories_tokenizer, capsys):
    import torch

    from lowbit.cli import main
    from lowbit.eval.divergence import make_record

    with torch.no_grad():
        stories.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    make_record(stories, stories_tokenizer, ["Once"], source="x", model_name="changed", max_new_tokens=4,
                progress=False).save(tmp_path / "r.safetensors")
    (tmp_path / "grid.yaml").write_text(GRID)
    assert main(["sweep", str(stories_path), "--grid", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "s"),
                 "--reference-record", str(tmp_path / "r.safetensors"), "--quiet"]) == 2
    assert "made by another model" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_sweep_on_ray_gives_the_sequential_table(tmp_path, stories_path):
    ray = pytest.importorskip("ray")
    from lowbit.cli import main

    grid = GRID.replace("methods: [rtn, gptq]", "methods: [rtn]").replace(", ppl: [wikitext2], max_windows: 1", "")
    (tmp_path / "grid.yaml").write_text(grid)
    argv = ["sweep", str(stories_path), "--grid", str(tmp_path / "grid.yaml"), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "seq")]) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local instance with this machine's CPUs
    try:
        # the same record, so that both runs compare against the same reference generations
        assert main([*argv, "--out", str(tmp_path / "ray"), "--executor", "ray", "--cpus-per-point", "2",
                     "--reference-record", str(tmp_path / "seq" / "reference.safetensors")]) == 0
    finally:
        ray.shutdown()
    assert (tmp_path / "ray" / "sweep.md").read_text() == (tmp_path / "seq" / "sweep.md").read_text()


def test_target_size_bounds_the_stored_tensors(tmp_path, stories_path):
    from safetensors import safe_open

    from lowbit.cli import main

    assert main(["quantize", str(stories_path), "--target-size", "0.45MB", "--choices", MENU, "--calib-samples", "2",
                 "--calib-seqlen", "32", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert 0.40e6 < stored <= 0.45e6


def test_sweep_margins_and_report_in_a_real_browser(tmp_path, stories_path):
    import json
    import shutil

    from lowbit.cli import main

    grid = GRID.replace("methods: [rtn, gptq]", "methods: [rtn]\nbudgets: [3.0]\nchoices: w2a16:0,w4a16:0")
    (tmp_path / "grid.yaml").write_text(grid)
    assert main(["sweep", str(stories_path), "--grid", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "s"),
                 "--quiet"]) == 0
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    kl = {r["label"]: r["kl"] for r in data["results"]}
    assert [m["uniform"] for m in data["margins"]] == ["rtn w4a16 per-channel"]  # w2 has fewer bits than 3.0
    m = data["margins"][0]
    assert m["margin"] == pytest.approx(kl[m["uniform"]] - kl["rtn mixed 3 bpw"], rel=1e-6, abs=1e-9)
    assert "Mixed precision against every uniform point" in (tmp_path / "s" / "sweep.md").read_text()

    sync = pytest.importorskip("playwright.sync_api")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("no Chromium here (./dev installs Debian's chromium where it can)")
    page_path = tmp_path / "s" / "report.html"
    errors, requests = [], []
    with sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        images = page.query_selector_all("img")
        svgs = page.query_selector_all("svg.plot")
        drawn = [img.evaluate("i => i.complete && i.naturalWidth > 100") for img in images]
        tokens = page.query_selector_all(".worst .t")
        hover = tokens[-1].get_attribute("title")
        headings = [h.inner_text() for h in page.query_selector_all("h2, h3")]
        browser.close()
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests)  # self-contained: nothing from the network
    assert len(images) == 3 and all(drawn)  # the frontier, KL by position, the distribution
    assert len(svgs) == 1  # per prompt, each prompt's first words on hover
    assert len(tokens) > 10 and "reference:" in hover and "candidate:" in hover
    assert {"Quality against size", "Summary", "Where it diverges", "rtn w4a16 per-channel"} <= set(headings)


def test_a_choice_whose_groups_divide_only_some_layers_is_offered_to_those(tmp_path, stories_path):
    import json

    from lowbit.cli import main

    # stories260K: inputs of 64 columns, and 172 for down_proj, which groups of 32 do not divide
    assert main(["quantize", str(stories_path), "--target-bpw", "5", "--choices", "w4a16:32,w2a16:0,w4a16:0,16",
                 "--calib-samples", "2", "--calib-seqlen", "32", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    header = json.loads((tmp_path / "o" / "lowbit.json").read_text())
    downs = {n: layer["spec"]["weight"] for n, layer in header["layers"].items() if n.endswith("down_proj")}
    assert downs and all(w["granularity"]["type"] == "per_channel" for w in downs.values())
    assert header["allocation"]["layers"].get("w4a16:32", 0) > 0
