"""Sensitivity: the KL that quantizing one layer (or one layer type, or one block) alone causes, and a cheap proxy.

Measured. The reference record's sequences (teacher-forced, as `lowbit eval` runs them) go once through the float
model, one sequence per batch, and every block's inputs are kept. Quantizing a unit (its layers' weights replaced
by dequantize(quantize(W))) then re-runs only the blocks from the unit's first one to the end, and the top-N KL
against the float model's own predictions (P, Q renormalized over the float model's top N; lowbit.eval.stats) is
averaged over every position: the Fireworks mean that `lowbit eval` reports.

Proxies, which cost no forward pass once the float pass is done:
- the importance-weighted squared error e = Σ_j a_j ‖W_:j − Ŵ_:j‖², a_j = mean x_j² over the same tokens
  (llama.cpp's imatrix diagonal; E‖(W − Ŵ)x‖² when the input columns are uncorrelated). It says how much a layer's
  output moves, not how much the model's prediction cares;
- the Fisher estimate of the KL, KL ≈ ½ δθᵀ F δθ with F's diagonal factored as in K-FAC: F_rj ≈ G_r a_j, where
  G_r = Σ_t g_tr² sums the squared gradients of the reference tokens' log-likelihood at output r of the layer (one
  backward pass over the record), so KL ≈ ½ Σ_rj G_r a_j (W_rj − Ŵ_rj)² / T per position (T positions).
Their Spearman rank correlations with the measured KL say how far each can stand in for the measurement.

This module is a driver, as lowbit.pipeline is: it walks the model's blocks and hooks their linear layers. The
methods it quantizes with see one layer and its statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.record import ReferenceRecord
from lowbit.eval.stats import token_stats
from lowbit.formats.spec import LayerSpec
from lowbit.methods import imatrix
from lowbit.methods.registry import MethodEntry
from lowbit.model.architectures import Family, decoder_blocks, text_config
from lowbit.model.capture import BlockInputs, capture_block_inputs, run_block
from lowbit.model.targets import linear_layers

UNITS = ("layer", "type", "block")


def block_of(name: str, blocks: str) -> tuple[int, str]:
    """(block index, layer kind) of a layer inside the blocks at `blocks` (a family's path):
    model.layers.3.mlp.up_proj → (3, "mlp.up_proj")."""
    prefix = blocks + "."
    if not name.startswith(prefix):
        raise LowbitError(f"{name} lies outside the decoder blocks ({blocks}); sensitivity covers block layers "
                          f"only.")
    index, _, kind = name[len(prefix):].partition(".")
    return int(index), kind


def group_units(names: list[str], family: Family, by: str) -> dict[str, list[str]]:
    """Units to measure, each a list of layer names: every layer, every layer kind, or every block."""
    if by not in UNITS:
        raise LowbitError(f"--by {by!r} is not a unit; choose one of {', '.join(UNITS)}.")
    units: dict[str, list[str]] = {}
    for name in names:
        block, kind = block_of(name, family.blocks)
        key = name if by == "layer" else kind if by == "type" else f"{family.blocks}.{block}"
        units.setdefault(key, []).append(name)
    return units


@dataclass
class Probe:
    """The float model's pass over the record's sequences, kept for measuring: each block's inputs, the float
    model's top-N predictions, and per targeted layer its statistics (the method's and the importance a_j)."""

    model: nn.Module
    family: Family
    inputs: list[BlockInputs]  # per block, one batch per sequence
    top_ids: list[torch.Tensor]  # per sequence [len − 1, N]
    top_logprobs: list[torch.Tensor]
    next_logprob: list[torch.Tensor]
    next_ids: list[torch.Tensor]
    importance: dict[str, torch.Tensor] = field(default_factory=dict)  # a_j, [in]
    grad_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # G_r, [out]
    stats: dict[str, object] = field(default_factory=dict)
    positions: int = 0  # T: predicted positions over every sequence


def _logprobs(model: nn.Module, family: Family, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities from the last block's output: final norm, head, the family's logit soft-capping."""
    logits = model.get_submodule(family.lm_head)(model.get_submodule(family.final_norm)(hidden)).float()
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def probe(model: nn.Module, family: Family, record: ReferenceRecord, plan: dict[str, LayerSpec],
          method: MethodEntry, top_n: int = 16, measure: bool = True, progress: bool = True) -> Probe:
    """Run the float model over the record: a pass with gradients gives every layer's statistics and G_r; with
    `measure`, a pass block by block keeps each block's inputs and the float model's top-N predictions."""
    seqs = [record.sequence(i).long()[None] for i in range(record.num_sequences)]
    importance, grad_sq, stats = statistics(model, seqs, plan, method, progress)
    positions = sum(ids.shape[1] - 1 for ids in seqs)
    if not measure:
        return Probe(model, family, [], [], [], [], [], importance, grad_sq, stats, positions)
    device = next(model.parameters()).device
    blocks = decoder_blocks(model, family)
    inputs, current = [], BlockInputs.concat([capture_block_inputs(model, family, ids, device, batch_size=1,
                                                                   offload=device) for ids in seqs])
    for i in tqdm(range(len(blocks)), desc="float pass", unit="block", disable=not progress, dynamic_ncols=True):
        current = current.for_block(i)
        inputs.append(current)
        current = run_block(blocks[i], current, device, offload=device)
    top_ids, top_lp, next_lp, next_ids = [], [], [], []
    for ids, hidden in zip(seqs, current.hidden, strict=True):
        lp = _logprobs(model, family, hidden)[0, :-1].cpu()
        nxt = ids[0, 1:]
        vals, top = lp.topk(top_n, dim=-1)
        top_ids.append(top.int())
        top_lp.append(vals)
        next_lp.append(lp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
        next_ids.append(nxt)
    return Probe(model, family, inputs, top_ids, top_lp, next_lp, next_ids, importance, grad_sq, stats, positions)


def statistics(model: nn.Module, seqs: list[torch.Tensor], plan: dict[str, LayerSpec], method: MethodEntry,
               progress: bool = True) -> tuple[dict, dict, dict]:
    """One forward and backward pass per sequence. Per named layer: a_j (mean x_j², [in]), G_r = Σ_t g_tr² with
    g = ∂ Σ log p(next token) / ∂ output ([out], float64, CPU), and the method's own statistics (GPTQ's Hessian,
    the imatrix). The embeddings' output is made to require a gradient, so no weight gradient is ever formed."""
    device = next(model.parameters()).device
    linears = linear_layers(model)
    gather = method.module.NEEDS_CALIBRATION and method.module is not imatrix
    imp = {n: imatrix.init_stats(linears[n].in_features, device) for n in plan}
    stats = {n: method.module.init_stats(linears[n].in_features, device) for n in plan} if gather else {}
    sums = {n: torch.zeros(linears[n].out_features, dtype=torch.float64) for n in plan}

    def hooks_for(name: str):
        def add(g: torch.Tensor) -> None:
            sums[name].add_(g.detach().double().pow(2).flatten(0, -2).sum(0).cpu())

        def before(_module, args):
            x = args[0].detach().float()
            imatrix.accumulate(imp[name], x)
            if gather:
                method.module.accumulate(stats[name], x)

        def after(_module, _args, out):
            if out.requires_grad:
                out.register_hook(add)
        return before, after

    def needs_grad(_module, _args, out):
        return out.requires_grad_(True)

    handles = []
    for n in plan:
        before, after = hooks_for(n)
        handles += [linears[n].register_forward_pre_hook(before), linears[n].register_forward_hook(after)]
    handles.append(model.get_input_embeddings().register_forward_hook(needs_grad))
    frozen = [p for p in model.parameters() if p.requires_grad]  # the weights take no part in the backward pass
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for ids in tqdm(seqs, desc="gradients", unit="seq", disable=not progress, dynamic_ncols=True):
                ids = ids.to(device)
                lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
                lp[0, :-1].gather(-1, ids[0, 1:].unsqueeze(-1)).sum().backward()
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
    importance = {n: s.importance for n, s in imp.items()}
    return importance, sums, imp if method.module is imatrix else stats


def quantize_weight(probe: Probe, name: str, spec: LayerSpec, method: MethodEntry, cfg=None):
    """The layer quantized alone by the method's rounding (from the float weights and the float inputs)."""
    weight = linear_layers(probe.model)[name].weight.detach().float()
    return method.module.quantize_layer(weight, probe.stats.get(name), spec, cfg)


def proxy_errors(weight: torch.Tensor, dequantized: torch.Tensor, importance: torch.Tensor,
                 grad_sq: torch.Tensor, positions: int) -> tuple[float, float]:
    """(½ Σ_rj G_r a_j ΔW_rj² / T, Σ_j a_j ‖ΔW_:j‖²) in float64: the Fisher KL estimate and the weighted error."""
    sq = (weight.float() - dequantized.float()).double().pow(2)
    a = importance.to(sq)
    fisher = 0.5 * float(grad_sq.to(sq) @ sq @ a) / max(positions, 1)
    return fisher, float((sq.sum(0) * a).sum())


@contextmanager
def replaced(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The named linear layers hold `weights` inside the block; their own come back after."""
    linears = linear_layers(model)
    saved = {n: linears[n].weight.data for n in weights}
    try:
        for n, w in weights.items():
            linears[n].weight.data = w.to(saved[n].device, saved[n].dtype)
        yield
    finally:
        for n, w in saved.items():
            linears[n].weight.data = w


@torch.no_grad()
def measure_kl(probe: Probe, weights: dict[str, torch.Tensor]) -> float:
    """Mean top-N KL over every position with the named layers replaced (the blocks before the first one are
    not run again: their outputs are the kept inputs)."""
    blocks = decoder_blocks(probe.model, probe.family)
    start = min(block_of(n, probe.family.blocks)[0] for n in weights)
    device = next(probe.model.parameters()).device
    with replaced(probe.model, weights):
        current = probe.inputs[start]
        for i in range(start, len(blocks)):
            current = run_block(blocks[i], current.for_block(i), device, offload=device)
    kls = []
    for k, hidden in enumerate(current.hidden):
        lq = _logprobs(probe.model, probe.family, hidden)[0, :-1].cpu()
        kls.append(token_stats(probe.top_ids[k], probe.top_logprobs[k], probe.next_logprob[k], lq,
                               probe.next_ids[k]).kl)
    return float(np.concatenate(kls).mean())


@dataclass(frozen=True)
class Row:
    """One unit at one format: its layers' stored bits and weights, the proxies and the measured KL."""

    unit: str
    fmt: str
    bits: int
    weights: int
    proxy: float  # the Fisher estimate of the KL
    weighted_error: float  # the importance-weighted squared error
    kl: float | None

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights


def sensitivity(probe: Probe, units: dict[str, list[str]], plans: dict[str, dict[str, LayerSpec]],
                method: MethodEntry, cfg=None, measure: bool = True, progress: bool = True) -> list[Row]:
    """Every unit at every format (`plans`: label → layer → spec): bits, proxy and (when `measure`) the KL."""
    linears = linear_layers(probe.model)
    rows = []
    bar = tqdm(total=len(units) * len(plans), desc="sensitivity", unit="unit", disable=not progress,
               dynamic_ncols=True)
    for label, plan in plans.items():
        for unit, names in units.items():
            qws = {n: quantize_weight(probe, n, plan[n], method, cfg) for n in names}
            deq = {n: q.dequantize() for n, q in qws.items()}
            errors = [proxy_errors(linears[n].weight.detach(), deq[n], probe.importance[n], probe.grad_sq[n],
                                   probe.positions) for n in names]
            kl = measure_kl(probe, deq) if measure else None
            rows.append(Row(unit, label, sum(int(q.stored_bits()) for q in qws.values()),
                            sum(linears[n].weight.numel() for n in names), sum(e[0] for e in errors),
                            sum(e[1] for e in errors), kl))
            bar.update(1)
    bar.close()
    return rows


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """Spearman's ρ (ties share their mean rank); None for fewer than three pairs or a constant side."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(np.asarray(a, dtype=float)), _ranks(np.asarray(b, dtype=float))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = x.argsort(kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks
