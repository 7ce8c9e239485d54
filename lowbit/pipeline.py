"""The block-by-block driver: the only code that walks the model, moves devices and runs hooks.

load → capture block-0 inputs → for each block: quantize it given its inputs, swap in QuantLinear modules,
run the quantized block to produce the next block's inputs → layers outside the blocks (e.g. lm_head) last.
Only one block is on the compute device at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.methods.registry import MethodEntry
from lowbit.model.architectures import Family, decoder_blocks
from lowbit.model.capture import BlockInputs, StopForward, run_block
from lowbit.recipe import LayerSpec
from lowbit.runtime.qlinear import QuantLinear, set_module


def activation_device(model: nn.Module, tokens: int, device: torch.device) -> torch.device:
    """Where calibration activations live between blocks: on the GPU when the three copies the pipeline holds
    (inputs, float reference, outputs) take at most half its free memory — no host round trips — else the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    itemsize = next(model.parameters()).element_size()
    need = 3 * tokens * model.config.hidden_size * itemsize
    free, _ = torch.cuda.mem_get_info(device)
    return device if need <= free / 2 else torch.device("cpu")


@dataclass
class BlockReport:
    index: int
    layers: int
    seconds: float
    output_error: float | None = None  # ‖y_q − y‖² / ‖y‖² on the calibration inputs, when there are any


@dataclass
class PipelineResult:
    blocks: list[BlockReport] = field(default_factory=list)
    final_inputs: BlockInputs | None = None  # the last block's quantized outputs (for checks)


def install(module: nn.Module, qweights: dict, specs: dict[str, LayerSpec]) -> None:
    """Swap each named nn.Linear of `module` for a QuantLinear holding its packed weight."""
    for name, qw in qweights.items():
        linear = module.get_submodule(name)
        set_module(module, name, QuantLinear.from_quantized(qw, specs[name], linear.bias))


def _relative_error(quantized: BlockInputs, reference: BlockInputs) -> float:
    pairs = zip(quantized.hidden, reference.hidden, strict=True)
    num = sum((q.float() - r.float()).pow(2).sum().item() for q, r in pairs)
    den = sum(r.float().pow(2).sum().item() for r in reference.hidden)
    return num / max(den, 1e-30)


def sequential_groups(order: tuple[tuple[str, ...], ...], names: list[str]) -> list[list[str]]:
    """The block's planned layers in data-flow order (q/k/v, then o, …); unlisted ones come last, together."""
    groups = [[n for n in group if n in names] for group in order]
    listed = {n for group in order for n in group}
    groups.append([n for n in names if n not in listed])
    return [g for g in groups if g]


@dataclass
class GroupStats:
    """Statistics of one sequential group: one per distinct input (layers fed the same tensor share it)."""

    stats: dict = field(default_factory=dict)  # owner layer -> the method's statistics
    owner: dict[str, str] = field(default_factory=dict)  # layer -> the first layer that saw the same input
    outputs: BlockInputs | None = None  # the block's outputs, when the pass ran to the end

    def shared(self) -> dict[str, list[str]]:
        members: dict[str, list[str]] = {}
        for name, first in self.owner.items():
            members.setdefault(first, []).append(name)
        return members


def _collect_stats(block: nn.Module, names: list[str], method, inputs: BlockInputs, device, offload,
                   keep_outputs: bool = False) -> GroupStats:
    """Run the block on the calibration inputs with hooks that fold each named layer's inputs into its stats.

    Layers that receive the very same tensor (q/k/v, gate/up) share one statistics object, accumulated once.
    Unless `keep_outputs`, each batch stops as soon as every named layer has seen its input: the rest of the block
    is not needed for this group.
    """
    result = GroupStats()
    pending: set[str] = set()
    seen: dict[tuple, str] = {}

    def before_batch():
        pending.update(names)
        seen.clear()

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach()
            first = seen.setdefault((x.data_ptr(), tuple(x.shape), x.dtype), name)
            if result.owner.setdefault(name, first) != first:
                raise LowbitError(f"layer {name} shared its input with {result.owner[name]} in one calibration batch "
                                  f"and with {first} in another; the model's forward pass is not deterministic.")
            if first == name:
                current = result.stats.get(name) or method.init_stats(module.in_features, device)
                result.stats[name] = method.accumulate(current, x)
            pending.discard(name)
            if not pending and not keep_outputs:
                raise StopForward
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        outputs = run_block(block, inputs, device, offload, before_batch)
    finally:
        for h in handles:
            h.remove()
    result.outputs = outputs if keep_outputs else None
    return result


