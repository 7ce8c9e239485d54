"""The block-by-block driver: the only code that walks the model, moves devices and runs hooks.

load → capture block-0 inputs → for each block: quantize it given its inputs, swap in QuantLinear modules,
run the quantized block to produce the next block's inputs → layers outside the blocks (e.g. lm_head) last.
Only one block is on the compute device at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.formats.activation import activation_scale
from lowbit.formats.spec import LayerSpec
from lowbit.io.faults import fault_point
from lowbit.methods.registry import MethodEntry
from lowbit.methods.scaling import active_groups
from lowbit.methods.transform import BlockScales, apply_scales
from lowbit.model.adapt import ExpertMLPs, expert_modules
from lowbit.model.architectures import Family, decoder_blocks, expand, text_config
from lowbit.model.capture import (
    BlockInputs,
    DiskSpill,
    StopForward,
    Where,
    capture_group_inputs,
    first_batches,
    run_block,
    squared_error,
    stash,
    to_device,
)
from lowbit.runtime.qlinear import QuantLinear, set_module

log = logging.getLogger("lowbit")


def activation_device(model: nn.Module, tokens: int, device: torch.device,
                      dtype: torch.dtype | None = None, spill_dir: str | Path | None = None) -> Where:
    """Where calibration activations live between blocks: on the GPU when what the pipeline holds (inputs,
    outputs, the reference batch, the last layer's deferred inputs) takes at most half its free memory — no host
    round trips — else in host memory when it takes at most half of what is available there, else on disk
    (`spill_dir`, or a temporary folder). Each step down is said in a log line."""
    itemsize = (dtype or next(p for p in model.parameters()).dtype).itemsize
    config = text_config(model)
    hidden = config.hidden_size
    need = tokens * (3 * hidden + getattr(config, "intermediate_size", 4 * hidden)) * itemsize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need <= free / 2:
            return device
        log.warning("lowbit: the calibration activations (%.1f GB) take more than half the GPU's free memory "
                    "(%.1f GB): keeping them in host memory between blocks", need / 1e9, free / 1e9)
    host = available_host_memory()
    if host is None or need <= host / 2:
        return torch.device("cpu")
    spill = DiskSpill(spill_dir)
    log.warning("lowbit: the calibration activations (%.1f GB) take more than half the host's available memory "
                "(%.1f GB): keeping them on disk in %s", need / 1e9, host / 1e9, spill.directory)
    return spill


def available_host_memory() -> int | None:
    """Bytes of host memory available to new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class BlockReport:
    index: int
    layers: int
    seconds: float
    output_error: float | None = None  # ‖y_q − y‖² / ‖y‖² on the first calibration batch, when there is one
    shortcut: bool = False  # outputs from the residual shortcut (no final pass over the block)
    replay: bool = False  # later passes replayed the attention module instead of recomputing it
    transform: dict | None = None  # what the method's block transform chose (AWQ / SmoothQuant: α per group)
    expert_tokens: dict[str, list[int]] | None = None  # mixture of experts: calibration tokens routed to each expert
    experts_on_all_tokens: dict[str, list[int]] | None = None  # experts calibrated on every token (the fallback)


@dataclass
class PipelineResult:
    blocks: list[BlockReport] = field(default_factory=list)
    final_inputs: BlockInputs | None = None  # the last block's quantized outputs (for checks)
    scales: dict[int, BlockScales] = field(default_factory=dict)  # what a block transform chose, per block
    # per (block class name, layer): whether the residual shortcut / the attention replay matched a real pass
    verified: dict[tuple[str, str], bool] = field(default_factory=dict)


class BlockIO(Protocol):
    """Where blocks come from and go to when the model does not live in memory (lowbit.streaming): `load` gives
    block i its weights before it is quantized; `done` is called once it is quantized, with the next block's inputs
    and everything so far, and may write the block out and release it."""

    def load(self, i: int, block: nn.Module) -> None: ...

    def done(self, i: int, block: nn.Module, inputs: BlockInputs | None, result: PipelineResult) -> None: ...


def install(module: nn.Module, qweights: dict, specs: dict[str, LayerSpec],
            input_scales: dict[str, torch.Tensor] | None = None) -> None:
    """Swap each named nn.Linear of `module` for a QuantLinear holding its packed weight (and its static input
    scale, for layers whose activations take one)."""
    input_scales = input_scales or {}
    for name, qw in qweights.items():
        linear = module.get_submodule(name)
        set_module(module, name, QuantLinear.from_quantized(qw, specs[name], linear.bias, input_scales.get(name)))


def static_input_scales(block: nn.Module, specs: dict[str, LayerSpec], inputs: BlockInputs, device,
                        offload) -> dict[str, torch.Tensor]:
    """For layers with static activation scales: s = max |x| over the calibration tokens / the format's maximum
    (SmoothQuant O3), measured on the float block."""
    static = {n: s.act for n, s in specs.items() if s.act is not None and s.act.static}
    if not static:
        return {}
    amax: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_module, args):
            a = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in static]
    try:
        run_block(block, inputs, device, offload)
    finally:
        for h in handles:
            h.remove()
    return {n: activation_scale(amax[n], act).cpu() for n, act in static.items()}


