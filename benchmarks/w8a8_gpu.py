"""W8A8 and FP8 linear layers on a GPU: lowbit's codes matmul (activation quantization + torch._int_mm or
torch._scaled_mm + rescale) against bf16 F.linear, at Llama-3-8B MLP shapes; eager and under torch.compile
(which fuses the activation quantization and the rescale). Prints times and ratios.

    python benchmarks/w8a8_gpu.py      (needs CUDA; run through the device tool)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats import ActFormat, FP8Format, IntFormat, PerChannel, quantize
from lowbit.runtime.lowp import codes_matmul, weight_operand

SHAPES = {"gate/up 4096→14336": (14336, 4096), "down 14336→4096": (4096, 14336)}
TOKENS = (16, 256, 2048, 8192)


def timed(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    torch._dynamo.config.recompile_limit = 64  # one graph per shape, token count and format
    compiled = torch.compile(codes_matmul, dynamic=False)
    print("| shape | tokens | bf16 ms | int8 ms | int8 / bf16 | fp8 ms | fp8 / bf16 | int8 compiled / bf16 "
          "| fp8 compiled / bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev) * 0.02
        wb = w.to(torch.bfloat16)
        ops = {}
        for kind, fmt in (("int8", IntFormat(8, True, PerChannel())), ("fp8", FP8Format(PerChannel()))):
            act = ActFormat(kind)
            ops[kind] = (act, weight_operand(quantize(w, fmt), act))
        for m in TOKENS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t_bf16 = timed(lambda x=x, wb=wb: F.linear(x, wb))
            t = {kind: timed(lambda x=x, a=act, o=op: codes_matmul(x, a, None, *o, mode="native"))
                 for kind, (act, op) in ops.items()}
            fused = {kind: timed(lambda x=x, a=act, o=op: compiled(x, a, None, *o, mode="native"))
                     for kind, (act, op) in ops.items()}
            print(f"| {label} | {m} | {t_bf16:.3f} | {t['int8']:.3f} | {t['int8'] / t_bf16:.2f} | "
                  f"{t['fp8']:.3f} | {t['fp8'] / t_bf16:.2f} | {fused['int8'] / t_bf16:.2f} | "
                  f"{fused['fp8'] / t_bf16:.2f} |", flush=True)


if __name__ == "__main__":
    main()
