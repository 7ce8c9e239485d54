"""Mixed precision under a budget: `lowbit quantize … --target-bpw 3.5` (or `--target-size 80MB`).

1. The menu: formats a layer may take (`--choices`, default DEFAULT_CHOICES), each an ordinary scheme and group
   size, plus "16" (the layer kept in 16 bits).
2. The costs: per layer and choice, the stored bits (everything: codes, scales, zeros; 16 per weight for a kept
   layer) and the predicted KL, the Fisher estimate of lowbit.choose.sensitivity (½ Σ G_r a_j ΔW_rj² / T) with
   ΔW from the method's own rounding of the float layer, on calibration text (never the evaluation prompts).
3. The allocation: lowbit.choose.allocate, exact, within budget × targeted weights.
4. The result is an ordinary recipe: the most common choice is the recipe's scheme and every other layer gets an
   override (one per choice and layer kind, its blocks listed), 16-bit layers a `skip`. Quantizing with it is
   quantizing with the allocation; `recipe.yaml` in the checkpoint reproduces it through `--recipe`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lowbit.choose.allocate import Allocation, Choice, allocate
from lowbit.choose.sensitivity import block_of, probe, proxy_errors, quantize_weight
from lowbit.errors import LowbitError
from lowbit.formats import PerGroup
from lowbit.formats.spec import LayerSpec
from lowbit.methods import rtn
from lowbit.methods.registry import get_method
from lowbit.model.architectures import Family
from lowbit.model.targets import linear_layers, select_layers
from lowbit.recipe import Override, Recipe

KEEP = "16"
NOT_OFFERED = LayerSpec(None)  # a choice whose groups do not divide this layer's input
DEFAULT_CHOICES = ("w2a16:64", "w3a16:128", "w3a16:64", "w4a16:128", "w4a16:64", "w4a16:32", "w5a16:64",
                   "w6a16:128", "w8a16:0", KEEP)
# Methods whose rounding predicts the cost of a layer on its own; AWQ's layers are costed by RTN.
OWN_ROUNDING = ("rtn", "imatrix", "gptq")
MIXED_METHODS = (*OWN_ROUNDING, "awq")  # weight-only methods on integer grids


@dataclass(frozen=True)
class MenuItem:
    """A scheme and group size (None: the scheme's default), or the layer kept in 16 bits."""

    scheme: str | None
    group_size: int | None = None

    @property
    def label(self) -> str:
        if self.scheme is None:
            return KEEP
        return self.scheme if self.group_size is None else f"{self.scheme}:{self.group_size}"


def parse_choices(text: str | tuple[str, ...]) -> list[MenuItem]:
    """'w3a16:64,w4a16:128,16' → menu items (checked as schemes; duplicates refused)."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not parts:
        raise LowbitError("--choices is empty; give formats like w3a16:64,w4a16:128,16.")
    items = []
    for part in parts:
        if part in (KEEP, "bf16", "fp16", "keep"):
            items.append(MenuItem(None))
            continue
        scheme, _, group = part.partition(":")
        try:
            size = int(group) if group else None
        except ValueError:
            raise LowbitError(f"choice {part!r}: the group size after ':' must be an integer (0 = per channel), e.g. "
                              f"w4a16:128.") from None
        Recipe(scheme=scheme, group_size=size)  # a bad scheme or group size is said here
        items.append(MenuItem(scheme.lower(), size))
    labels = [i.label for i in items]
    if len(set(labels)) != len(labels):
        raise LowbitError(f"--choices lists a format twice: {', '.join(labels)}.")
    return items


def check_target(target_bpw: float, method: str) -> None:
    if method not in MIXED_METHODS:
        raise LowbitError(f"--target-bpw chooses among weight formats for {', '.join(MIXED_METHODS)}; method "
                          f"{method} has formats of its own (SpQR) or quantizes activations too (SmoothQuant, FP8).")
    if not 0 < target_bpw <= 16:
        raise LowbitError(f"--target-bpw {target_bpw} is not a budget: give bits per weight above 0 and at most 16 "
                          f"(16 keeps every layer in 16 bits).")


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'80MB', '1.5GiB', '120000000' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b|b)?\s*", str(text).lower())
    if not m:
        raise LowbitError(f"--target-size {text!r} is not a size; write e.g. 80MB, 1.5GB, 500MiB or a number of bytes.")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "b"])


def size_to_bpw(model: nn.Module, family: Family, base: Recipe, size_bytes: int, dtype: torch.dtype) -> float:
    """The bits per targeted weight that a whole checkpoint of `size_bytes` leaves once every other tensor is
    stored (in `dtype`; integer tensors at their own size; tied tensors once)."""
    from lowbit.io.checkpoint import unique_state_dict

    targets = set(menu_plans(model, family, base, [MenuItem(None)])[KEEP])
    tensors, _ = unique_state_dict(model)
    weights = sum(t.numel() for k, t in tensors.items() if k.removesuffix(".weight") in targets)
    other_bits = 8 * sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                         for k, t in tensors.items() if k.removesuffix(".weight") not in targets)
    bpw = (8 * size_bytes - other_bits) / weights
    if bpw <= 0:
        raise LowbitError(f"--target-size {size_bytes / 1e6:.1f} MB does not even hold the tensors that are not "
                          f"quantized ({other_bits / 8e6:.1f} MB in {str(dtype).removeprefix('torch.')}): raise it.")
    return min(bpw, 16.0)


def item_recipe(base: Recipe, item: MenuItem) -> Recipe:
    return base if item.scheme is None else replace(base, scheme=item.scheme, group_size=item.group_size,
                                                    overrides=())


def menu_plans(model: nn.Module, family: Family, base: Recipe, menu: list[MenuItem]) -> dict[str, dict]:
    """label → layer → spec (None for the 16-bit choice), over the layers the base recipe targets (its targets,
    ignore and parts; its scheme does not matter)."""
    targeting = replace(base, scheme="w8a16", group_size=0, overrides=(), per_tensor=False, act_granularity="token",
                        act_static=False)
    layers = list(select_layers(model, family, targeting))
    linears = linear_layers(model)
    plans = {}
    for item in menu:
        if item.scheme is None:
            plans[item.label] = dict.fromkeys(layers)
            continue
        recipe = item_recipe(base, item)
        try:
            plan = select_layers(model, family, recipe)
            plans[item.label] = {n: plan[n] for n in layers}
        except LowbitError:  # groups that divide only some layers: offered to those alone
            spec = recipe.default_spec
            gran = getattr(spec.weight, "granularity", None)
            if not isinstance(gran, PerGroup):
                raise
            fits = {n: spec for n in layers if linears[n].in_features % gran.size == 0}
            if fits:
                plans[item.label] = {n: fits.get(n, NOT_OFFERED) for n in layers}
    return plans


def layer_bits(weight: torch.Tensor, spec: LayerSpec | None) -> int:
    """Stored bits of a layer at a spec: its shape decides them (RTN on zeros); 16 per weight when kept."""
    if spec is None:
        return 16 * weight.numel()
    return int(rtn.quantize_layer(torch.zeros_like(weight, dtype=torch.float32), None, spec).stored_bits())


def budget_check(model: nn.Module, plans: dict[str, dict], target_bpw: float) -> tuple[int, int]:
    """(budget in bits, targeted weights); refuses a budget below the smallest allocation before any work."""
    linears = linear_layers(model)
    names = list(next(iter(plans.values())))
    weights = sum(linears[n].weight.numel() for n in names)
    cache: dict[tuple, int] = {}
    smallest = 0
    for n in names:
        w = linears[n].weight
        sizes = []
        for label, plan in plans.items():
            if plan[n] is NOT_OFFERED:
                continue
            key = (tuple(w.shape), label)
            if key not in cache:
                cache[key] = layer_bits(w, plan[n])
            sizes.append(cache[key])
        smallest += min(sizes)
    budget = int(target_bpw * weights)
    if budget < smallest:
        raise LowbitError(f"--target-bpw {target_bpw} is below the smallest allocation the choices allow, "
                          f"{smallest / weights:.3f} bits per weight (every layer at its smallest choice): raise the "
                          f"target or add a smaller format to --choices.")
    return budget, weights


def layer_costs(pr, plans: dict[str, dict], method_name: str, recipe: Recipe,
                progress: bool = True) -> dict[str, list[Choice]]:
    """Per layer, every choice with its stored bits and Fisher-estimated KL (0 for a kept layer)."""
    from tqdm.auto import tqdm

    method = get_method(method_name if method_name in OWN_ROUNDING else "rtn")
    cfg = recipe.config(method.module.Config)
    linears = linear_layers(pr.model)
    names = list(next(iter(plans.values())))
    out: dict[str, list[Choice]] = {n: [] for n in names}
    for n in tqdm(names, desc="costs", unit="layer", disable=not progress, dynamic_ncols=True):
        w = linears[n].weight.detach()
        for label, plan in plans.items():
            if plan[n] is NOT_OFFERED:
                continue
            if plan[n] is None:
                out[n].append(Choice(label, 16 * w.numel(), 0.0))
                continue
            qw = quantize_weight(pr, n, plan[n], method, cfg)
            fisher, _ = proxy_errors(w, qw.dequantize(), pr.importance[n], pr.grad_sq[n], pr.positions)
            out[n].append(Choice(label, int(qw.stored_bits()), fisher))
    return out


def allocation_recipe(base: Recipe, allocation: Allocation, menu: list[MenuItem], blocks: str) -> Recipe:
    """The allocation as a recipe: the most common choice as its scheme, an override per other choice and layer
    kind (anchored, blocks listed), `skip` for 16-bit layers."""
    by_label = {i.label: i for i in menu}
    counts = Counter(c.label for c in allocation.choices.values())
    common = next((label for label, _ in counts.most_common() if label != KEEP), None)
    recipe = item_recipe(base, by_label[common]) if common else base
    groups: dict[tuple[str, str], list[int]] = {}
    for name, c in allocation.choices.items():
        if c.label == common:
            continue
        block, kind = block_of(name, blocks)
        groups.setdefault((c.label, kind), []).append(block)
    overrides = []
    for (label, kind), idx in groups.items():
        which = str(idx[0]) if len(idx) == 1 else f"(?:{'|'.join(map(str, sorted(idx)))})"
        pattern = rf"^{re.escape(blocks)}\.{which}\.{re.escape(kind)}$"
        item = by_label[label]
        overrides.append(Override(pattern=pattern, skip=True) if item.scheme is None
                         else Override(pattern=pattern, scheme=item.scheme, group_size=item.group_size))
    return replace(recipe, overrides=(*base.overrides, *overrides))


def bits_per_targeted_weight(model: nn.Module, family: Family, sizes: dict) -> float:
    """Bits per weight over every block linear layer (routers aside) and any other quantized layer, everything
    counted: the quantized layers' stored bits, 16 per weight of a block layer left in 16 bits. The one measure
    for uniform, partial (--parts) and mixed configurations alike."""
    from lowbit.model.targets import family_keeps

    prefix = family.blocks + "."
    kept = sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.startswith(prefix) and not family_keeps(n, family))
    quantized = sizes["quantized_weights"]
    bits = (sizes["bits_per_weight"] or 0) * quantized + 16 * kept
    return bits / (quantized + kept)


@dataclass
class Mixed:
    recipe: Recipe
    allocation: Allocation
    budget_bits: int
    weights: int
    info: dict


def costs_key(base: Recipe, menu: list[MenuItem], calib, plans: dict[str, dict]) -> str:
    """What the costs depend on: the method and its options, the calibration, and each layer's spec per choice."""
    import hashlib
    import json

    specs = {label: {n: repr(spec) for n, spec in sorted(plan.items())} for label, plan in plans.items()}
    text = json.dumps({"method": base.method, "options": base.options, "menu": [i.label for i in menu],
                       "calib": calib.to_dict(), "specs": specs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_costs(path: Path) -> dict[str, list[Choice]] | None:
    import json

    if not path.is_file():
        return None
    return {n: [Choice(label, int(bits), float(cost)) for label, bits, cost in cs]
            for n, cs in json.loads(path.read_text()).items()}


def save_costs(path: Path, costs: dict[str, list[Choice]]) -> None:
    import json

    from lowbit.io.atomic import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({n: [[c.label, c.bits, c.cost] for c in cs] for n, cs in costs.items()}))


def choose(model: nn.Module, tokenizer, family: Family, base: Recipe, target_bpw: float, menu: list[MenuItem],
           calib, progress: bool = True, cache_dir: Path | None = None) -> Mixed:
    """Cost every layer at every choice on calibration text, allocate within the budget, return the recipe.

    With `cache_dir`, the costs are kept there (one file per method, options, menu and calibration) and reused:
    a sweep's budgets share one costing. JSON keeps every float exactly, so the allocation is the same either way."""
    from lowbit.data.calibration import calibration_ids
    from lowbit.eval.divergence import text_record
    from lowbit.model.architectures import text_config

    check_target(target_bpw, base.method)
    if base.overrides:
        raise LowbitError("--target-bpw writes the per-layer overrides itself; give a recipe without overrides (its "
                          "targets, ignore and method options are kept).")
    plans = menu_plans(model, family, base, menu)
    budget, weights = budget_check(model, plans, target_bpw)
    costed = get_method(base.method if base.method in OWN_ROUNDING else "rtn")
    cache = None if cache_dir is None else Path(cache_dir) / f"costs-{costs_key(base, menu, calib, plans)}.json"
    costs = None if cache is None else cached_costs(cache)
    if costs is None:
        ids = calibration_ids(tokenizer, calib, getattr(text_config(model), "max_position_embeddings", None))
        record = text_record(ids, {"model": "calibration", "top_n": 16})
        first = {n: next((p[n] for p in plans.values() if p[n] is not None and p[n] is not NOT_OFFERED), None)
                 for n in next(iter(plans.values()))}
        pr = probe(model, family, record, {n: spec for n, spec in first.items() if spec is not None}, costed,
                   measure=False, progress=progress)
        costs = layer_costs(pr, plans, base.method, base, progress)
        if cache is not None:
            save_costs(cache, costs)
    allocation = allocate(costs, budget)
    if all(c.label == KEEP for c in allocation.choices.values()):
        raise LowbitError(f"the budget ({target_bpw:.2f} bits per targeted weight) keeps every targeted layer in 16 "
                          f"bits, so there is nothing to quantize: lower it.")
    recipe = allocation_recipe(base, allocation, menu, family.blocks)
    info = {"target_bits_per_weight": target_bpw, "bits_per_weight": allocation.bits / weights,
            "predicted_kl": allocation.cost, "cost": "fisher", "costed_with": costed.module.__name__.rpartition(".")[2],
            "choices": [i.label for i in menu], "calibration": calib.to_dict(),
            "layers": dict(Counter(c.label for c in allocation.choices.values())), "exact": allocation.exact}
    return Mixed(recipe, allocation, budget, weights, info)