def _relative_error(quantized: BlockInputs, reference: BlockInputs) -> float:
    """Over the batches of `reference` (the first ones of `quantized`)."""
    pairs = list(zip(quantized.hidden, reference.hidden, strict=False))
    num = sum(squared_error(q, r.float()) for q, r in pairs)
    den = sum(squared_error(r, 0) for _, r in pairs)
    return num / max(den, 1e-30)


def sequential_groups(order: tuple[tuple[str, ...], ...], names: list[str]) -> list[list[str]]:
    """The block's planned layers in data-flow order (q/k/v, then o, …); unlisted ones come last, together."""
    groups = [expand(group, names) for group in order]
    listed = {n for group in groups for n in group}
    groups.append([n for n in names if n not in listed])
    return [g for g in groups if g]


@dataclass
class GroupStats:
    """Statistics of one sequential group: one per distinct input (layers fed the same tensor share it)."""

    stats: dict = field(default_factory=dict)  # owner layer -> the method's statistics
    owner: dict[str, str] = field(default_factory=dict)  # layer -> the first layer that saw the same input
    outputs: BlockInputs | None = None  # the block's outputs on the batches that ran to the end

    def shared(self) -> dict[str, list[str]]:
        members: dict[str, list[str]] = {}
        for name, first in self.owner.items():
            members.setdefault(first, []).append(name)
        return members


class DeferredLinear(nn.Module):
    """Stands in for a linear layer during its statistics pass: keeps the layer's inputs and returns zeros, so
    the pass yields the output without that layer's term (used for the block's last layer and for o_proj).

    Where the block ends in a residual sum, y = r + down(x), the quantized block's output is then
    r + down_q(x) (`shortcut_outputs`), and no final pass over the quantized block is needed."""

    def __init__(self, linear: nn.Linear, store: torch.device | str) -> None:
        super().__init__()
        self.linear, self.store = linear, store
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(stash(x.detach(), self.store))
        return x.new_zeros(*x.shape[:-1], self.out_features)


def shortcut_outputs(layer: nn.Module, partial: BlockInputs, deferred: DeferredLinear, device,
                     offload) -> BlockInputs:
    """The quantized block's outputs: each batch's partial output plus the (now quantized) last layer's term."""
    out = partial.with_hidden([])
    with torch.no_grad():
        for r, x in zip(partial.hidden, deferred.inputs, strict=True):
            out.hidden.append(stash(r.to(device) + layer(x.to(device)), offload))
    return out


