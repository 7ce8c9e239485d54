"""What the CLI calls: load(), load_tokenizer(), quantize(), save(), fake_quantize_model()."""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.data.calibration import CalibConfig, calibration_ids
from lowbit.data.datasets import calibration_file
from lowbit.errors import LowbitError
from lowbit.eval.result import EvalResult
from lowbit.formats import fake_quantize, fake_quantize_activation
from lowbit.formats.spec import LayerSpec
from lowbit.hardware import peak_memory, resolve_compute_dtype, resolve_device
from lowbit.io.checkpoint import is_packed, quantized_layers, save_checkpoint, unique_state_dict
from lowbit.io.foreign import READABLE
from lowbit.io.scales import SCALES_FILE, load_scales, scales_file
from lowbit.methods.registry import MethodEntry, get_method, transform_name
from lowbit.model.adapt import adapt
from lowbit.model.architectures import text_config
from lowbit.model.capture import BlockInputs, Where, capture_block_inputs
from lowbit.model.loading import (  # noqa: F401 (the public API)
    checkpoint_dtype,
    family_of,
    load,
    load_tokenizer,
    model_type,
    to_device,
)
from lowbit.model.sources import resolve
from lowbit.model.targets import fit_group_size, linear_layers, select_layers
from lowbit.pipeline import MoEConfig, PipelineResult, activation_device, quantize_model
from lowbit.recipe import Recipe
from lowbit.runtime import kvcache

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FP16_MAX = 65504.0


def storage_dtype(model: nn.Module, requested: str = "auto") -> torch.dtype:
    """16-bit dtype for unquantized tensors: the model's own 16-bit dtype, else float16 when every value fits."""
    return storage_dtype_of(model, requested, lambda: model.state_dict().values())


def storage_dtype_of(model: nn.Module, requested: str, tensors: Callable[[], Iterable[torch.Tensor]]) -> torch.dtype:
    """storage_dtype, where the model's values come from `tensors()` (read only when the config does not say)."""
    if requested != "auto":
        if requested not in _DTYPES:
            raise LowbitError(f"unknown --dtype {requested!r}: use auto, {', '.join(_DTYPES)}.")
        return _DTYPES[requested]
    own = getattr(model, "checkpoint_dtype", None) or checkpoint_dtype(model.config)
    if own is not None:
        return own
    fits = all(t.abs().max().item() <= FP16_MAX for t in tensors() if t.is_floating_point() and t.numel())
    return torch.float16 if fits else torch.bfloat16


def round_unquantized(model: nn.Module, dtype: torch.dtype, skip: set[str]) -> None:
    """Round every stored float tensor outside `skip` layers through `dtype` (what a checkpoint keeps), in place."""
    prefixes = tuple(n + "." for n in skip)
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point() and not key.startswith(prefixes):
                t.data = t.data.to(dtype).to(t.dtype)


@dataclass
class QuantizeResult:
    model: nn.Module
    recipe: Recipe
    plan: dict[str, LayerSpec]
    dtype: torch.dtype
    seconds: float
    pipeline: PipelineResult
    calib: CalibConfig | None = None
    source: str = ""
    sizes: dict = field(default_factory=dict)
    compute_dtype: str = "float32"
    allocation: dict | None = None  # mixed precision: how the per-layer formats were chosen (lowbit.choose.mixed)
    memory: dict | None = None  # peak host and device memory of the process, at the end of the run
    group_size_note: str | None = None  # the group size was chosen automatically, and why (fit_group_size)


def calibration_needed(recipe: Recipe, reuse_scales: str | Path | None = None) -> bool:
    """Whether the recipe's method (or its static activation or KV scales) needs calibration data."""
    entry = get_method(recipe.method)
    needs = entry.module.NEEDS_CALIBRATION if reuse_scales is not None else entry.needs_calibration
    return bool(needs or recipe.act_static or recipe.kv_static)