def quantize_block(block: nn.Module, specs: dict[str, LayerSpec], method, cfg, order, inputs: BlockInputs | None,
                   device, offload) -> tuple[dict, BlockInputs | None]:
    """Quantize the block's planned layers; with statistics, group by group so later layers see quantized inputs.

    Returns the quantized weights and, when statistics were collected, the float block's outputs (from the first
    group's pass, which runs the unquantized block to the end).
    """
    module = method.module
    if inputs is None or not hasattr(module, "accumulate"):
        return {n: module.quantize_layer(block.get_submodule(n).weight, None, s, cfg) for n, s in specs.items()}, None
    qweights, reference = {}, None
    for k, group in enumerate(sequential_groups(order, list(specs))):
        gs = _collect_stats(block, group, module, inputs, device, offload, keep_outputs=k == 0)
        reference = gs.outputs if k == 0 else reference
        for owner, members in gs.shared().items():
            weights = [block.get_submodule(n).weight for n in members]
            if len(members) > 1 and hasattr(module, "quantize_shared") and len({specs[n] for n in members}) == 1:
                quantized = module.quantize_shared(weights, gs.stats[owner], specs[owner], cfg)
            else:
                quantized = [module.quantize_layer(block.get_submodule(n).weight, gs.stats[owner], specs[n], cfg)
                             for n in members]
            for name, weight, qw in zip(members, weights, quantized, strict=True):
                qweights[name] = qw
                weight.data = qw.dequantize().to(weight.device, weight.dtype)
    return qweights, reference


def quantize_model(model: nn.Module, family: Family, plan: dict[str, LayerSpec], method: MethodEntry,
                   inputs: BlockInputs | None = None, device: torch.device | str = "cpu",
                   offload: torch.device | str = "cpu", progress: bool = True, cfg=None) -> PipelineResult:
    """Quantize every layer in `plan` block by block, in place."""
    blocks = decoder_blocks(model, family)
    result = PipelineResult()
    bar = tqdm(blocks, desc=f"quantizing ({method.description.split(':')[0].split(',')[0]})", unit="block",
               disable=not progress, dynamic_ncols=True)
    for i, block in enumerate(bar):
        start = time.perf_counter()
        prefix = f"{family.blocks}.{i}."
        specs = {n[len(prefix):]: s for n, s in plan.items() if n.startswith(prefix)}
        home = next(block.parameters()).device  # where the block's weights go back to (the CPU, usually)
        block.to(device)
        qweights, reference = quantize_block(block, specs, method, cfg, family.sequential, inputs, device, offload)
        if inputs is not None and reference is None:  # no statistics pass (RTN): the block is still unquantized
            reference = run_block(block, inputs, device, offload)
        install(block, qweights, specs)
        report = BlockReport(i, len(specs), 0.0)
        if inputs is not None:
            inputs = run_block(block, inputs, device, offload)
            report.output_error = _relative_error(inputs, reference)
            bar.set_postfix(error=f"{report.output_error:.2e}")
        block.to(home)
        report.seconds = time.perf_counter() - start
        result.blocks.append(report)
    outside = {n: s for n, s in plan.items() if not n.startswith(family.blocks + ".")}
    if outside:
        install(model, quantize_block(model, outside, method, cfg, (), None, "cpu", "cpu")[0], outside)
    result.final_inputs = inputs
    return result
