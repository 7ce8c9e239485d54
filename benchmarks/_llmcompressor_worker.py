"""Runs inside the llm-compressor benchmark environment (not lowbit's): GPTQ w4a16 on given calibration ids.

Writes a plain Hugging Face directory whose linear weights are llm-compressor's dequantized (fake-quantized)
values, so lowbit's evaluation reads it like any float model. Called by benchmarks/llmcompressor_gptq.py.
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
    args = p.parse_args()
    start = time.perf_counter()
    ids = torch.load(args.ids)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    names = set(model.state_dict())
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": args.group_size}
    recipe = GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                          dampening_frac=0.01, block_size=128, actorder="static")
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], pipeline="sequential")
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