def check_calibration_data(recipe: Recipe, calib: CalibConfig | None, reuse_scales: str | Path | None) -> bool:
    """Whether the run reads calibration data; if it does, that its file exists (said before any model loads)."""
    if calib is None and not calibration_needed(recipe, reuse_scales):
        return False
    calibration_file((calib or CalibConfig()).dataset)
    return True


def fitted_recipe(model: nn.Module, family, recipe: Recipe, say: bool) -> tuple[Recipe, str | None]:
    """The recipe with a group size that fits the model (lowbit.model.targets.fit_group_size), said on stderr."""
    recipe, note = fit_group_size(model, family, recipe)
    if note and say:
        print(f"lowbit: group size {note}", file=sys.stderr)
    return recipe, note


def quantize(model: str | Path | nn.Module, recipe: str | Recipe | Mapping | None = None, *,
             method: str | None = None, group_size: int | None = None, tokenizer=None,
             calib: CalibConfig | Mapping | None = None, device: str = "auto", dtype: str = "auto",
             compute_dtype: str = "auto", progress: bool = True, reuse_scales: str | Path | None = None,
             **settings) -> QuantizeResult:
    """Quantize a model as the recipe says, block by block; returns the model with QuantLinear layers (save it with
    `lowbit.save`, or `lowbit.export` it for vLLM or llama.cpp).

    `model`: a loaded model, a Hugging Face directory, a .gguf file or a built-in name (smollm2-135m).
    `recipe`: a scheme's name ("w4a16", "w8a8", "fp8", "q4_k_m", …), a preset's, a mapping of recipe fields or a
    `lowbit.Recipe`; `method` ("rtn", "gptq", "awq", …), `group_size` (default: the scheme's, fitted to the model)
    and `settings` (other recipe fields such as `targets` or `ignore`, and the method's options such as
    `act_order=True`) refine it (lowbit.Recipe.of). `calib`: a `lowbit.CalibConfig` or a mapping of its fields
    (dataset, samples, seqlen, seed).

    `reuse_scales` (AWQ, SmoothQuant): apply the scales an earlier run saved (its checkpoint directory, or its
    scales.safetensors) instead of searching them.

    Calibration data is used when the method needs it, or when `calib` is given (RTN then reports each block's
    output error on it). Calibration forward passes run in `compute_dtype` (auto: bfloat16 where the hardware is
    fast at it); statistics and quantization stay in float32, from the original weights.
    """
    start = time.perf_counter()
    recipe = Recipe.of(recipe, method=method, group_size=group_size, **settings)
    if isinstance(calib, Mapping):
        calib = CalibConfig.from_dict(calib)
    source = str(model) if not isinstance(model, nn.Module) else getattr(model, "name_or_path", "")
    if not isinstance(model, nn.Module):
        kind = resolve(model).kind
        if kind in ("lowbit", *READABLE):
            what = "already a lowbit checkpoint (its lowbit.json names the source model under source_model)" \
                if kind == "lowbit" else f"already quantized (a {kind} checkpoint)"
            raise LowbitError(f"{source!r} is {what}; quantize the original float model instead.")
        if check_calibration_data(recipe, calib, reuse_scales) and tokenizer is None:
            tokenizer = load_tokenizer(model)
        model = load(model, progress=progress)
    method, reused = method_for(recipe, reuse_scales)
    family = family_of(adapt(model))
    recipe, group_note = fitted_recipe(model, family, recipe, progress)
    plan = select_layers(model, family, recipe)
    check_finite(linear_layers(model), plan)
    store_dtype = storage_dtype(model, dtype)
    # What the checkpoint will hold, from the start: calibration then sees exactly the model that is stored.
    round_unquantized(model, store_dtype, set(plan))
    dev = resolve_device(device)
    cdtype = resolve_compute_dtype(compute_dtype, dev)
    calib = calibration_for(recipe, method, reused, plan, family, calib)
    inputs, ids, offload = calibrate(model, family, tokenizer, calib, dev, cdtype)
    with memory_advice(model, calib, dev):
        result = quantize_model(model, family, plan, method, inputs, dev, offload, progress=progress,
                                cfg=recipe.config(method.module.Config), compute_dtype=cdtype,
                                transform_cfg=recipe.config(method.transform.Config) if method.transform else None,
                                moe=MoEConfig(recipe.expert_min_tokens, recipe.experts_all_tokens),
                                reuse_scales=reused)
    static_kv = None
    if recipe.kv_static:
        static_kv = kvcache.attention_modules(model, family.blocks)
        kvcache.calibrate_static_scales(model, static_kv, recipe.kv_cache, ids, store_dtype)
    if recipe.kv_cache:
        kvcache.enable(model, recipe.kv_cache, attention="attention" in recipe.parts, static=static_kv)
    if method.transform is not None:  # the folded scales changed float tensors: keep what the checkpoint keeps
        round_unquantized(model, store_dtype, set(plan))
    if "lm_head" in plan and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    out = QuantizeResult(model, recipe, plan, store_dtype, time.perf_counter() - start, result, calib, source,
                         compute_dtype=str(cdtype).removeprefix("torch."), group_size_note=group_note)
    out.sizes = size_report(model, store_dtype)
    out.memory = peak_memory(dev)
    return out