class ReplayedModule(nn.Module):
    """Stands in for the module whose last step is a layer quantized earlier in the block (the attention, ending
    in o_proj) during the later groups' passes: it returns the output recorded when that layer was deferred, with
    the quantized layer's term added, out[0] = partial[0] + layer(x), instead of recomputing q/k/v and attention.
    A partial output that was all zeros is recorded as None.

    With `check`, the first call runs the real module and compares; on a mismatch every call runs the real one."""

    def __init__(self, real: nn.Module, layer: nn.Module, partial: list, inputs: list[torch.Tensor],
                 check: bool) -> None:
        super().__init__()
        self.real, self.layer, self.partial, self.inputs = real, layer, partial, inputs
        self.batch, self.ok = 0, None if check else True

    def forward(self, *args, **kwargs):
        b, self.batch = self.batch, self.batch + 1
        if self.ok is False:
            return self.real(*args, **kwargs)
        out = self.partial[b]
        first = out[0] if isinstance(out, tuple) else out
        device = next(self.layer.parameters()).device
        y = self.layer(self.inputs[b].to(device))
        y = y if first is None else first.to(device) + y
        replayed = (y, *out[1:]) if isinstance(out, tuple) else y
        if self.ok is None:
            real = self.real(*args, **kwargs)
            r = real[0] if isinstance(real, tuple) else real
            self.ok = squared_error(y, r) <= 1e-12 * squared_error(r, 0)
            return real
        return replayed


def _collect_stats(block: nn.Module, names: list[str], method, inputs: BlockInputs, device, offload,
                   full: int = 0, stop_after: nn.Module | None = None, record: list | None = None) -> GroupStats:
    """Run the block on the calibration inputs with hooks that fold each named layer's inputs into its stats.

    Layers that receive the very same tensor (q/k/v, gate/up) share one statistics object, accumulated once.
    The first `full` batches run to the end of the block (their outputs are returned); every later batch stops
    as soon as each named layer has seen its input: the rest of the block is not needed for this group. With
    `stop_after`, a batch stops only once that module has returned, and its outputs are appended to `record`.
    """
    result = GroupStats()
    pending: set[str] = set()
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}  # the tensor is kept: its address stays its own in the batch
    batch = [-1]

    def before_batch():
        pending.update(names)
        seen.clear()
        batch[0] += 1

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach()
            first = seen.setdefault((x.data_ptr(), tuple(x.shape), x.dtype), (name, x))[0]
            if result.owner.setdefault(name, first) != first:
                raise LowbitError(f"layer {name} shared its input with {result.owner[name]} in one calibration batch "
                                  f"and with {first} in another; the model's forward pass is not deterministic.")
            if first == name:
                current = result.stats.get(name) or method.init_stats(module.in_features, device)
                result.stats[name] = method.accumulate(current, x)
            pending.discard(name)
            if not pending and batch[0] >= full and stop_after is None:
                raise StopForward
        return hook

    def after(_module, _args, out):
        first = out[0] if isinstance(out, tuple) else out
        kept = None if not first.any() else stash(first, offload)  # all zeros (nothing after the deferred layer)
        record.append((kept, *to_device(out[1:], offload)) if isinstance(out, tuple) else kept)
        if batch[0] >= full:
            raise StopForward

    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(after))
    try:
        outputs = run_block(block, inputs, device, offload, before_batch)
    finally:
        for h in handles:
            h.remove()
    result.outputs = outputs if full else None
    return result


@dataclass
class BlockResult:
    qweights: dict
    reference: BlockInputs | None = None  # the float block's outputs on the first calibration batch
    partial: BlockInputs | None = None  # with `deferred`: the outputs without the last layer's term
    deferred: DeferredLinear | None = None
    deferred_name: str = ""
    replayed: bool = False


def _quantize_group(block: nn.Module, gs: GroupStats, weights: dict[str, torch.Tensor], specs, module, cfg,
                    qweights: dict) -> None:
    for owner, members in gs.shared().items():
        originals = [weights[n] for n in members]
        if len(members) > 1 and hasattr(module, "quantize_shared") and len({specs[n] for n in members}) == 1:
            quantized = module.quantize_shared(originals, gs.stats[owner], specs[owner], cfg)
        else:
            quantized = [module.quantize_layer(w, gs.stats[owner], specs[n], cfg)
                         for n, w in zip(members, originals, strict=True)]
        for name, qw in zip(members, quantized, strict=True):
            qweights[name] = qw
            current = block.get_submodule(name).weight
            current.data = qw.dequantize().to(current.device, current.dtype)


