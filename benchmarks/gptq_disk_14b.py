"""GPTQ w4a16 g128 of a 14B-class Llama-shaped model read block by block from disk: wall time, peak host and GPU memory.

The model: 48 blocks of hidden 5120, MLP 13824, 40 query and 8 key-value heads (Qwen2.5-14B's block shapes), about
13.2B parameters in bf16 (26 GB), generated on the GPU and written as safetensors shards (two blocks each) to
`--dir` on the machine's disk. The tokenizer is stories260K's (a Llama tokenizer of 512 tokens, so the embeddings
are small; the blocks are what costs). Then `lowbit quantize DIR --method gptq --act-order` runs in a child process
under a small watcher whose RUSAGE_CHILDREN peak is the run's resident memory. Run on a GPU machine, with
LOWBIT_SHARED pointing at a folder that holds models/stories260K and LOWBIT_DATA at the calibration data:

    python benchmarks/gptq_disk_14b.py [--dir /tmp/lowbit-14b] [--layers 48] [--samples 128] [--seqlen 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowbit.hardware import run_measured

HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM = 5120, 13824, 40, 8, 128


def block_tensors(i: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = {"self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
              "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
              "mlp.gate_proj": (MLP, HIDDEN), "mlp.up_proj": (MLP, HIDDEN), "mlp.down_proj": (HIDDEN, MLP)}
    out = {f"model.layers.{i}.{n}.weight": (torch.randn(s, device="cuda", generator=g) * s[1] ** -0.5)
           .to(torch.bfloat16).cpu() for n, s in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{norm}.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    return out


def write_model(directory: Path, layers: int, stories: Path) -> int:
    directory.mkdir(parents=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": 512, "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False, "dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(stories / name, directory / name)
    shards = -(-layers // 2) + 1
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        if k < shards - 1:
            tensors = {**block_tensors(2 * k, g), **(block_tensors(2 * k + 1, g) if 2 * k + 1 < layers else {})}
        else:
            tensors = {"model.embed_tokens.weight": (torch.randn(512, HIDDEN) * 0.02).to(torch.bfloat16),
                       "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                       "lm_head.weight": (torch.randn(512, HIDDEN) * HIDDEN ** -0.5).to(torch.bfloat16)}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/lowbit-14b")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    args = p.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    stories = Path(os.environ.get("LOWBIT_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "models" / \
        "stories260K"
    t = time.perf_counter()
    size = write_model(root / "model", args.layers, stories)
    print(f"{torch.cuda.get_device_name()}: wrote {size / 1e9:.1f} GB ({args.layers} blocks) in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    argv = [sys.executable, "-m", "lowbit", "quantize", str(root / "model"), "--out", str(root / "q"), "--method",
            "gptq", "--scheme", "w4a16", "--group-size", "128", "--act-order", "--calib-samples", str(args.samples),
            "--calib-seqlen", str(args.seqlen), "--device", "cuda", "--quiet"]
    run = run_measured(argv)
    print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
    if run.returncode:
        raise SystemExit("the quantization failed")
    header = json.loads((root / "q" / "lowbit.json").read_text())
    blocks = [b["seconds"] for b in header["blocks"]]
    print(f"GPTQ w4a16 g128 act-order from disk, {args.samples}x{args.seqlen} calibration tokens: "
          f"wall {run.seconds:.0f} s; "
          f"blocks {min(blocks):.1f}-{max(blocks):.1f} s (sum {sum(blocks):.0f} s); peak host RSS "
          f"{run.peak_rss_bytes / 1e9:.1f} GB ({run.peak_rss_bytes / size:.2f}x the model); peak GPU memory "
          f"{header['memory'].get('peak_device_bytes', 0) / 2**30:.1f} GiB; output "
          f"{header['bytes_on_disk'] / 1e9:.1f} GB")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
