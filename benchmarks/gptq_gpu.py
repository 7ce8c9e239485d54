"""GPTQ w4a16 g128 with act-order on a Llama-3-8B-shaped model (generated weights), through lowbit's pipeline.

Llama-3-8B's shapes (32 blocks, hidden 4096, MLP 14336, 32 query / 8 key-value heads, vocabulary 128256), bf16
weights drawn once per shape and shared by every block (GPTQ's cost does not depend on the values), 128
calibration sequences of 2048 random tokens. Prints the wall time of capture and of the block-by-block GPTQ pass
and the peak GPU memory. Run on a GPU machine:

    python benchmarks/gptq_gpu.py [--blocks 32] [--samples 128] [--seqlen 2048] [--hessian 16bit|float32]

`--hessian float32` times the Hessian products in float32 on the CUDA cores (lowbit's default multiplies the
16-bit activations on the tensor cores, exactly, and sums in float32; lowbit.methods.gptq.accumulate).
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.methods import gptq
from lowbit.methods.gptq import GPTQConfig
from lowbit.methods.registry import get_method
from lowbit.model.capture import capture_block_inputs
from lowbit.model.loading import family_of
from lowbit.model.targets import select_layers
from lowbit.pipeline import activation_device, quantize_model
from lowbit.recipe import Recipe


def llama3_8b_shaped(blocks: int) -> nn.Module:
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=blocks, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                         tie_word_embeddings=False)
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    shared: dict[tuple, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            key = (name, tuple(p.shape), type(module).__name__)
            if key not in shared:
                t = torch.ones(p.shape, dtype=torch.bfloat16) if "norm" in type(module).__name__.lower() else \
                    (torch.randn(p.shape, dtype=torch.float32) * p.shape[-1] ** -0.5).to(torch.bfloat16)
                shared[key] = t
            module._parameters[name] = nn.Parameter(shared[key], requires_grad=False)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--hessian", choices=["16bit", "float32"], default="16bit")
    args = p.parse_args()
    gptq.SIXTEEN_BIT_PRODUCTS = args.hessian == "16bit"
    torch.manual_seed(0)
    t = time.perf_counter()
    model = llama3_8b_shaped(args.blocks)
    print(f"model built in {time.perf_counter() - t:.0f} s on {torch.cuda.get_device_name()}; Hessian products: "
          f"{args.hessian}", flush=True)
    family = family_of(model)
    recipe = Recipe(method="gptq", scheme="w4a16", group_size=128, options={"act_order": True})
    plan = select_layers(model, family, recipe)
    ids = torch.randint(0, 128256, (args.samples, args.seqlen))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    offload = activation_device(model, ids.numel(), torch.device("cuda"))
    inputs = capture_block_inputs(model, family, ids, "cuda", batch_size=8, offload=offload)
    t1 = time.perf_counter()
    print(f"captured block-0 inputs of {args.samples}x{args.seqlen} tokens in {t1 - t0:.1f} s; activations kept "
          f"on {offload}", flush=True)
    result = quantize_model(model, family, plan, get_method("gptq"), inputs, "cuda", offload, progress=True,
                            cfg=GPTQConfig(act_order=True))
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    per_block = [round(b.seconds, 1) for b in result.blocks]
    print(f"GPTQ over {args.blocks} blocks ({len(plan)} layers): {t2 - t1:.0f} s; per block {per_block}")
    peak = torch.cuda.max_memory_allocated() / 2**30
    errors = (result.blocks[0].output_error, result.blocks[-1].output_error)
    print(f"total (capture + GPTQ): {t2 - t0:.0f} s; peak GPU memory {peak:.1f} GiB; "
          f"block output errors first {errors[0]:.3e} last {errors[1]:.3e}")
    print(f"blocks with the residual shortcut: {sum(b.shortcut for b in result.blocks)}; with the attention "
          f"replayed: {sum(b.replay for b in result.blocks)}")


if __name__ == "__main__":
    main()