def quantize_block(block: nn.Module, specs: dict[str, LayerSpec], method, cfg, order, inputs: BlockInputs | None,
                   device, offload, weights: dict[str, torch.Tensor] | None = None,
                   shortcut: bool = False, verified: dict | None = None) -> BlockResult:
    """Quantize the block's planned layers; with statistics, group by group so later layers see quantized inputs.

    `weights` are the layers' original weights (full precision; by default the block's own). The float block's
    reference outputs come from the first group's pass on the first batch. With `shortcut`, a last group of one
    layer is deferred (see DeferredLinear) and the result carries what `shortcut_outputs` needs; and a middle group
    of one layer that ends its module (o_proj in self_attn) is deferred to the module's end, which later passes
    replay (see ReplayedModule). `verified` remembers, per block type, whether a replay matched the real module.
    """
    verified = {} if verified is None else verified
    module = method.module
    weights = weights or {n: block.get_submodule(n).weight for n in specs}
    if inputs is None or not hasattr(module, "accumulate"):
        return BlockResult({n: module.quantize_layer(weights[n], None, s, cfg) for n, s in specs.items()})
    result = BlockResult({})
    groups = sequential_groups(order, list(specs))
    replay: tuple[str, ReplayedModule] | None = None
    try:
        for k, group in enumerate(groups):
            defer = shortcut and k == len(groups) - 1 and k > 0 and len(group) == 1
            parent = _replayable_parent(group, groups[k + 1:]) if shortcut and 0 < k < len(groups) - 1 else None
            parent = parent if replay is None else None
            deferred = DeferredLinear(block.get_submodule(group[0]), offload) if defer or parent else None
            if deferred is not None:
                set_module(block, group[0], deferred)
            if replay is not None:
                replay[1].batch = 0
            record: list = []
            try:
                gs = _collect_stats(block, group, module, inputs, device, offload,
                                    full=len(inputs.hidden) if defer else int(k == 0),
                                    stop_after=block.get_submodule(parent) if parent else None, record=record)
            finally:
                if deferred is not None:
                    set_module(block, group[0], deferred.linear)
            if k == 0:
                result.reference = gs.outputs
            if defer:
                result.partial, result.deferred, result.deferred_name = gs.outputs, deferred, group[0]
            _quantize_group(block, gs, weights, specs, module, cfg, result.qweights)
            if parent:
                key = (block_kind(block), parent)
                rm = ReplayedModule(block.get_submodule(parent), block.get_submodule(group[0]), record,
                                    deferred.inputs, check=key not in verified)
                replay = (parent, rm)
                set_module(block, parent, rm)
    finally:
        if replay is not None:
            set_module(block, replay[0], replay[1].real)
            key = (block_kind(block), replay[0])
            if key not in verified and replay[1].ok is not None:
                verified[key] = replay[1].ok
            result.replayed = bool(replay[1].ok)
    return result


def block_kind(block: nn.Module) -> str:
    """The block's class, by module and qualified name: the key of `verified`'s checks (classes of two models may
    share a bare name, e.g. one defined in transformers and one in a model's remote code)."""
    return f"{type(block).__module__}.{type(block).__qualname__}"


def _replayable_parent(group: list[str], later: list[list[str]]) -> str | None:
    """The module a one-layer group ends (self_attn for o_proj), when no later group has layers inside it."""
    if len(group) != 1 or "." not in group[0]:
        return None
    parent = group[0].rpartition(".")[0]
    return None if any(n.startswith(parent + ".") for g in later for n in g) else parent


def _next_inputs(block: nn.Module, br: BlockResult, inputs: BlockInputs, device, offload,
                 verified: dict) -> BlockInputs:
    """The quantized block's outputs: by the residual shortcut where it holds for this block type (checked once,
    on the first batch, against a real pass), else by running the block."""
    if br.deferred is not None:
        out = shortcut_outputs(block.get_submodule(br.deferred_name), br.partial, br.deferred, device, offload)
        key = (block_kind(block), br.deferred_name)
        if key not in verified:
            real = run_block(block, first_batches(inputs, 1), device, offload)
            verified[key] = _relative_error(out, real) < 1e-6
        if verified[key]:
            return out
    return run_block(block, inputs, device, offload)


