"""Quantization from disk, block by block: the model's weights are never all in memory, and a killed run resumes.

The model is built on the meta device. The tensors outside the decoder blocks (embeddings, final norm, lm_head)
are read first; each block is read from the memory-mapped safetensors shards when the pipeline reaches it,
quantized, written to its own output shard and released. Peak host memory is about one block's weights (in
float32) plus the calibration activations plus the tensors outside the blocks, whatever the model's size.

After each block the run is checkpointed in the output's work folder (lowbit.io.workdir). With `resume`, a run
goes on from the last finished block and writes the same bytes as an uninterrupted run: the blocks are computed
from the same inputs (saved), with the same checks (saved) and the same weights (read again).

The checkpoint is the one `api.quantize` + `api.save` write, in shards: one per block and one for the rest.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from lowbit.api import (
    QuantizeResult,
    calibrate,
    calibration_for,
    check_finite,
    checkpoint_extras,
    fitted_recipe,
    memory_advice,
    method_for,
    size_report,
    storage_dtype_of,
)
from lowbit.data.calibration import CalibConfig
from lowbit.errors import LowbitError
from lowbit.hardware import (
    peak_memory,
    resolve_compute_dtype,
    resolve_device,
    return_freed_memory,
    trim_freed_memory,
)
from lowbit.io.atomic import disk_full, free_space
from lowbit.io.checkpoint import (
    INDEX,
    WEIGHTS_METADATA,
    is_packed,
    layer_entries,
    quantized_layers,
    storage_state_dict,
    write_metadata,
)
from lowbit.io.faults import fault_point
from lowbit.io.lazy import LazyWeights, read_header
from lowbit.io.workdir import Resumed, WorkDir
from lowbit.model.adapt import adapt
from lowbit.model.architectures import Family, decoder_blocks, family_for
from lowbit.model.capture import BlockInputs, stash
from lowbit.model.loading import builtin_checkpoint, checkpoint_dtype
from lowbit.model.sources import resolve
from lowbit.model.targets import linear_layers, select_layers
from lowbit.pipeline import MoEConfig, PipelineResult, activation_device, quantize_model
from lowbit.recipe import Recipe


def source_directory(model: str | Path) -> Path:
    """The Hugging Face directory whose shards a streamed run reads (a built-in model's cached conversion)."""
    source = resolve(model)
    if source.kind == "builtin":
        return builtin_checkpoint(source.name)
    if source.kind != "hf":
        raise LowbitError(f"{str(model)!r} is a {source.kind} model; quantizing from disk reads a Hugging Face "
                          f"directory of safetensors shards. Convert it (transformers' save_pretrained) first.")
    return source.path


def skeleton(directory: Path) -> nn.Module:
    """The model with its parameters on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as e:
        raise LowbitError(f"could not read the model config in {str(directory)!r}: {e}") from None
    family_for(config.model_type)
    declared = checkpoint_dtype(config)  # from_config overwrites it
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # as loading does (tie_word_embeddings): one parameter, stored once
    model = adapt(model.eval())
    model.checkpoint_dtype = declared
    return model


@dataclass(frozen=True)
class Source:
    """A model directory opened for reading block by block: its lazy weights and its skeleton, checked."""

    name: str  # the model as the user named it (a built-in name, a path)
    directory: Path
    lazy: LazyWeights
    model: nn.Module
    family: Family


def open_source(model: str | Path) -> Source:
    """The model's directory, weights and skeleton, after refusing (before any work) a model that cannot be read
    block by block."""
    directory = source_directory(model)
    lazy = LazyWeights(directory)
    skel = skeleton(directory)
    check_layout(skel, lazy)
    family = family_for(skel.config.model_type)
    return Source(str(model), directory, lazy, skel, family)


def whole_model_reason(model: str | Path) -> tuple[Source | None, str | None]:
    """The opened source, or why this model cannot be quantized block by block from disk (its error's first
    clause)."""
    try:
        return open_source(model), None
    except LowbitError as e:
        return None, str(e).split(";")[0].split(",")[0]


def check_layout(model: nn.Module, lazy: LazyWeights) -> None:
    """Refuse (before any work) a model whose stored tensors are not its parameters one for one."""
    expected = {n for n, _ in model.named_parameters()}
    stored = lazy.keys()
    missing = sorted(expected - stored - tied_names(model))
    if missing:
        raise LowbitError(f"{str(lazy.directory)!r} stores its tensors under other names than the model has (e.g. "
                          f"{missing[0]!r} is not in its shards), so it cannot be read block by block. Quantize it in "
                          f"memory (lowbit quantize … --in-memory).")


def tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter (tied), after the first name of each."""
    seen: set[int] = set()
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def materialize(module: nn.Module, lazy: LazyWeights, prefix: str, keep: tuple[str, ...], store: torch.dtype,
                skip: str | None = None) -> None:
    """Give `module`'s parameters (but those whose names start with `skip`) their stored values, in float32 (as the
    in-memory path loads them); those not under the `keep` prefixes (the quantized layers) are rounded through the
    checkpoint's dtype first. Tied parameters stay one parameter, read under whichever of their names is stored."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if skip is None or not name.startswith(skip):
            names.setdefault(id(p), []).append(name)
            params[id(p)] = p
    stored = lazy.keys()
    for ident, group in names.items():
        key = next((prefix + n for n in group if prefix + n in stored), prefix + group[0])
        t = lazy.get(key)
        if t.is_floating_point():
            t = t.to(torch.float32)
            if not key.startswith(keep):
                t = t.to(store).to(torch.float32)
        new = nn.Parameter(t, requires_grad=params[ident].requires_grad)
        for name in group:
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner)._parameters[attr] = new


def release(module: nn.Module) -> None:
    module.to("meta")


class BlockStream:
    """The pipeline's BlockIO from disk: each block read before it is quantized; written to its shard, checkpointed
    and released after."""

    def __init__(self, lazy: LazyWeights, work: WorkDir, family: Family, plan: dict, store: torch.dtype,
                 shards: int) -> None:
        self.lazy, self.work, self.family, self.plan, self.store, self.shards = lazy, work, family, plan, store, shards
        self.keep = tuple(n + "." for n in plan)

    def prefix(self, i: int) -> str:
        return f"{self.family.blocks}.{i}."

    def load(self, i: int, block: nn.Module) -> None:
        materialize(block, self.lazy, self.prefix(i), self.keep, self.store)
        check_finite({self.prefix(i) + n: m for n, m in linear_layers(block).items()}, self.plan)

    def done(self, i: int, block: nn.Module, inputs: BlockInputs | None, result: PipelineResult) -> None:
        tensors, _ = storage_state_dict(block, self.store, self.prefix(i))
        path = self.work.path / shard_name(i, self.shards)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            save_file(tensors, str(tmp), metadata=WEIGHTS_METADATA)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(path)
        fault_point("block-written", i)
        self.work.commit(i + 1, inputs, result)
        release(block)
        trim_freed_memory()


def shard_name(i: int, shards: int) -> str:
    return f"model-{i + 1:05d}-of-{shards:05d}.safetensors"


@dataclass
class StreamedRun:
    """What a streamed quantization works with, once checked (see quantize_streamed)."""

    source: str
    recipe: Recipe
    lazy: LazyWeights
    model: nn.Module  # the skeleton: its blocks are on the meta device but while one is quantized
    family: Family
    plan: dict
    store: torch.dtype  # the checkpoint's dtype for unquantized tensors
    device: torch.device
    compute_dtype: torch.dtype
    calib: CalibConfig | None
    work: WorkDir
    group_size_note: str | None = None

    @property
    def blocks(self) -> int:
        return len(decoder_blocks(self.model, self.family))

    def run(self, method, reused, tokenizer, resumed: Resumed | None, progress: bool, overwrite: bool,
            start: float) -> tuple[QuantizeResult, dict]:
        skel, family, work = self.model, self.family, self.work
        materialize(skel, self.lazy, "", tuple(n + "." for n in self.plan), self.store, skip=family.blocks + ".")
        check_finite(linear_layers(skel), {n: s for n, s in self.plan.items()
                                           if not n.startswith(family.blocks + ".")})
        spill = work.path / "spill"
        if resumed is not None and resumed.inputs is not None:
            offload = activation_device(skel, resumed.inputs.tokens, self.device, self.compute_dtype, spill)
            inputs = resumed.inputs.with_hidden([stash(h, offload) for h in resumed.inputs.hidden])
        elif resumed is not None:
            inputs, offload = None, torch.device("cpu")
        else:
            inputs, _, offload = calibrate(skel, family, tokenizer, self.calib, self.device, self.compute_dtype,
                                           spill)
        shards = self.blocks + 1
        with memory_advice(skel, self.calib, self.device):
            pipeline = quantize_model(
                skel, family, self.plan, method, inputs, self.device, offload, progress=progress,
                cfg=self.recipe.config(method.module.Config), compute_dtype=self.compute_dtype,
                transform_cfg=self.recipe.config(method.transform.Config) if method.transform else None,
                moe=MoEConfig(self.recipe.expert_min_tokens, self.recipe.experts_all_tokens), reuse_scales=reused,
                io=BlockStream(self.lazy, work, family, self.plan, self.store, shards),
                resume=resumed.result if resumed else None)
        shutil.rmtree(spill, ignore_errors=True)
        if "lm_head" in self.plan and getattr(skel.config, "tie_word_embeddings", False):
            skel.config.tie_word_embeddings = False
        rest_state = {k: t for k, t in skel.state_dict().items() if not k.startswith(family.blocks + ".")}
        tensors, tied = storage_state_dict(skel, self.store, state=rest_state)
        save_file(tensors, str(work.path / shard_name(self.blocks, shards)), metadata=WEIGHTS_METADATA)
        headers = _shard_headers(work.path, shards)
        _write_index(work.path, headers)
        result = QuantizeResult(skel, self.recipe, self.plan, self.store, time.perf_counter() - start, pipeline,
                                self.calib, self.source, compute_dtype=str(self.compute_dtype).removeprefix("torch."),
                                group_size_note=self.group_size_note)
        result.sizes = size_report(skel, self.store, _stored_others(headers, skel))
        result.memory = peak_memory(self.device)
        info, texts, extra = checkpoint_extras(result)
        info["streamed"] = {"resumed_after_blocks": resumed.next_block if resumed else 0, "shards": shards}
        # the header hashes the files of the folder; resume/ is a folder, removed when the output is complete
        header = write_metadata(work.path, skel, layer_entries(skel), tied, dtype=self.store, tokenizer=tokenizer,
                                info=info, texts=texts, tensor_files=extra)
        work.finish(overwrite)
        return result, header


def quantize_streamed(model: str | Path | Source, recipe: Recipe, out: str | Path, *, tokenizer=None,
                      calib: CalibConfig | None = None, device: str = "auto", dtype: str = "auto",
                      compute_dtype: str = "auto", progress: bool = True, reuse_scales: str | Path | None = None,
                      resume: bool = False, overwrite: bool = False, resume_hint: str | None = None
                      ) -> tuple[QuantizeResult, dict]:
    """Quantize the model in the directory `model` from disk into the lowbit checkpoint `out`; returns the result
    (its model is the skeleton: the blocks are on disk only) and the checkpoint's header.

    A leftover work folder of `out` is refused unless `resume`, and resumed only by a run of the same model,
    recipe and calibration; `resume_hint` is the command the messages give for resuming."""
    start = time.perf_counter()
    return_freed_memory()
    if recipe.kv_cache or recipe.kv_static:
        raise LowbitError("a quantized KV cache is calibrated over the whole model, which quantizing from disk never "
                          "holds; quantize in memory (--in-memory) for --kv-cache.")
    source = model if isinstance(model, Source) else open_source(model)
    lazy, skel, family = source.lazy, source.model, source.family
    recipe, group_note = fitted_recipe(skel, family, recipe, progress)
    method, reused = method_for(recipe, reuse_scales)
    plan = select_layers(skel, family, recipe)
    store = storage_dtype_of(skel, dtype, lambda: (lazy.get(k) for k in sorted(lazy.keys())))
    dev = resolve_device(device)
    cdtype = resolve_compute_dtype(compute_dtype, dev)
    calib = calibration_for(recipe, method, reused, plan, family, calib)
    run = StreamedRun(source.name, recipe, lazy, skel, family, plan, store, dev, cdtype, calib, WorkDir(out),
                      group_note)
    identity = {"model": lazy.fingerprint(), "recipe": recipe.to_dict(), "calibration": calib and calib.to_dict(),
                "compute_dtype": str(cdtype), "device": dev.type, "dtype": str(store),
                "reuse_scales": str(reuse_scales) if reuse_scales else None}
    work, how = run.work, resume_hint or "the same command and --resume"
    resumed = None
    if work.exists():
        if not resume:
            raise LowbitError(f"an interrupted run of this output is in {str(work.path)!r} ({work.finished_blocks()} "
                              f"of {run.blocks} blocks finished). Resume it with {how}, or delete that folder to "
                              f"start over.")
        work.check(identity)
        resumed = work.load()
        if resumed is not None:
            print(f"lowbit: resuming from {work.path} after {resumed.next_block} of {run.blocks} blocks",
                  file=sys.stderr)
    else:
        if resume:
            print(f"lowbit: --resume: no interrupted run in {work.path}; starting", file=sys.stderr)
        work.start(identity)
    try:
        return run.run(method, reused, tokenizer, resumed, progress, overwrite, start)
    except BaseException as e:
        work.settle()  # the block committing in the background is kept too, and counted below
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"interrupted; {work.finished_blocks()} of {run.blocks} blocks are kept in "
                              f"{str(work.path)!r}: resume with {how}.") from None
        if isinstance(e, (OSError, SafetensorError)) and (why := disk_full(e)) is not None:
            raise LowbitError(f"could not write the output in {str(work.path)!r}: {why} ({free_space(work.path)}). "
                              f"{work.finished_blocks()} of {run.blocks} blocks are kept there, and nothing is in "
                              f"{str(run.work.out)!r}; make room, then resume with {how}.") from None
        raise


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a streamed run: what was finished is kept, and the message says how to go on."""


def _shard_headers(directory: Path, shards: int) -> dict[str, dict]:
    """Each written shard's safetensors header, read once: tensor name → {dtype, shape, data_offsets}."""
    return {name: read_header(directory / name) for name in (shard_name(i, shards) for i in range(shards))}


def _write_index(directory: Path, headers: dict[str, dict]) -> None:
    """model.safetensors.index.json, as transformers writes it for sharded checkpoints."""
    weight_map = {key: name for name, header in headers.items() for key in header}
    total = sum((directory / name).stat().st_size for name in headers)
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=1))


def _stored_others(headers: dict[str, dict], model: nn.Module) -> tuple[int, int]:
    """The number and stored bytes of the values outside the quantized layers' packed buffers (the size report)."""
    qprefixes = tuple(n + "." for n in quantized_layers(model))
    entries = [e for header in headers.values() for key, e in header.items() if not is_packed(key, qprefixes)]
    return (sum(math.prod(e["shape"]) for e in entries),
            sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries))
