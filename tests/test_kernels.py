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
from lowbit.formats import FP8Format, IntFormat, PerChannel, PerGroup, PerTensor
from lowbit.formats.activation import ActFormat
from lowbit.formats.packing import pack, unpack
from lowbit.kernels.layout import deinterleave, interleave, kernel_words, slice_words
from lowbit.kernels.linear import choose_tiles, unsupported

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
from lowbit.kernels.check import check_all, check_w8a8
print(json.dumps(check_all("cpu", torch.float16, small=True)))
print(json.dumps(check_w8a8("cpu", torch.float16, small=True, kinds=("int8",))))
"""


@pytest.mark.slow
def test_every_kernel_variant_matches_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _INTERPRET], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    results, w8a8 = json.loads(lines[-2]), json.loads(lines[-1])
    assert len(results) >= 36  # 3 bit widths × 3 grids × 4 groupings, plus ragged K
    assert len(w8a8) == 9  # per-token, per-tensor and static activations on three shapes
    bad = [(d, e) for d, e, ok in results + w8a8 if not ok]
    assert not bad, bad
    assert {d.split(" [")[1].split(" ")[0].rstrip("]") for d, *_ in results} >= {"auto", "gemv", "dot", "dequant"}


def _compile_sm90(fn, signature: dict, constexprs: dict):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # pointers and sizes divisible by 16, as the runtime specializes them for aligned tensors
    aligned = [[(i,), [["tt.divisibility", 16]]] for i, (name, t) in enumerate(signature.items())
               if t.startswith("*") or name in ("K", "KW", "NG", "stride_xm", "stride_ym")]
    src = ASTSource(fn, {**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                    attrs={k: v for k, v in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})


@pytest.mark.parametrize("bits,group,zero", [(4, 128, False), (4, 64, True), (8, 0, False), (2, 32, True)])
def test_kernels_compile_for_sm90(bits, group, zero):
    from lowbit.kernels.wxa16 import dequant_kernel, dot_kernel, gemv_kernel

    common = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i32" if zero else "*fp16",
              "b_ptr": "*fp16", "y_ptr": "*fp16"}
    stats = {"BITS": bits, "GROUP": group, "HAS_ZERO": zero}
    gemv = _compile_sm90(gemv_kernel, {**common, "N": "i32", "K": "i32", "KW": "i32", "NG": "i32",
                                       "stride_xm": "i32", "stride_ym": "i32"},
                         {**stats, "HAS_BIAS": True, "BN": 16, "BW": slice_words(bits, group), "SPLIT_K": 1,
                          "UNROLL": 2})
    dot = _compile_sm90(dot_kernel, {**common, "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "KW": "i32",
                                     "NG": "i32", "stride_xm": "i32", "stride_ym": "i32"},
                        {**stats, "HAS_BIAS": False, "BM": 16, "BN": 128, "BW": slice_words(bits, group),
                         "SPLIT_K": 4})
    deq = _compile_sm90(dequant_kernel, {"w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": common["z_ptr"],
                                         "out_ptr": "*bf16", "N": "i32", "K": "i32", "KW": "i32", "NG": "i32"},
                        {**stats, "BN": 16, "BW": slice_words(bits, group)})
    for k in (gemv, dot, deq):
        assert ".target sm_90" in k.asm["ptx"] and k.asm["cubin"]
    assert "mma" in dot.asm["ptx"]  # the tensor-core path really uses tensor cores
    assert "red.global" in dot.asm["ptx"] or "atom.global" in dot.asm["ptx"]  # split-K adds partial sums


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
    assert "3-bit" in unsupported(IntFormat(3, granularity=PerGroup(128)), None)
    assert "float zero" in unsupported(IntFormat(4, symmetric=False, granularity=PerGroup(32), zero_point="float"),
                                       None)
    assert "groups of 48" in unsupported(IntFormat(4, granularity=PerGroup(48)), None)
    assert "whole tensor" in unsupported(IntFormat(8, granularity=PerTensor()), None)
    assert "fp8" in unsupported(FP8Format(), None)
    assert "activations" in unsupported(IntFormat(8, granularity=PerChannel()), ActFormat("int8"))


def test_tiles_follow_problem_shape():
    assert choose_tiles(1, 14336, 4096, 4, 132).mode == "gemv"
    t = choose_tiles(16, 4096, 14336, 4, 132)
    assert t.mode == "dot" and t.bm == 16 and t.split_k > 1  # few output tiles: K is split to fill the GPU
    assert choose_tiles(64, 14336, 4096, 4, 132).bm == 64
    assert choose_tiles(2048, 14336, 4096, 4, 132).mode == "dequant"
    assert choose_tiles(1, 4096, 14336, 4, 132).split_k == 1  # 256 blocks of 16 outputs fill 132 SMs
    assert choose_tiles(1, 1024, 14336, 4, 132).split_k == 4  # 64 blocks do not: K is split


@pytest.mark.parametrize("bits,group,k", [(4, 128, 4096), (4, 0, 200), (8, 64, 384), (2, 32, 1000), (4, 16, 96),
                                          (4, 1024, 2048)])
def test_kernel_layout_round_trip_and_slices(bits, group, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (5, k), generator=g, dtype=torch.uint8)
    qweight = pack(codes, bits)
    bw = slice_words(bits, group)
    kw = interleave(qweight, bits, k, bw)
    assert kw.shape == (5, kernel_words(k, bits, bw))
    assert torch.equal(deinterleave(kw, bits, k, bw), qweight)
    # field j of word w of tile t holds column t·BW·P + j·BW + w: the kernels' slice
    per = 32 // bits
    fields = unpack(kw, bits, kw.shape[1] * per).reshape(5, -1, bw, per)
    t, j, w = kw.shape[1] // bw - 1, per - 1, bw // 2
    col = t * bw * per + j * bw + w
    assert fields[:, t, w, j].tolist() == (codes[:, col].tolist() if col < k else [0] * 5)
    if group:  # a slice never straddles two groups, a tile holds whole groups
        assert group % bw == 0 and (bw * per) % group == 0


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