def method_for(recipe: Recipe, reuse_scales: str | Path | None) -> tuple[MethodEntry, dict | None]:
    """The recipe's method, and the scales an earlier run saved when they are to be reused (checked)."""
    method = get_method(recipe.method)
    reused = None
    if reuse_scales is not None:
        if method.transform is None:
            raise LowbitError(f"--reuse-scales applies AWQ's or SmoothQuant's saved scales; method {recipe.method} "
                              f"folds no scales. Drop --reuse-scales, or use the method that saved them.")
        reused = load_scales(reuse_scales, transform_name(method))
    if method.required_scheme and recipe.scheme != method.required_scheme:
        raise LowbitError(f"--method {recipe.method} needs --scheme {method.required_scheme}, not {recipe.scheme}.")
    return method, reused


def check_finite(linears: dict[str, nn.Module], plan: dict[str, LayerSpec]) -> None:
    for name in plan:
        if name in linears and not torch.isfinite(linears[name].weight).all():
            raise LowbitError(f"layer {name} has NaN or Inf weights; a quantized grid cannot represent them. Check "
                              f"the checkpoint, or skip the layer with --ignore '{name}'.")


def calibration_for(recipe: Recipe, method: MethodEntry, reused, plan: dict[str, LayerSpec], family,
                    calib: CalibConfig | None) -> CalibConfig | None:
    """The calibration the run needs: the one given, else the default where the method or the recipe needs one."""
    static = [n for n, spec in plan.items() if spec.act is not None and spec.act.static]
    outside = [n for n in static if not n.startswith(family.blocks + ".")]
    if outside:
        raise LowbitError(f"static activation scales are calibrated inside the decoder blocks; {outside[0]} lies "
                          f"outside them. Give it dynamic scales (a recipe override with another scheme) or skip it.")
    # reused scales need no search: the method then calibrates only what its rounding needs (RTN: nothing)
    needs = method.module.NEEDS_CALIBRATION if reused is not None else method.needs_calibration
    if calib is None and (needs or static or recipe.kv_static):
        calib = CalibConfig()
    return calib


def calibrate(model: nn.Module, family, tokenizer, calib: CalibConfig | None, dev: torch.device,
              cdtype: torch.dtype, spill_dir: str | Path | None = None
              ) -> tuple[BlockInputs | None, torch.Tensor | None, Where]:
    """Block 0's inputs on the calibration set (and the ids, and where activations live: see activation_device),
    or nothing."""
    if calib is None:
        return None, None, torch.device("cpu")
    if tokenizer is None:
        raise LowbitError("calibration needs the model's tokenizer: pass tokenizer= or a model name or path.")
    ids = calibration_ids(tokenizer, calib, getattr(text_config(model), "max_position_embeddings", None))
    offload = activation_device(model, ids.numel(), dev, cdtype, spill_dir)
    with memory_advice(model, calib, dev):
        return capture_block_inputs(model, family, ids, dev, offload=offload, dtype=cdtype), ids, offload


