"""Runs inside the llm-compressor benchmark environment (not lowbit's): GPTQ or AWQ w4a16 on given calibration ids.

Writes a plain Hugging Face directory whose linear weights are llm-compressor's dequantized (fake-quantized)
values, so lowbit's evaluation reads it like any float model (benchmarks/llmcompressor_gptq.py), or with
--compressed the compressed-tensors directory llm-compressor itself saves (benchmarks/llmcompressor_ct.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=("gptq", "awq"), default="gptq")
    p.add_argument("--compressed", action="store_true", help="save llm-compressor's compressed-tensors directory")
    args = p.parse_args()
    start = time.perf_counter()
    ids = torch.load(args.ids)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    names = set(model.state_dict())
    weights = {"num_bits": 4, "type": "int", "symmetric": args.method == "gptq", "strategy": "group",
               "group_size": args.group_size}
    groups = {"g": {"targets": ["Linear"], "weights": weights}}
    if args.method == "gptq":
        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01, block_size=128,
                              actorder="static")
    else:  # llm-compressor's AWQ default: asymmetric groups
        from llmcompressor.modifiers.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not torch.cuda.is_available():  # 0.14.0.1's AWQ pins CPU memory, which needs a GPU: skip the pinning
            IntermediatesCache.pin_memory = lambda self, *a, **k: None

        recipe = AWQModifier(config_groups=groups, ignore=["lm_head"])
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], pipeline="sequential")
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compressed:
        model.save_pretrained(str(out), save_compressed=True)
        for f in Path(args.model).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, out / f.name)
        (out / "llmcompressor.json").write_text(json.dumps({"seconds": seconds}))
        print(json.dumps({"seconds": round(seconds, 1)}))
        return
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if k in names}
    if "lm_head.weight" in state and model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in Path(args.model).iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    levels = max(len(torch.unique(g)) for g in w[:8].reshape(-1, args.group_size))
    (out / "llmcompressor.json").write_text(json.dumps({"seconds": seconds, "max_levels_per_group": levels}))
    print(json.dumps({"seconds": round(seconds, 1), "max_levels_per_group": levels}))


if __name__ == "__main__":
    main()
