"""Checkpoint format: save/load round trips, header, sizes, hashes, atomic writes, tied weights."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.io import checkpoint
from lowbit.recipe import Override, Recipe
from lowbit.runtime import QuantLinear

RECIPES = [
    Recipe(scheme="w4a16", group_size=4),
    Recipe(scheme="w3a16", group_size=0, symmetric=False),
    Recipe(scheme="w2a16", group_size=2, symmetric=False, zero_point="float"),
    Recipe(scheme="w8a16", group_size=0, clip=True),
    Recipe(scheme="w6a16", group_size=4),
    Recipe(scheme="w8a8", group_size=0),
    Recipe(scheme="fp8", group_size=0),
    Recipe(scheme="w4a16", group_size=4, targets=("proj", "lm_head"),
           overrides=(Override(pattern="down_proj", scheme="w8a16"), Override(pattern=r"layers\.0\.", skip=True))),
]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.scheme}-g{r.group_size}-{len(r.overrides)}")
def test_round_trip_equals_fake_quantized_model(recipe, stories, _stories, story_ids, stories_tokenizer, tmp_path):
    result = api.quantize(stories, recipe, progress=False)
    header = api.save(result, tmp_path / "ckpt", tokenizer=stories_tokenizer)
    loaded = lowbit.load(tmp_path / "ckpt")
    fake = api.fake_quantize_model(_stories, result.plan, result.dtype)
    with torch.no_grad():
        got, want, direct = loaded(story_ids).logits, fake(story_ids).logits, result.model(story_ids).logits
    if recipe.default_spec.act is None:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        # The codes matmul differs from F.linear on dequantized values by float32 rounding, which can move a later
        # layer's activation across a rounding boundary (one code step in one element): close, not equal.
        assert (got - want).norm() <= 1e-2 * want.norm()
    assert torch.equal(got, direct)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == len(result.plan)
    assert header["method"] == "rtn" and header["scheme"] == recipe.scheme
    assert Recipe.from_dict(header["recipe"]) == recipe
    assert Recipe.from_yaml(tmp_path / "ckpt" / "recipe.yaml") == recipe


def test_header_contract_and_sizes(stories, stories_tokenizer, tmp_path):
    result = api.quantize(stories, Recipe(scheme="w4a16", group_size=4), progress=False)
    api.save(result, tmp_path / "ckpt", tokenizer=stories_tokenizer)
    header = json.loads((tmp_path / "ckpt" / "lowbit.json").read_text())
    for key in ("method", "scheme", "bits_per_weight", "seconds", "recipe", "lowbit_version", "layers", "files"):
        assert key in header
    # int4 codes + one float16 scale per 4 weights; down_proj rows (172 inputs) pad to 192 codes
    assert 8.0 < header["bits_per_weight"] < 8.5
    for name, layer in header["layers"].items():
        assert layer["spec"]["weight"]["bits"] == 4, name
    predicted = header["size"]["bytes_predicted"]
    weights = (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    assert predicted <= weights < predicted * 1.05  # the safetensors JSON header is the difference
    assert set(header["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}


def test_tied_embeddings_stay_tied(stories, tmp_path):
    api.save(api.quantize(stories, Recipe(group_size=0), progress=False), tmp_path / "ckpt")
    loaded = lowbit.load(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert json.loads((tmp_path / "ckpt" / "lowbit.json").read_text())["tied"] == {
        "lm_head.weight": "model.embed_tokens.weight"}


def test_tampered_file_fails_its_hash(stories, tmp_path):
    api.save(api.quantize(stories, Recipe(group_size=0), progress=False), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="fails its sha256 check"):
        lowbit.load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(LowbitError, match=r"config\.json is missing"):
        lowbit.load(tmp_path / "ckpt")


def test_existing_output_refused_unless_overwrite(stories, tmp_path):
    result = api.quantize(stories, Recipe(group_size=0), progress=False)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("user data")
    with pytest.raises(LowbitError, match=r"already exists.*--overwrite"):
        api.save(result, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "keep.txt").read_text() == "user data"
    api.save(result, tmp_path / "ckpt", overwrite=True)
    assert not (tmp_path / "ckpt" / "keep.txt").exists() and (tmp_path / "ckpt" / "lowbit.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_write_leaves_nothing(stories, tmp_path, monkeypatch, exc):
    result = api.quantize(stories, Recipe(group_size=0), progress=False)

    def fail(*_a, **_k):
        raise exc("interrupted while writing")

    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(exc):
        api.save(result, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_checkpoint(stories, tmp_path, monkeypatch):
    result = api.quantize(stories, Recipe(group_size=0), progress=False)
    api.save(result, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "lowbit.json").read_text()
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        api.save(result, tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt" / "lowbit.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_quantizing_a_checkpoint_is_refused(stories, tmp_path):
    api.save(api.quantize(stories, Recipe(group_size=0), progress=False), tmp_path / "ckpt")
    with pytest.raises(LowbitError, match="already a lowbit checkpoint"):
        api.quantize(str(tmp_path / "ckpt"), Recipe(group_size=0), progress=False)


def test_edited_header_fails_its_own_hash(stories, tmp_path):
    header = api.save(api.quantize(stories, Recipe(scheme="w4a16", group_size=4), progress=False), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / checkpoint.HEADER
    stored = json.loads(path.read_text())
    assert stored == header and stored[checkpoint.HEADER_HASH] == checkpoint.header_digest(stored)
    path.write_text(json.dumps({**stored, "bits_per_weight": 2.0}, indent=1))
    with pytest.raises(LowbitError, match=r"lowbit\.json' was edited or damaged: .* Re-run `lowbit quantize`"):
        lowbit.load(tmp_path / "ckpt", verify=False)


def test_unhashed_header_loads_and_an_edited_layer_entry_is_named(stories, tmp_path):
    """A header written before headers were hashed still loads; editing a layer's format in it is refused naming the
    layer, not with torch's size mismatch."""
    api.save(api.quantize(stories, Recipe(scheme="w4a16", group_size=4), progress=False), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / checkpoint.HEADER
    old = json.loads(path.read_text())
    del old[checkpoint.HEADER_HASH]
    path.write_text(json.dumps(old, indent=1))
    lowbit.load(tmp_path / "ckpt")
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    for layer, field, value, message in ((q, "bits", 2, "disagrees with the stored tensors"),
                                         (q, "granularity", {"type": "per_group", "size": 8}, "disagrees"),
                                         (down, "granularity", {"type": "per_group", "size": 3}, "cannot describe")):
        edited = json.loads(json.dumps(old))
        edited["layers"][layer]["spec"]["weight"][field] = value
        path.write_text(json.dumps(edited))
        with pytest.raises(LowbitError, match=rf"layer {layer}'s entry in .*lowbit\.json.* {message}.*was edited or "
                                              "damaged"):
            lowbit.load(tmp_path / "ckpt")