@contextmanager
def memory_advice(model: nn.Module, calib: CalibConfig | None, device: torch.device) -> Iterator[None]:
    """Re-raise running out of GPU or host memory with the numbers and what to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
        text = str(e)
        gpu = isinstance(e, torch.OutOfMemoryError)
        if not (gpu or isinstance(e, MemoryError) or "can't allocate memory" in text):
            raise
        config = text_config(model)
        where = f"the GPU ({device})" if gpu else "host memory"
        acts = ""
        if calib is not None:
            tokens = calib.samples * calib.seqlen
            acts = (f" The calibration is {calib.samples} × {calib.seqlen} = {tokens:,} tokens; each block's inputs "
                    f"and outputs take {2 * tokens * config.hidden_size * 2 / 1e9:.1f} GB in 16 bits.")
        raise LowbitError(f"ran out of {where} while quantizing ({text.splitlines()[0][:200]}).{acts} Lower "
                          f"--calib-samples or --calib-seqlen, or free memory"
                          f"{', or quantize on the CPU (--device cpu)' if gpu else ''}.") from None


def size_report(model: nn.Module, dtype: torch.dtype, others: tuple[int, int] | None = None) -> dict:
    """Bits per weight (overall and per layer type) and bytes, counting every stored bit. `others`: the number and
    the stored bytes of the values outside the quantized layers' packed buffers, when the model does not hold them
    all (streaming: read from the written shards)."""
    qlayers = quantized_layers(model)
    bits, numel = defaultdict(int), defaultdict(int)
    for name, m in qlayers.items():
        kind = name.rsplit(".", 1)[-1]
        bits[kind] += m.stored_bits()
        numel[kind] += m.in_features * m.out_features
    if others is None:
        tensors, _ = unique_state_dict(model)
        qprefixes = tuple(n + "." for n in qlayers)
        rest = [t for k, t in tensors.items() if not is_packed(k, qprefixes)]
        others = (sum(t.numel() for t in rest),
                  sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in rest))
    other_params, other_bytes = others
    qbits, qnumel = sum(bits.values()), sum(numel.values())
    return {
        "quantized_layers": len(qlayers),
        "quantized_weights": qnumel,
        "bits_per_weight": qbits / qnumel if qnumel else None,
        "bits_per_weight_by_type": {k: bits[k] / numel[k] for k in sorted(bits)},
        "other_params": other_params,
        "bytes_16bit": 2 * (qnumel + other_params),
        "bytes_predicted": qbits // 8 + other_bytes,
    }


def evaluate(reference: str | Path | nn.Module | None, candidate: str | Path | nn.Module | None = None, *,
             kl: bool = True, ppl: str | Iterable[str] = (), tasks: str | Iterable[str] = (), device: str = "cpu",
             progress: bool = True, **options) -> EvalResult:
    """Compare `candidate` with `reference` as `lowbit eval` does; returns what was measured (`.to_dict()` is the
    JSON object of `lowbit eval --json`).

    Both are models lowbit can load (paths, built-in names, lowbit or GGUF checkpoints, or
    `openai+http://HOST:PORT/v1#MODEL` for a served model; a served reference needs `tokenizer=`, a local model with
    its tokenizer) or models already in memory (a QuantizeResult's `.model`, say). `kl`: the KL divergence and token
    rejection rate on the reference's generations (Fireworks' method); `ppl`: perplexity corpora ("wikitext2", "ptb",
    "c4" or text files); `tasks`: zero-shot tasks ("piqa", "arc_easy", …). `options`: the other settings of
    lowbit.eval.runner.EvalConfig by name (prompts, max_prompts, max_new_tokens, top_n, save_reference,
    reference_record, seqlen, max_windows, limit, batch_tokens, seed, …).
    Missing data and unwritable outputs are refused before any model loads.
    """
    from lowbit.eval.preflight import check_eval_inputs
    from lowbit.eval.runner import EvalConfig
    from lowbit.eval.runner import evaluate as run

    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise LowbitError(f"unknown evaluation setting(s) {', '.join(map(repr, unknown))}; the settings are "
                          f"{', '.join(sorted(fields - {'reference', 'candidate'}))}.")
    names = {k: tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) else tuple(v)
             for k, v in {"ppl": ppl, "tasks": tasks, **({"kl_text": options.pop("kl_text")}
                                                        if "kl_text" in options else {})}.items()}
    cfg = EvalConfig(reference=reference, candidate=candidate, kl=kl, device=device, progress=progress,
                     **names, **options)
    check_eval_inputs(cfg)
    return EvalResult.from_dict(run(cfg))


def save(result: QuantizeResult, out_dir: str | Path, *, tokenizer=None, overwrite: bool = False) -> dict:
    """Write a QuantizeResult as a lowbit checkpoint (atomically); returns its header."""
    info, texts, extra = checkpoint_extras(result)
    return save_checkpoint(result.model, out_dir, dtype=result.dtype, tokenizer=tokenizer, overwrite=overwrite,
                           info=info, texts=texts, tensor_files=extra)


def checkpoint_extras(result: QuantizeResult) -> tuple[dict, dict[str, str], dict]:
    """What a checkpoint's header says of the run, its text files (recipe.yaml) and extra tensor files (scales)."""
    info = {
        "method": result.recipe.method, "scheme": result.recipe.scheme,
        "bits_per_weight": result.sizes["bits_per_weight"], "seconds": round(result.seconds, 3),
        "source_model": result.source, "recipe": result.recipe.to_dict(),
        "calibration": result.calib.to_dict() if result.calib else None,
        "compute_dtype": result.compute_dtype,
        "size": result.sizes,
        "blocks": [vars(b) for b in result.pipeline.blocks],
    }
    if result.allocation is not None:
        info["allocation"] = result.allocation
    if result.memory is not None:
        info["memory"] = result.memory
    if result.group_size_note is not None:
        info["group_size_auto"] = result.group_size_note
    scales = result.pipeline.scales
    extra = {SCALES_FILE: scales_file(scales, transform_name(get_method(result.recipe.method)))} if scales else {}
    return info, {"recipe.yaml": result.recipe.to_yaml()}, extra