@dataclass(frozen=True)
class MoEConfig:
    """How experts are calibrated. Each expert's statistics come from the tokens routed to it; an expert that
    calibration routes fewer than `min_tokens` tokens to (none, often, for rarely chosen experts) is calibrated on
    every token that reaches its block instead — a wider sample than it sees in use, and better than almost none.
    `all_tokens` calibrates every expert that way."""

    min_tokens: int = 16
    all_tokens: bool = False


@torch.no_grad()
def count_routed(block: nn.Module, experts: dict[str, ExpertMLPs], inputs: BlockInputs, device) -> dict[str, list]:
    """How many calibration tokens the router sends to each expert of each mixture-of-experts module."""
    counts = {n: torch.zeros(len(m), dtype=torch.long) for n, m in experts.items()}
    last = list(experts)[-1]

    def hook_for(name):
        def hook(_module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            counts[name] += torch.bincount(index.flatten().cpu(), minlength=len(counts[name]))[:len(counts[name])]
            if name == last:
                raise StopForward
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in experts.items()]
    try:
        run_block(block, inputs, device, "cpu")
    finally:
        for h in handles:
            h.remove()
    return {n: c.tolist() for n, c in counts.items()}


def transform_block(block: nn.Module, i: int, masters: dict, specs: dict[str, LayerSpec], family: Family,
                     transform, cfg, inputs: BlockInputs | None, device,
                     reuse: dict[int, BlockScales] | None) -> BlockScales:
    """The block transform's scales for this block — searched on the captured inputs of its groups, or reused —
    applied to the block and its masters."""
    groups = transform.select_groups(block, active_groups(block, family.scaling, set(specs)), cfg)
    if reuse is not None:
        if i not in reuse:
            raise LowbitError(f"the reused scales have none for block {i}; they were searched for another model or "
                              f"another choice of layers. Search them again (drop --reuse-scales).")
        chosen = reuse[i]
    else:
        per_batch = inputs.hidden[0].shape[:-1].numel() if inputs.hidden else 1
        captured = capture_group_inputs(block, groups, inputs, device, transform.capture_batches(cfg, per_batch))
        chosen = transform.search(block, captured, specs, masters, cfg)
    apply_scales(block, masters, groups, chosen, specs, f"block {i}")
    return chosen


def check_scaling(blocks: nn.ModuleList, family: Family, plan: dict[str, LayerSpec], method: MethodEntry) -> None:
    """Refuse a scaling method (AWQ, SmoothQuant) when no planned layer has an operation before it to fold scales
    into: it would be plain rounding under another name."""
    for i, block in enumerate(blocks):
        prefix = f"{family.blocks}.{i}."
        planned = {n[len(prefix):] for n in plan if n.startswith(prefix)}
        if any(planned & set(g.layers) for g in active_groups(block, family.scaling, planned)):
            return
    name = method.description.split(":")[0]
    raise LowbitError(f"{name} folds per-channel scales into the operation before a layer, and in this "
                      f"{family.name} model no such operation feeds the selected layers (e.g. {next(iter(plan))}). "
                      f"Use --method gptq or rtn, or select layers that take scales (see lowbit/model/"
                      f"architectures.py).")


