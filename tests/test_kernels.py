"""The GPU kernels on a machine without a GPU: Triton's interpreter runs every kernel variant against the float64
reference (lowbit.kernels.check, the same check the H200 benchmark runs compiled), and the kernels compile for an
H100/H200 (sm_90) so a change that breaks code generation fails here. On a CUDA machine the check also runs
compiled. Dispatch (which layers get a kernel, which fall back and say so) is tested on the CPU path."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from lowbit import kernels
from lowbit.formats import FP8Format, IntFormat, PerChannel, PerGroup, PerTensor, SpQRFormat, SpQRWeight
from lowbit.formats.activation import ActFormat
from lowbit.formats.packing import unpack
from lowbit.kernels.check import Case, fmt, random_weight
from lowbit.kernels.layout import deinterleave, interleave, kernel_words, slice_words
from lowbit.kernels.linear import choose_tiles, unsupported
from lowbit.kernels.weights import ZeroMode, kernel_weight

triton = pytest.importorskip("triton")

# Run in a fresh interpreter: TRITON_INTERPRET must be set before Triton is imported. Triton 3.6's interpreter
# turns a one-element array into an index with int(array), which numpy 2.4 refuses for arrays of one dimension;
# the patch indexes with the element instead. The interpreter also rounds float32 → fp8 wrongly where rounding
# carries into the exponent (127.7 becomes 64, not 128), so the fp8 W8A8 cases run on the GPU only.
_INTERPRET = """
import json, sys, torch
import triton.runtime.interpreter as interp
_orig = interp._patch_lang_tensor
def _patched(tensor, scope):
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interp._patch_lang_tensor = _patched
from lowbit.kernels.check import check_all, check_rows, check_w8a8
print(json.dumps(check_all("cpu", torch.float16, small=True) + check_rows("cpu", torch.float16, small=True)))
print(json.dumps(check_w8a8("cpu", torch.float16, small=True, kinds=("int8",))))
"""


@pytest.mark.slow
def test_every_kernel_variant_matches_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _INTERPRET], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    results, w8a8 = json.loads(lines[-2]), json.loads(lines[-1])
    # 3 bit widths × 3 grids × 4 groupings, wider fields, g_idx, SpQR, ragged K; the rows GEMV
    assert len(results) >= 73
    assert len(w8a8) == 9  # per-token, per-tensor and static activations on three shapes
    bad = [(d, e) for d, e, ok in results + w8a8 if not ok]
    assert not bad, bad
    assert {d.split(" [")[1].split(" ")[0].rstrip("]") for d, *_ in results} >= {"auto", "gemv", "dot", "dequant",
                                                                                  "rows"}


def _compile_sm90(fn, signature: dict, constexprs: dict):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # pointers and sizes divisible by 16, as the runtime specializes them for aligned tensors
    aligned = [[(i,), [["tt.divisibility", 16]]] for i, (name, t) in enumerate(signature.items())
               if t.startswith("*") or name in ("N", "K", "KW", "NG", "stride_xm", "stride_ym")]
    src = ASTSource(fn, {**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                    attrs={k: v for k, v in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})


@pytest.mark.parametrize("bits,group,mode", [(4, 128, 0), (4, 64, 1), (8, 0, 0), (2, 32, 1), (4, 16, 1),
                                             (4, 32, 2), (8, 64, 2)])
def test_kernels_compile_for_sm90(bits, group, mode):
    from lowbit.kernels.wxa16 import dequant_kernel, dot_kernel, gemv_kernel

    common = {"x_ptr": "*fp16", "w_ptr": "*i32", "st_ptr": "*i32", "b_ptr": "*fp16", "y_ptr": "*fp16"}
    stats = {"BITS": bits, "GROUP": group, "MODE": mode, "ZERO": 1 << (bits - 1)}
    sizes = {"N": "i32", "K": "i32", "KW": "i32", "NG": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    gemvs = [_compile_sm90(gemv_kernel, {**common, **sizes},
                           {**stats, "HAS_BIAS": True, "BN": 16, "BW": slice_words(bits, group), "SPLIT_K": 1,
                            "UNROLL": 2, "FIELD": field})
             for field in ((1, 2) if bits == 4 else (1,))]
    dot = _compile_sm90(dot_kernel, {**common, "y_ptr": "*fp32", "M": "i32", **sizes},
                        {**stats, "HAS_BIAS": False, "BM": 16, "BN": 128, "BW": slice_words(bits, group),
                         "SPLIT_K": 4})
    deq = _compile_sm90(dequant_kernel, {"w_ptr": "*i32", "st_ptr": "*i32", "out_ptr": "*bf16", "N": "i32",
                                         "K": "i32", "KW": "i32", "NG": "i32"},
                        {**stats, "BN": 16, "BW": slice_words(bits, group)})
    for k in (*gemvs, dot, deq):
        assert ".target sm_90" in k.asm["ptx"] and k.asm["cubin"]
    assert "mma" in dot.asm["ptx"]  # the tensor-core path really uses tensor cores
    assert "red.global" in dot.asm["ptx"] or "atom.global" in dot.asm["ptx"]  # split-K adds partial sums
    if bits == 4:  # the byte-permute variant: one prmt per code
        assert gemvs[1].asm["ptx"].count("prmt.b32") >= 8


@pytest.mark.parametrize("group,field", [(128, 2), (16, 2), (0, 1), (64, 3)])
def test_rows_gemv_compiles_for_sm90(group, field):
    from lowbit.kernels.gemv_rows import gemv_rows_kernel

    k = _compile_sm90(gemv_rows_kernel, {"x_ptr": "*bf16", "w_ptr": "*i32", "st_ptr": "*i32", "b_ptr": "*bf16",
                                         "y_ptr": "*fp32", "N": "i32", "K": "i32", "KW": "i32", "NG": "i32",
                                         "stride_xm": "i32", "stride_ym": "i32"},
                      {"BITS": 4, "GROUP": group, "MODE": 1, "ZERO": 8, "HAS_BIAS": True, "BN": 128, "BWT": 8,
                       "SPLIT_K": 2, "FIELD": field})
    assert k.asm["cubin"] and (k.asm["ptx"].count("prmt.b32") >= 8 if field >= 2 else True)
    assert "ld.global.v4" in k.asm["ptx"]  # four rows' words in one load


def test_outliers_kernel_compiles_for_sm90():
    from lowbit.kernels.wxa16 import outliers_kernel

    k = _compile_sm90(outliers_kernel, {"x_ptr": "*bf16", "ptr_ptr": "*i32", "col_ptr": "*i16", "d_ptr": "*fp32",
                                        "y_ptr": "*fp32", "N": "i32", "stride_xm": "i32", "stride_ym": "i32"},
                      {"BN": 32, "CH": 64})
    assert k.asm["cubin"] and ("red.global" in k.asm["ptx"] or "atom.global" in k.asm["ptx"])


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_w8a8_kernels_compile_for_sm90(kind):
    from lowbit.kernels.w8a8 import quantize_rows_kernel, scaled_mm_kernel

    codes = "*i8" if kind == "int8" else "*fp8e4nv"
    quant = _compile_sm90(quantize_rows_kernel, {"x_ptr": "*bf16", "q_ptr": codes, "s_ptr": "*fp32", "K": "i32",
                                                 "stride_xm": "i32"},
                          {"QMAX": 127.0 if kind == "int8" else 448.0, "IS_FP8": kind == "fp8", "STATIC": False,
                           "BK": 2048})
    mm = _compile_sm90(scaled_mm_kernel, {"a_ptr": codes, "b_ptr": "*u8" if kind == "int8" else codes,
                                          "sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16",
                                          "M": "i32", "N": "i32", "K": "i32", "stride_bn": "i32", "stride_ym": "i32"},
                       {"SA_ROWS": True, "SB_COLS": True, "B_OFFSET": kind == "int8", "HAS_BIAS": True, "BM": 128,
                        "BN": 128, "BK": 128, "GROUP_M": 8, "SPLIT_K": 1})
    assert quant.asm["cubin"] and mm.asm["cubin"]
    ptx = mm.asm["ptx"]
    assert "wgmma" in ptx or "mma" in ptx  # tensor cores
    assert ("s8" in ptx) if kind == "int8" else ("e4m3" in ptx)


def test_unsupported_names_each_reason():
    assert unsupported(IntFormat(4, granularity=PerGroup(128)), None) is None
    assert unsupported(IntFormat(8, granularity=PerChannel()), None) is None
    assert unsupported(IntFormat(4, symmetric=False, granularity=PerGroup(32)), None) is None
    assert unsupported(IntFormat(3, granularity=PerGroup(128)), None) is None  # in 4-bit fields
    assert unsupported(IntFormat(6, symmetric=False, granularity=PerGroup(64)), None) is None  # in 8-bit fields
    assert unsupported(IntFormat(4, symmetric=False, granularity=PerGroup(32), zero_point="float"), None) is None
    assert unsupported(IntFormat(4, granularity=PerGroup(64), g_idx=True), None) is None
    assert unsupported(SpQRFormat(3, 16, 16, 3), None) is None
    assert "groups of 48" in unsupported(IntFormat(4, granularity=PerGroup(48)), None)
    assert "groups of 8" in unsupported(SpQRFormat(3, 8, 16, 3), None)
    assert "whole tensor" in unsupported(IntFormat(8, granularity=PerTensor()), None)
    assert "fp8" in unsupported(FP8Format(), None)
    assert "activations" in unsupported(IntFormat(8, granularity=PerChannel()), ActFormat("int8"))


def test_tiles_follow_problem_shape():
    assert choose_tiles(1, 14336, 4096, 4, 132).mode == "gemv"
    t = choose_tiles(16, 4096, 14336, 4, 132)
    assert t.mode == "dot" and t.bm == 16 and t.split_k > 1  # few output tiles: K is split to fill the GPU
    assert choose_tiles(64, 14336, 4096, 4, 132).bm == 64
    assert choose_tiles(2048, 14336, 4096, 4, 132).mode == "dequant"
    assert choose_tiles(1, 14336, 4096, 4, 132).split_k == 1  # 448 blocks of 32 outputs fill 132 SMs
    assert choose_tiles(1, 4096, 14336, 4, 132).split_k == 2  # 128 blocks do not: K is split
    assert choose_tiles(1, 1024, 14336, 4, 132).split_k == 4


@pytest.mark.parametrize("bits,group,k", [(4, 128, 4096), (4, 0, 200), (8, 64, 384), (2, 32, 1000), (4, 16, 96),
                                          (4, 1024, 2048)])
def test_kernel_layout_round_trip_and_slices(bits, group, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (5, k), generator=g, dtype=torch.uint8)
    bw = slice_words(bits, group)
    kw = interleave(codes, bits, bw)
    assert kw.shape == (5, kernel_words(k, bits, bw))
    assert torch.equal(deinterleave(kw, bits, k, bw), codes)
    # field j of word w of tile t holds column t·BW·P + j·BW + w: the kernels' slice
    per = 32 // bits
    fields = unpack(kw, bits, kw.shape[1] * per).reshape(5, -1, bw, per)
    t, j, w = kw.shape[1] // bw - 1, per - 1, bw // 2
    col = t * bw * per + j * bw + w
    assert fields[:, t, w, j].tolist() == (codes[:, col].tolist() if col < k else [0] * 5)
    if group:  # a slice never straddles two groups, a tile holds whole groups
        assert group % bw == 0 and (bw * per) % group == 0


KERNEL_FORMS = [(fmt(3, "sym", 64), ZeroMode.SYMMETRIC), (fmt(5, "asym", 32), ZeroMode.ZERO),
                (fmt(4, "float-min", 32), ZeroMode.MINIMUM), (fmt(4, "asym", 32, g_idx=True), ZeroMode.ZERO),
                (SpQRFormat(3, 16, 16, 3), ZeroMode.ZERO), (SpQRFormat(4, 32, 8, 16), ZeroMode.ZERO)]


@pytest.mark.parametrize("form,mode", KERNEL_FORMS, ids=lambda f: getattr(f, "name", None) or f"{f.kind}{f.bits}")
def test_kernel_form_keeps_codes_and_outlier_corrections(form, mode):
    qw = random_weight(Case(form, 1, 32, 256, outlier_rate=0.05), torch.Generator().manual_seed(3))
    kw = kernel_weight(qw)
    assert torch.equal(kw.codes(), qw.codes)  # wider fields and column orders are undone exactly
    rows = isinstance(qw, SpQRWeight)  # SpQR takes the rows layout: words [KW, N], statistics [NG, N]
    assert kw.layout == ("rows" if rows else "tiles")
    assert kw.field == {3: 4, 4: 4, 5: 8}[form.bits] and kw.words.shape[0 if rows else 1] * 32 // kw.field >= 256
    assert kw.mode == mode
    if isinstance(form, IntFormat) and form.g_idx:  # sorted by group, the kernel sees runs of G columns
        assert torch.equal(qw.g_idx.long()[kw.perm], torch.arange(256) // 32)
    if isinstance(qw, SpQRWeight):  # dense grid + correction = the stored outlier value, at every outlier
        o = kw.outliers
        mask, dense = qw.dense_outliers()
        s, z = (t.half().float().repeat_interleave(form.beta1, 1) for t in qw.statistics())  # as the kernel has them
        assert torch.allclose(((qw.codes.float() - z) * s)[mask] + o.corrections, dense[mask], atol=1e-6)
    lo = (kw.stats.T if rows else kw.stats) & 0xFFFF  # the statistics words: float16 scale in the low half
    s_kernel = lo.to(torch.int16).view(torch.float16)
    s_ref = (qw.statistics()[0] if isinstance(qw, SpQRWeight) else qw.scale).half()
    assert torch.equal(s_kernel, s_ref)
    back = kw.in_rows_layout()  # any weight goes to the rows layout and back to the same codes
    assert torch.equal(back.codes(), qw.codes) and torch.equal(back.stats.T if not rows else back.stats, kw.stats)


def test_group_map_with_uneven_groups_has_no_kernel_form():
    f = fmt(4, "sym", 32, g_idx=True)
    qw = random_weight(Case(f, 1, 8, 128), torch.Generator().manual_seed(0))
    qw.g_idx[:40] = 0  # group 0 now holds more than 32 columns
    with pytest.raises(ValueError, match="not 32 columns each"):
        kernel_weight(qw)


@pytest.mark.parametrize("form", [fmt(3, "asym", 64), SpQRFormat(3, 16, 16, 3), fmt(4, "sym", 32, g_idx=True)],
                         ids=["w3", "spqr", "g_idx"])
def test_quantlinear_saves_checkpoint_layout_after_kernel_form(form):
    from lowbit.recipe import LayerSpec
    from lowbit.runtime.qlinear import QuantLinear

    qw = random_weight(Case(form, 1, 32, 256, outlier_rate=0.03), torch.Generator().manual_seed(5))
    layer = QuantLinear.from_quantized(qw, LayerSpec(weight=form))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.prepare_kernels() and layer.kernel_layout
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    x = torch.randn(3, 256)
    # an input the kernels do not take: the reference runs on the checkpoint layout, restored once
    assert torch.allclose(layer(x), x @ qw.dequantize().T, atol=1e-5)
    assert not layer.kernel_layout and torch.equal(layer.qweight, before["qweight"])
    assert layer.prepare_kernels() and layer.kernel_layout
    layer.to(torch.device("cpu"))  # moving drops the kernel form; the checkpoint layout comes back
    assert not layer.kernel_layout and torch.equal(layer.qweight, before["qweight"])


def test_cpu_inputs_never_try_kernels(caplog):
    x = torch.randn(2, 8)
    assert not kernels.wanted_for(x)
    kernels.set_enabled(False)
    try:
        assert not kernels.enabled()
    finally:
        kernels.set_enabled(True)
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels"):
        kernels.say_fallback("a layer", "a reason for this test")
        kernels.say_fallback("a layer", "a reason for this test")
    assert sum("a reason for this test" in r.message for r in caplog.records) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_match_reference_on_gpu(dtype):
    from lowbit.kernels.check import check_all, check_w8a8

    bad = [(d, e) for d, e, ok in check_all("cuda", dtype) + check_w8a8("cuda", dtype) if not ok]
    assert not bad, bad


@pytest.mark.parametrize("float_zero", [False, True])
def test_gptq_batch_kernel_compiles_for_sm90(float_zero):
    from lowbit.kernels.gptq import _gptq_batch

    k = _compile_sm90(_gptq_batch, {"W": "*fp32", "Err": "*fp32", "S": "*fp32", "Z": "*fp32", "H": "*fp32",
                                    "D": "*fp32", "rows": "i32", "ncols": "i32", "stride_w": "i32", "stride_e": "i32",
                                    "stride_s": "i32", "stride_h": "i32", "qmax": "fp32"},
                      {"FLOAT_ZERO": float_zero, "BR": 32, "BB": 128})
    ptx = k.asm["ptx"]
    assert k.asm["cubin"] and "div.rn.f32" in ptx  # IEEE division, as the reference's


_INTERPRET_GPTQ = _INTERPRET.split("from lowbit.kernels.check")[0] + """
from lowbit.kernels.gptq import check
print(json.dumps(check("cpu")))
"""


def test_gptq_batch_kernel_matches_reference_in_interpreter():
    """GPTQ's fused column loop against the PyTorch loop it replaces on a GPU: the same codes and errors."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _INTERPRET_GPTQ], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) == 3 and all(ok for *_, ok in results), results
