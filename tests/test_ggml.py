"""llama.cpp's legacy block formats: lowbit's grids written as ggml bytes read back by the `gguf` package (llama.cpp's
own Python library) to exactly lowbit's dequantized weights, and ggml bytes made by gguf's quantizer read by lowbit
to exactly gguf's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import IntFormat, PerGroup, quantize
from lowbit.formats.ggml import LEGACY, block_type, from_blocks, to_blocks
from lowbit.recipe import scheme_spec

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

QTYPE = {name: getattr(gguf.GGMLQuantizationType, name.upper()) for name in LEGACY}


def _weights(seed: int, rows: int = 6, cols: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02 + torch.randn(rows, 1, generator=g) * 0.01
    w[0, :32] = 0.0  # an all-zero block
    w[1, 5] = 0.5  # an outlier
    return w


GRIDS = [(name, full) for name, t in LEGACY.items() for full in ((False,) if t.minimum else (False, True))]


@pytest.mark.parametrize("name,full_range", GRIDS)
def test_lowbit_blocks_dequantize_in_gguf_to_lowbit_values(name, full_range):
    t = LEGACY[name]
    fmt = t.lowbit_format(full_range=full_range)
    qw = quantize(_weights(hash(name) % 1000), fmt)
    data = to_blocks(qw)
    assert data.shape == (6, 128 // 32 * t.block_bytes) and data.dtype == np.uint8
    assert t.bits_per_weight == data.size * 8 / qw.codes.numel()
    theirs = gguf_dequantize(data, QTYPE[name])
    assert np.array_equal(theirs, qw.dequantize().numpy())  # bit for bit
    back = from_blocks(data, name, qw.shape)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)
    assert (back.zero is None) == (qw.zero is None)
    if qw.zero is not None:
        assert torch.equal(back.zero, qw.zero)


@pytest.mark.parametrize("name", list(LEGACY))
def test_blocks_made_by_gguf_read_by_lowbit(name):
    w = _weights(7).numpy()
    data = gguf_quantize(w, QTYPE[name])
    qw = from_blocks(data, name, w.shape)
    assert np.array_equal(qw.dequantize().numpy(), gguf_dequantize(data, QTYPE[name]))
    assert np.array_equal(to_blocks(qw), data)  # and written back byte for byte


def test_block_type_names_exactly_the_grids_ggml_stores():
    assert block_type(IntFormat(4, granularity=PerGroup(32))).name == "q4_0"
    assert block_type(IntFormat(4, symmetric=False, granularity=PerGroup(32), zero_point="float")).name == "q4_1"
    assert block_type(IntFormat(8, granularity=PerGroup(32), full_range=True)).name == "q8_0"
    assert block_type(IntFormat(4, symmetric=False, granularity=PerGroup(32))) is None  # integer zero points
    assert block_type(IntFormat(4, granularity=PerGroup(64))) is None
    assert block_type(IntFormat(3, granularity=PerGroup(32))) is None
    with pytest.raises(LowbitError, match=r"no llama\.cpp legacy block type"):
        to_blocks(quantize(_weights(1), IntFormat(4, granularity=PerGroup(64))))


@pytest.mark.parametrize("name", list(LEGACY))
def test_scheme_names_give_the_ggml_grids(name):
    spec = scheme_spec(name, None, True, False)
    assert block_type(spec.weight) == LEGACY[name]
    with pytest.raises(LowbitError, match="groups of 32"):
        scheme_spec(name, 64, True, False)
    if not LEGACY[name].minimum:  # a grid the user asked for that the type cannot store is refused, not replaced
        with pytest.raises(LowbitError, match="symmetric"):
            scheme_spec(name, None, False, False)


@pytest.mark.parametrize("method,name", [("rtn", "q4_0"), ("gptq", "q4_1"), ("gptq", "q5_0")])
def test_quantize_to_ggml_types_and_write_their_blocks(stories, stories_tokenizer, method, name):
    from lowbit import api
    from lowbit.data.calibration import CalibConfig
    from lowbit.recipe import Recipe
    from lowbit.runtime.qlinear import QuantLinear

    calib = CalibConfig(dataset="c4", samples=4, seqlen=64, seed=1)
    recipe = Recipe(method=method, scheme=name, targets=(r"self_attn",))  # the MLP rows of 172 are no blocks of 32
    result = api.quantize(stories, recipe, tokenizer=stories_tokenizer, calib=calib,
                          progress=False)
    layers = [m for m in result.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(block_type(m.spec.weight) == LEGACY[name] for m in layers)
    qw = layers[0].quantized_weight()
    assert np.array_equal(gguf_dequantize(to_blocks(qw), QTYPE[name]), qw.dequantize().numpy())


@pytest.mark.slow
def test_gguf_export_of_smollm2_reads_back_in_transformers(tmp_path):
    """lowbit's GGUF of SmolLM2-135M (q4_0, every layer) loaded by transformers' GGUF reader (the `gguf`
    package's dequantization): every quantized layer holds exactly lowbit's dequantized weights (rope row order
    undone by the reader), and the logits agree with lowbit's model to within the 16-bit storage of the tensors
    lowbit keeps in float (the GGUF carries the source's own bytes for those)."""
    import lowbit
    from lowbit import api
    from lowbit.io.export import export
    from lowbit.model.loading import load_gguf
    from lowbit.recipe import Recipe
    from lowbit.runtime.qlinear import QuantLinear

    result = api.quantize("smollm2-135m", Recipe(method="rtn", scheme="q4_0"), progress=False)
    out = tmp_path / "smollm2-q4_0.gguf"
    written = export(result, "gguf", out)
    assert out.is_file() and written["bytes_on_disk"] == out.stat().st_size
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    assert reader.get_tensor(0).name and any(t.tensor_type == gguf.GGMLQuantizationType.Q4_0 for t in reader.tensors)
    theirs = load_gguf(out)
    for name, module in result.model.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(theirs.get_submodule(name).weight.float(), module.dequantized_weight()), name
    ids = lowbit.load_tokenizer("smollm2-135m")("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = result.model(ids).logits.float(), theirs(ids).logits.float()
    assert (a - b).abs().max() <= 2e-3 * a.abs().max() and torch.equal(a.argmax(-1), b.argmax(-1))
    with pytest.raises(LowbitError, match="exists"):
        export(result, "gguf", out)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_llama_cpp_runs_lowbits_gguf(tmp_path, llama_logits, method):
    """llama.cpp itself (llama-cpp-python) loads lowbit's q4_0 GGUF of SmolLM2-135M and its logits on a fixed prompt
    match lowbit's model as closely as llama.cpp's own logits on the source GGUF match that file's float
    dequantization: llama.cpp's CPU path multiplies q4_0/q4_1 weights with activations rounded to 8-bit blocks
    (q8_0), about 6% relative L2 on this model by itself, while the quantization to q4_0 moves the logits ~30%. A
    misread file (wrong block layout, rotary row order, metadata) would be far outside that. AWQ folds its scales
    into the norms, which the file must then hold instead of the source's."""
    import lowbit
    from lowbit import api
    from lowbit.io.export import export
    from lowbit.model.builtin import builtin_gguf
    from lowbit.model.loading import load_float
    from lowbit.model.sources import resolve
    from lowbit.recipe import Recipe

    def rel(a, b) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    ids = lowbit.load_tokenizer("smollm2-135m")("The capital of France is Paris. The capital of Germany is",
                                                 return_tensors="pt").input_ids
    from lowbit.data.calibration import CalibConfig

    calib = CalibConfig("c4", 8, 128) if method == "awq" else None
    options = {"grid": 4} if method == "awq" else {}  # a coarse scale search: the file is under test, not AWQ
    result = api.quantize("smollm2-135m", Recipe(method=method, scheme="q4_0", options=options), calib=calib,
                          progress=False)
    export(result, "gguf", tmp_path / "q4_0.gguf")
    with torch.no_grad():
        ours = result.model(ids).logits[0].float().numpy()
        float_ref = load_float(resolve("smollm2-135m"))(ids).logits[0].float().numpy()
    llama_ours, llama_src = llama_logits(tmp_path / "q4_0.gguf", ids), llama_logits(builtin_gguf("smollm2-135m"), ids)
    engine_gap = rel(llama_src, float_ref)  # llama.cpp's arithmetic on the same weights
    assert rel(llama_ours, ours) <= 1.5 * engine_gap + 0.01
    assert rel(llama_ours, ours) < 0.3 * rel(ours, float_ref)
    assert (llama_ours.argmax(-1) == ours.argmax(-1)).mean() >= 0.75


def test_gguf_export_refuses_what_it_cannot_write(_stories, tmp_path):
    import copy

    from lowbit import api
    from lowbit.io.export import export
    from lowbit.recipe import Recipe

    w4 = api.quantize(copy.deepcopy(_stories), Recipe(scheme="w4a16", group_size=4), progress=False)
    with pytest.raises(LowbitError, match=r"no llama\.cpp block type"):
        export(w4, "gguf", tmp_path / "a.gguf")
    q4 = api.quantize(copy.deepcopy(_stories), Recipe(scheme="q4_0", targets=(r"self_attn",)), progress=False)
    q4.model.config.model_type = "olmo"  # a family lowbit quantizes but cannot describe to llama.cpp
    with pytest.raises(LowbitError, match="Llama family"):
        export(q4, "gguf", tmp_path / "b.gguf")
    assert not list(tmp_path.iterdir())  # nothing written


def test_gguf_of_a_hugging_face_source_runs_in_llama_cpp(stories_path, tmp_path):
    """stories260K, a Hugging Face Llama checkpoint, exported to GGUF with metadata and tokenizer written by lowbit
    (lowbit.io.gguf_hf): llama.cpp (llama-cpp-python) tokenizes a story exactly as the Hugging Face tokenizer does,
    and its logits match lowbit's model within llama.cpp's own arithmetic (it rounds activations to 8-bit blocks
    for quantized weights: 0.3% relative L2 measured here; 2% allowed). transformers' GGUF reader gets exactly
    lowbit's model back. A second export to the same file is refused."""
    import llama_cpp

    import lowbit
    from lowbit import api
    from lowbit.io.export import export
    from lowbit.model.loading import load_gguf
    from lowbit.recipe import Recipe

    result = api.quantize(str(stories_path), Recipe(method="rtn", scheme="q4_0", targets=(r"self_attn",)),
                          progress=False)
    out = tmp_path / "stories-q4_0.gguf"
    export(result, "gguf", out)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside."
    ids = lowbit.load_tokenizer(str(stories_path))(text, return_tensors="pt").input_ids
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=True) == ids[0].tolist()
    llm.eval(ids[0].tolist())
    theirs = np.array(llm.scores[: ids.shape[1]])
    with torch.no_grad():
        ours = result.model(ids).logits[0].float().numpy()
        read_back = load_gguf(out)(ids).logits[0].float().numpy()
    assert np.linalg.norm(theirs - ours) <= 0.02 * np.linalg.norm(ours)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    assert np.array_equal(read_back, ours)
    with pytest.raises(LowbitError, match="exists"):
        export(result, "gguf", out)


def test_truncated_or_foreign_gguf_is_refused(stories_path, tmp_path):
    """What `lowbit eval --candidate` and `lowbit quantize` read: a GGUF cut short or another file named .gguf is
    a LowbitError naming the file, not a reader's traceback."""
    import lowbit
    from lowbit import api
    from lowbit.io.export import export
    from lowbit.recipe import Recipe

    whole = tmp_path / "whole.gguf"
    export(api.quantize(str(stories_path), Recipe(scheme="q8_0", targets=(r"self_attn",)), progress=False), "gguf",
           whole)
    data = whole.read_bytes()
    cases = (("head.gguf", data[:1000]), ("tail.gguf", data[:-5000]), ("foreign.gguf", b"PK\x03\x04" * 64))
    for name, content in cases:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(LowbitError, match=name):
            lowbit.load(bad)
        with pytest.raises(LowbitError, match=name):
            lowbit.load_tokenizer(bad)
    assert lowbit.load(whole) is not None


@pytest.mark.parametrize("name", ["q4_0", "q5_0"])
def test_symmetric_types_round_as_llama_cpp(name):
    """Q4_0/Q5_0 take llama.cpp's scale rule, s = x_max / −2^(b−1) with the sign of the weight of largest magnitude:
    that weight is exact in every block, and the error is gguf's own quantizer's (its bytes differ only where a
    weight lies on a rounding tie of the float16 scale)."""
    w = _weights(3, rows=64, cols=512)
    qw = quantize(w, LEGACY[name].lowbit_format())
    assert qw.fmt.signed_scale and (qw.scale < 0).any() and (qw.scale > 0).any()
    ours = qw.dequantize()
    blocks = w.reshape(64, -1, 32)
    top = blocks.abs().argmax(-1, keepdim=True)
    nonzero = blocks.abs().amax(-1) > 0
    err = (ours.reshape(64, -1, 32).gather(-1, top) - blocks.gather(-1, top)).abs().squeeze(-1)
    assert (err[nonzero] <= 1e-3 * blocks.abs().amax(-1)[nonzero]).all()  # exact up to the float16 scale
    theirs = gguf_dequantize(gguf_quantize(w.numpy(), QTYPE[name]), QTYPE[name])
    e_ours = float((ours - w).norm() / w.norm())
    e_theirs = float(np.linalg.norm(theirs - w.numpy()) / np.linalg.norm(w.numpy()))
    assert abs(e_ours - e_theirs) <= 0.005 * e_theirs


def test_gptq_takes_the_full_range_grid_on_q4_0():
    """Same ggml type either way; GPTQ rounds on the full-range grid (its updates overshoot a signed grid's exact
    edge) with a range search, round to nearest and imatrix on llama.cpp's signed rule, also for a mix's fallback
    layers."""
    from lowbit.recipe import Recipe

    for method, signed in (("rtn", True), ("imatrix", True), ("gptq", False)):
        w = Recipe(method=method, scheme="q4_0").default_spec.weight
        assert w.signed_scale is signed and w.full_range is not signed and block_type(w) == LEGACY["q4_0"]
        assert w.clip is (method == "gptq")  # GPTQ searches each block's range, weighted by diag(H)