def quantize_model(model: nn.Module, family: Family, plan: dict[str, LayerSpec], method: MethodEntry,
                   inputs: BlockInputs | None = None, device: torch.device | str = "cpu",
                   offload: torch.device | str = "cpu", progress: bool = True, cfg=None,
                   compute_dtype: torch.dtype | None = None, shortcut: bool = True,
                   transform_cfg=None, moe: MoEConfig | None = None,
                   reuse_scales: dict[int, BlockScales] | None = None, io: BlockIO | None = None,
                   resume: PipelineResult | None = None) -> PipelineResult:
    """Quantize every layer in `plan` block by block, in place.

    Each block runs on `device` in `compute_dtype` (default: the model's own) while its layers are quantized from
    their original weights; its unquantized parameters return to their home device and dtype afterwards. A
    method's block transform (AWQ, SmoothQuant) first rewrites those originals, and the block with them: with the
    scales it searches, or with `reuse_scales` (per block, saved by an earlier run).

    With `io`, blocks are loaded before and handed on after (see BlockIO). With `resume` (what an interrupted run
    had finished: its blocks' reports, scales and checks; `inputs` are then the next block's), the blocks it
    finished are skipped.
    """
    blocks = decoder_blocks(model, family)
    result = resume or PipelineResult()
    verified = result.verified
    first = len(result.blocks)
    bar = tqdm(blocks, desc=f"quantizing ({method.description.split(':')[0].split(',')[0]})", unit="block",
               disable=not progress, dynamic_ncols=True, initial=first)
    moe = moe or MoEConfig()
    if method.transform is not None and inputs is not None:
        check_scaling(blocks, family, plan, method)
    for i, block in enumerate(blocks):
        if i < first:
            continue
        start = time.perf_counter()
        if io is not None:
            io.load(i, block)
        prefix = f"{family.blocks}.{i}."
        specs = {n[len(prefix):]: s for n, s in plan.items() if n.startswith(prefix)}
        home = next(block.parameters()).device  # where the block's weights go back to (the CPU, usually)
        masters = {n: p.data for n, p in block.named_parameters()}
        block.to(device, compute_dtype)
        inputs = inputs.for_block(i) if inputs is not None else None
        report = BlockReport(i, len(specs), 0.0)
        experts = expert_modules(block)
        if experts and inputs is not None and specs:
            report.expert_tokens = count_routed(block, experts, inputs, device)
            report.experts_on_all_tokens = {
                n: [e for e, c in enumerate(counts) if moe.all_tokens or c < moe.min_tokens]
                for n, counts in report.expert_tokens.items()}
            for n, m in experts.items():
                m.calibrate_all = set(report.experts_on_all_tokens[n])
        if method.transform is not None and (inputs is not None or reuse_scales is not None) and specs:
            chosen = transform_block(block, i, masters, specs, family, method.transform, transform_cfg, inputs,
                                      device, reuse_scales)
            result.scales[i] = chosen
            report.transform = {"alpha": chosen.alpha}
        input_scales = static_input_scales(block, specs, inputs, device, offload) if inputs is not None else {}
        weights = {n: masters[n + ".weight"].to(device) for n in specs}  # quantized from these, on the device
        br = quantize_block(block, specs, method, cfg, family.sequential, inputs, device, offload, weights,
                            shortcut, verified)
        fault_point("block-mid", i)
        if inputs is not None and br.reference is None:  # no statistics pass (RTN): the block is still unquantized
            br.reference = run_block(block, first_batches(inputs, 1), device, offload)
        for m in experts.values():
            m.calibrate_all = set()
        install(block, br.qweights, specs, input_scales)
        if inputs is not None:
            inputs = _next_inputs(block, br, inputs, device, offload, verified)
            report.shortcut = br.deferred is not None and verified.get((block_kind(block), br.deferred_name),
                                                                        False)
            report.replay = br.replayed
            report.output_error = _relative_error(inputs, br.reference)
            bar.set_postfix(error=f"{report.output_error:.2e}")
        block.to(home)
        for n, p in block.named_parameters():
            if n in masters:
                p.data = masters[n]
        report.seconds = time.perf_counter() - start
        result.blocks.append(report)
        bar.update(1)
        if io is not None:
            io.done(i, block, inputs, result)
    bar.close()
    outside = {n: s for n, s in plan.items() if not n.startswith(family.blocks + ".")}
    if outside:
        install(model, quantize_block(model, outside, method, cfg, (), None, "cpu", "cpu").qweights, outside)
    result.final_inputs = inputs
    return result
