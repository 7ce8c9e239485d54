"""What `lowbit quantize` (and the demo) print when a model is quantized: one line per fact, read at a glance."""

from __future__ import annotations

from pathlib import Path


def describe_spec(spec) -> str:
    w = spec.weight
    if w.kind == "spqr":
        stats = "float16 statistics" if w.stat_bits == 16 else f"{w.stat_bits}-bit statistics in groups of {w.beta2}"
        return f"int{w.bits} asym, groups of {w.beta1}, {stats}, sparse 16-bit outliers"
    if w.kind == "ggml":
        mix = f"llama.cpp's mix {spec_mix}; base " if (spec_mix := getattr(spec, "mix", None)) else ""
        return f"{mix}llama.cpp {w.type.upper()} ({w.t.bits_per_weight:g} bits per weight in GGUF)"
    gran = w.granularity.to_dict()
    names = {"per_tensor": "per tensor", "per_channel": "per channel"}
    where = names.get(gran["type"], f"groups of {gran.get('size')}")
    sym = "sym" if w.symmetric else ("asym, float zero" if w.kind == "int" and w.float_zero else "asym")
    kind = "fp8 e4m3" if w.kind == "fp8" else f"int{w.bits} {sym}"
    clip = ", clipped" if w.clip else ""
    act = f", {spec.act.describe()}" if spec.act else ""
    return f"{kind}, {where}{clip}{act}"


def print_summary(result, header: dict, out: Path) -> None:
    s = result.sizes
    by_type = ", ".join(f"{k} {v:.3f}" for k, v in s["bits_per_weight_by_type"].items())
    weights = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.glob("*.safetensors"))
    errors = [b.output_error for b in result.pipeline.blocks if b.output_error is not None]
    recipe, dtype = result.recipe, str(result.dtype).removeprefix("torch.")
    lines = [
        f"quantized {result.source} with {recipe.method} {recipe.scheme} ({describe_spec(recipe.default_spec)})",
        f"  layers       {s['quantized_layers']} linear layers in {len(result.pipeline.blocks)} blocks"
        f" ({s['quantized_weights'] / 1e6:.1f}M weights; other tensors kept in {dtype})",
        f"  bits/weight  {s['bits_per_weight']:.3f} including scales and zeros ({by_type})" if s["bits_per_weight"]
        else "  bits/weight  no linear layer quantized (16-bit weights)",
        f"  size         {s['bytes_16bit'] / 1e6:.1f} MB at 16 bits -> {weights / 1e6:.1f} MB of weights"
        f" (predicted {s['bytes_predicted'] / 1e6:.1f} MB;"
        f" {header['bytes_on_disk'] / 1e6:.1f} MB with config and tokenizer)",
    ]
    if result.group_size_note:
        lines.append(f"  group size   {result.group_size_note}")
    if recipe.kv_cache:
        queries = " and attention queries" if "attention" in recipe.parts else ""
        scales = "one calibrated scale per layer for keys and one for values" if recipe.kv_static \
            else "one scale per token and head"
        lines.append(f"  kv cache     {recipe.kv_cache}, {scales}{queries}")
    if result.allocation:
        a = result.allocation
        chosen = ", ".join(f"{n} × {label}" for label, n in sorted(a["layers"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  allocation   {a['bits_per_weight_measured']:.3f} bits per targeted weight, everything counted "
                     f"(target {a['target_bits_per_weight']:g}); predicted KL {a['predicted_kl']:.4f} "
                     f"(Fisher estimate); {chosen}; the per-layer formats are recipe.yaml's overrides")
    if errors:
        lines.append(f"  block error  relative output MSE on a calibration batch: first {errors[0]:.2e}, "
                     f"max {max(errors):.2e}, last {errors[-1]:.2e}")
    lines += [f"  time         {result.seconds:.1f} s", f"  output       {out}"]
    print("\n".join(lines))