def fake_quantize_model(model: nn.Module, plan: dict[str, LayerSpec], dtype: torch.dtype | None = None,
                        input_scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of `model` whose planned layers hold dequantize(quantize(W)) as plain float weights.

    Layers with an activation format get a hook that fake-quantizes their input the same way; static formats
    take their scale from `input_scales` (by layer name, e.g. the `input_scale` buffers of a quantized model).

    With `dtype`, every other stored tensor is rounded through it, as a checkpoint stores it. This is the
    reference that a saved-and-loaded checkpoint must reproduce.
    """
    input_scales = input_scales or {}
    missing = [n for n, spec in plan.items() if spec.act is not None and spec.act.static and n not in input_scales]
    if missing:
        raise LowbitError(f"{len(missing)} layers (e.g. {missing[0]}) take a static activation scale and none was "
                          f"given: pass input_scales={{name: scale}}, e.g. from the quantized model's input_scale "
                          f"buffers.")
    fake = adapt(copy.deepcopy(model))
    if dtype is not None:
        round_unquantized(fake, dtype, set(plan))
    linears = linear_layers(fake)
    with torch.no_grad():
        for name, spec in plan.items():
            linears[name].weight = nn.Parameter(fake_quantize(linears[name].weight, spec.weight), requires_grad=False)
            if spec.act is not None:
                linears[name].register_forward_pre_hook(_act_hook(spec.act, input_scales.get(name)))
    return fake


def _act_hook(act, scale: torch.Tensor | None):
    def hook(_module, args):
        return (fake_quantize_activation(args[0], act, scale), *args[1:])

    return hook
