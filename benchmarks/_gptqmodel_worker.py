"""Runs inside the GPTQModel benchmark environment (not lowbit's). Called by benchmarks/foreign_writers.py.

    quantize OUT --method gptq|awq --fmt gptq|gptq_v2|gemm --bits B --group-size G --desc-act 0|1 --sym 0|1
        GPTQModel quantizes stories260K's attention layers (its MLP width, 172, is not a multiple of the 8 codes a
        word holds) on CPU and saves OUT in the GPTQ or AWQ layout.
    logits DIR IDS OUT
        GPTQModel loads DIR with its torch kernels and writes the logits of the token windows IDS [n, seqlen] and
        each layer's weight as its own dequantization gives it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel's pools need it on a 2-core machine
CALIB = ["Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.",
         "One day, a big dog came to the park. The dog was very happy and wanted to play with Tom."] * 4


def quantize(a) -> None:
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    kw = {"bits": a.bits, "group_size": a.group_size, "sym": bool(a.sym), "format": a.fmt, "quant_method": a.method,
          "dynamic": {r"-:.*mlp.*": {}}}
    if a.method == "gptq":
        kw["desc_act"] = bool(a.desc_act)
    backend = BACKEND.AUTO
    if a.method == "awq":
        # GPTQModel's AWQ clip search asserts out_features % 64 == 0; stories260K's k/v_proj have 32 outputs. The
        # search is skipped for those layers only (the stored layout is unaffected).
        from gptqmodel.looper import awq_processor

        search = awq_processor.AWQProcessor._search_best_clip

        def narrow_safe(self, layer, named_linears, input_feat):
            keep = {n: m for n, m in named_linears.items() if m.weight.shape[0] % 64 == 0}
            return search(self, layer, keep, input_feat)

        awq_processor.AWQProcessor._search_best_clip = narrow_safe
        backend = BACKEND.AWQ_TORCH
    model = GPTQModel.load(a.source, QuantizeConfig(**kw), device="cpu")
    model.quantize(CALIB, batch_size=1, backend=backend)
    model.save(a.out)


@torch.no_grad()
def logits(a) -> None:
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(a.dir, backend=BACKEND.TORCH if "gptq" in a.kind else BACKEND.AWQ_TORCH, device="cpu")
    ids = torch.load(a.ids)
    out = torch.cat([model.model(input_ids=w.unsqueeze(0)).logits.float() for w in ids])
    weights = {n: _dequantized(m).float() for n, m in model.model.named_modules() if hasattr(m, "qweight")}
    torch.save({"logits": out, "weights": weights}, a.out)


def _dequantized(module) -> torch.Tensor:
    """The layer's weight [in, out] as GPTQModel's own kernels rebuild it (AWQ layers: the GEMM dequantization)."""
    if hasattr(module, "dequantize_weight"):
        return module.dequantize_weight()
    from gptqmodel.nn_modules.qlinear import torch_awq

    return torch_awq.dequantize_gemm(qweight=module.qweight, qzeros=module.qzeros, scales=module.scales,
                                     bits=module.bits, group_size=module.group_size)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("out")
    q.add_argument("--source", required=True)
    q.add_argument("--method", default="gptq")
    q.add_argument("--fmt", default="gptq")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=32)
    q.add_argument("--desc-act", type=int, default=1)
    q.add_argument("--sym", type=int, default=1)
    g = sub.add_parser("logits")
    g.add_argument("dir")
    g.add_argument("ids")
    g.add_argument("out")
    g.add_argument("--kind", default="gptq")
    a = p.parse_args()
    quantize(a) if a.cmd == "quantize" else logits(a)


if __name__ == "__main__":
    sys.exit(main())
