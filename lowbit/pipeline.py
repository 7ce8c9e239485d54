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

from lowbit.methods.registry import MethodEntry
from lowbit.model.architectures import Family, decoder_blocks
from lowbit.model.capture import BlockInputs, run_block
from lowbit.recipe import LayerSpec
from lowbit.runtime.qlinear import QuantLinear, set_module


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


def _collect_stats(block: nn.Module, names: list[str], method, inputs: BlockInputs, device, offload) -> dict:
    """Run the block on the calibration inputs with hooks that fold each named layer's inputs into its stats."""
    stats = {n: method.init_stats(block.get_submodule(n).in_features, device) for n in names}

    def hook_for(name):
        def hook(_module, args):
            stats[name] = method.accumulate(stats[name], args[0].detach())
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        run_block(block, inputs, device, offload)
    finally:
        for h in handles:
            h.remove()
    return stats


def quantize_block(block: nn.Module, specs: dict[str, LayerSpec], method, cfg, order, inputs: BlockInputs | None,
                   device, offload) -> dict:
    """Quantize the block's planned layers; with statistics, group by group so later layers see quantized inputs."""
    module = method.module
    if inputs is None or not hasattr(module, "accumulate"):
        return {n: module.quantize_layer(block.get_submodule(n).weight, None, s, cfg) for n, s in specs.items()}
    qweights = {}
    for group in sequential_groups(order, list(specs)):
        stats = _collect_stats(block, group, module, inputs, device, offload)
        for name in group:
            linear = block.get_submodule(name)
            qw = module.quantize_layer(linear.weight, stats[name], specs[name], cfg)
            qweights[name] = qw
            linear.weight.data = qw.dequantize().to(linear.weight.device, linear.weight.dtype)
    return qweights


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
        block.to(device)
        reference = run_block(block, inputs, device, offload) if inputs is not None else None
        qweights = quantize_block(block, specs, method, cfg, family.sequential, inputs, device, offload)
        install(block, qweights, specs)
        report = BlockReport(i, len(specs), 0.0)
        if inputs is not None:
            inputs = run_block(block, inputs, device, offload)
            report.output_error = _relative_error(inputs, reference)
            bar.set_postfix(error=f"{report.output_error:.2e}")
        block.to(offload)
        report.seconds = time.perf_counter() - start
        result.blocks.append(report)
    outside = {n: s for n, s in plan.items() if not n.startswith(family.blocks + ".")}
    if outside:
        install(model, quantize_block(model, outside, method, cfg, (), None, offload, offload), outside)
    result.final_inputs = inputs
    return result
