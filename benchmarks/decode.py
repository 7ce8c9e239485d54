"""End to end on the GPU: a Llama-3-8B-shaped model (generated weights) in bf16 and in lowbit's formats, the same
greedy loop for all: prefill into a static KV cache, then one decode step per token replayed from a CUDA graph.

    python3 benchmarks/decode.py [--formats bf16,w4a16,w8a16,w8a8,fp8,spqr] [--tiny] [--out DIR]   (PYTHONPATH=.)

For each format: decode tokens/s at batch 1 and 16 (a 128-token prompt, then 128 new tokens; the graph of one
step is captured once and replayed), the time of a 2048-token prefill at batch 1, the GPU memory the model takes
(weights) and the peak during the runs. Quantized layers are made by lowbit's round-to-nearest on the generated
bf16 weights (w4a16: int4 symmetric groups of 128; w8a16: int8 per channel; w8a8: int8 per channel with dynamic
per-token int8 activations; fp8: per-channel fp8 weights with dynamic per-token fp8 activations), lm_head
included, embeddings kept in bf16. SpQR needs calibration to quantize; its layers here hold random codes and
statistics in their valid ranges (3-bit weights and statistics, β1 = β2 = 16, 1% outliers), which times the same
kernels as a calibrated model. --tiny runs a two-layer model of the same family (a smoke test; CPU works).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lowbit from this checkout
from lowbit.formats import FP8Format, IntFormat, PerChannel, PerGroup, SpQRFormat, quantize
from lowbit.formats.activation import ActFormat
from lowbit.kernels.check import random_spqr
from lowbit.model.loading import to_device
from lowbit.recipe import LayerSpec
from lowbit.runtime.qlinear import QuantLinear, set_module

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(LLAMA3_8B, hidden_size=512, intermediate_size=1792, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=4096)
SPECS = {
    "w4a16": LayerSpec(IntFormat(4, granularity=PerGroup(128))),
    "w8a16": LayerSpec(IntFormat(8, granularity=PerChannel())),
    "w8a8": LayerSpec(IntFormat(8, granularity=PerChannel()), ActFormat("int8")),
    "fp8": LayerSpec(FP8Format(PerChannel()), ActFormat("fp8")),
    "spqr": LayerSpec(SpQRFormat(3, 16, 16, 3)),
}
SPQR_OUTLIERS = 0.01


def build(config: dict, device: torch.device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**config)
    with device:
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def quantize_model(model, spec: LayerSpec) -> None:
    """Every linear layer (lm_head included) replaced in place by a QuantLinear from lowbit's round-to-nearest."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, name in enumerate(names):
        linear = model.get_submodule(name)
        if isinstance(spec.weight, SpQRFormat):
            g = torch.Generator(linear.weight.device).manual_seed(i)
            qw = random_spqr(spec.weight, *linear.weight.shape, SPQR_OUTLIERS, g)
        else:
            qw = quantize(linear.weight.detach().float(), spec.weight)
        set_module(model, name, QuantLinear.from_quantized(qw, spec))
        del linear, qw


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_rate(model, batch: int, prompt: int, steps: int, device: torch.device) -> dict:
    """Tokens/s of greedy decoding: eager prefill into a StaticCache, then `steps` replays of one captured step."""
    from transformers import StaticCache

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(prompt, device=device))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        pos = torch.tensor([prompt], device=device)

        def step():
            logits = model(input_ids=token, past_key_values=cache, use_cache=True, cache_position=pos).logits
            token.copy_(logits[:, -1].argmax(-1, keepdim=True))
            pos.add_(1)

        graph = None
        if device.type == "cuda":
            graph = capture(step, pos, prompt)
        run = graph.replay if graph is not None else step
        run()
        sync(device)
        pos.fill_(prompt)
        t = time.perf_counter()
        for _ in range(steps):
            run()
        sync(device)
        seconds = time.perf_counter() - t
    return {"batch": batch, "tokens_per_s": batch * steps / seconds, "ms_per_step": seconds / steps * 1e3,
            "graph": graph is not None}


def capture(step, pos: torch.Tensor, prompt: int):
    """One decode step as a CUDA graph, or None (eager, said) where the model cannot be captured."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # warm-up (Triton compiles, cuBLAS picks algorithms)
                step()
        torch.cuda.current_stream().wait_stream(s)
        pos.fill_(prompt)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        pos.fill_(prompt)
        return graph
    except RuntimeError as e:
        print(f"CUDA graph capture failed, timing eager steps: {e}", flush=True)
        torch.cuda.synchronize()
        pos.fill_(prompt)
        return None


def prefill_time(model, tokens: int, device: torch.device) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    times = []
    with torch.no_grad():
        for _ in range(4):
            sync(device)
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def measure(name: str, config: dict, device: torch.device, args) -> dict:
    model = build(config, device)
    if name != "bf16":
        quantize_model(model, SPECS[name])
        to_device(model, device, torch.bfloat16)  # puts the quantized layers into the kernels' layout
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() if device.type == "cuda" else \
        sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    row = {"format": name, "weights_gb": weights / 1e9}
    row["decode"] = [decode_rate(model, b, args.prompt, args.steps, device) for b in (1, 16)]
    row["prefill_2048_ms"] = prefill_time(model, args.prefill, device) * 1e3
    if device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(row), flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="bf16,w4a16,w8a16,w8a8,fp8,spqr")
    p.add_argument("--tiny", action="store_true", help="a two-layer model of the same family (smoke test)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--out", default="out/bench/decode")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = TINY if args.tiny else LLAMA3_8B
    if device.type == "cuda":
        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    rows = [measure(f, config, device, args) for f in args.formats.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(rows, indent=1))
    base = rows[0]
    print(f"\n{'format':8}{'weights GB':>11}{'peak GB':>9}{'tok/s b1':>10}{'tok/s b16':>11}{'prefill ms':>11}"
          f"{'b1 vs ' + base['format']:>12}{'prefill vs':>11}")
    for r in rows:
        b1, b16 = r["decode"][0]["tokens_per_s"], r["decode"][1]["tokens_per_s"]
        print(f"{r['format']:8}{r['weights_gb']:11.2f}{r.get('peak_gb', 0):9.2f}{b1:10.1f}{b16:11.1f}"
              f"{r['prefill_2048_ms']:11.1f}{b1 / base['decode'][0]['tokens_per_s']:12.2f}"
              f"{base['prefill_2048_ms'] / r['prefill_2048_ms']:11.2f}")


if __name__ == "__main__":
    main()
