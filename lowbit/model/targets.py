"""Which linear layers a recipe quantizes, resolved against a model and checked before any work starts."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from functools import reduce

from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import PerGroup
from lowbit.formats.ggml_mix import MIXES, block_index, fitted_type, mix_type, say_fallbacks, type_format
from lowbit.formats.granularity import working_group_sizes
from lowbit.formats.kquant import KQuantFormat
from lowbit.formats.spec import LayerSpec
from lowbit.formats.spqr import SpQRFormat
from lowbit.model.architectures import Family
from lowbit.model.parts import expand_parts, part_layers
from lowbit.recipe import Recipe


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


AUTO_GROUP_SIZES = (128, 64, 32)  # tried in turn where the scheme's default group size does not fit the model


def select_layers(model: nn.Module, family: Family, recipe: Recipe) -> dict[str, LayerSpec]:
    """Map each targeted linear layer's full name to its LayerSpec; errors when nothing or something odd matches."""
    linears = linear_layers(model)
    plan = _plan(model, linears, family, recipe)
    _check_group_sizes(plan, linears)
    for name, spec in plan.items():
        if isinstance(spec.weight, SpQRFormat):
            try:
                spec.weight.check_shape((linears[name].out_features, linears[name].in_features))
            except LowbitError as e:
                raise LowbitError(f"layer {name}: {e} Set --stat-group (β2) or --group-size (β1) to fit.") from None
    return plan


def fit_group_size(model: nn.Module, family: Family, recipe: Recipe) -> tuple[Recipe, str | None]:
    """The recipe with its group size chosen for this model, and a note saying why (None when unchanged).

    Only a recipe that leaves the group size to the scheme (`group_size` None) changes, and only where the scheme's
    default groups do not divide every targeted layer's input dimension (SmolLM2's 576 columns and groups of 128):
    it then takes the largest of AUTO_GROUP_SIZES, at most the default, that divides them all. A group size the user
    gave is never changed (select_layers refuses it with the sizes that fit)."""
    default = getattr(recipe.default_spec.weight, "granularity", None)
    if recipe.group_size is not None or recipe.per_tensor or not isinstance(default, PerGroup):
        return recipe, None
    linears = linear_layers(model)
    bad = _misfits(_plan(model, linears, family, recipe), linears)
    if not bad:
        return recipe, None
    name = next(iter(bad.values()))[0]
    for size in (s for s in AUTO_GROUP_SIZES if s < default.size):
        fitted = replace(recipe, group_size=size)
        if not _misfits(_plan(model, linears, family, fitted), linears):
            return fitted, (f"{size}, chosen automatically: the default {default.size} does not divide the input "
                            f"dimension {linears[name].in_features} of {name}")
    return recipe, None


def _plan(model: nn.Module, linears: dict[str, nn.Linear], family: Family, recipe: Recipe) -> dict[str, LayerSpec]:
    """The targeted layers and their specs, before the checks of their shapes."""
    if recipe.parts and recipe.targets:
        raise LowbitError("give either --parts or --targets, not both (--ignore and overrides work with either).")
    if recipe.parts:
        selected = part_layers(model, family, recipe.parts)
        candidates = [n for n in selected if n in linears]
        what = f"parts {list(recipe.parts)}"
        if not candidates and not selected and set(expand_parts(recipe.parts)) & {"kv_cache", "attention"}:
            return {}  # only the KV cache / attention are quantized
    elif recipe.targets:
        candidates = [n for n in linears if any(re.search(p, n) for p in recipe.targets)]
        what = f"targets {list(recipe.targets)}"
    else:
        candidates = [n for n in linears if n.startswith(family.blocks + ".")]
        what = "the default targets (linear layers of the decoder blocks)"
    chosen = [n for n in candidates if not any(re.search(p, n) for p in recipe.ignore) and not family_keeps(n, family)]
    if not chosen:
        examples = ", ".join(list(linears)[:4])
        raise LowbitError(f"no linear layer matched {what} after ignore patterns {list(recipe.ignore)}. "
                          f"Linear layers in this model are named like: {examples}.")
    for o in recipe.overrides:
        if not any(re.search(o.pattern, n) for n in chosen):
            raise LowbitError(f"recipe override pattern {o.pattern!r} matches none of the {len(chosen)} targeted "
                              f"layers (e.g. {chosen[0]}); fix or remove it.")
    plan = {n: spec for n in chosen if (spec := recipe.layer_spec(n)) is not None}
    plan = _ggml_types(plan, linears, family, recipe)
    if not plan:
        raise LowbitError("the recipe's overrides skip every targeted layer: nothing would be quantized.")
    return plan


def family_keeps(name: str, family: Family) -> bool:
    """A layer the family keeps in 16 bits (a mixture-of-experts router)."""
    head, _, rest = name.partition(family.blocks + ".")
    return not head and any(rest.partition(".")[2] == k for k in family.keep)


def _ggml_types(plan: dict[str, LayerSpec], linears: dict[str, nn.Linear], family: Family,
                recipe: Recipe) -> dict[str, LayerSpec]:
    """llama.cpp's per-layer choices: a mix's types (lowbit.formats.ggml_mix), then the fallbacks for rows that are
    not whole super-blocks (or blocks: such layers stay in 16 bits)."""
    blocks = [i for n in plan if (i := block_index(n, family.blocks)) is not None]
    layers = max(blocks) + 1 if blocks else 0
    out, changed = {}, {}
    for name, spec in plan.items():
        w = spec.weight
        if recipe.scheme in MIXES and isinstance(w, KQuantFormat) and w.type == recipe.scheme[:4] \
                and (i := block_index(name, family.blocks)) is not None:
            w = KQuantFormat(mix_type(recipe.scheme, name, i, layers))
        if isinstance(w, KQuantFormat):
            cols = linears[name].in_features
            fitted = fitted_type(w.type, cols)
            if fitted != w.type:
                changed.setdefault((w.type, fitted, cols), []).append(name)
            if fitted is None:
                continue
            w = type_format(fitted)
        out[name] = spec if w == spec.weight else recipe.method_spec(replace(spec, weight=w))
    say_fallbacks(changed)
    return out


def _misfits(plan: dict[str, LayerSpec], linears: dict[str, nn.Linear]) -> dict[int, list[str]]:
    """group size → the planned layers whose input dimension it does not divide."""
    bad: dict[int, list[str]] = {}
    for name, spec in plan.items():
        g = getattr(spec.weight, "granularity", None)
        if isinstance(g, PerGroup) and linears[name].in_features % g.size:
            bad.setdefault(g.size, []).append(name)
    return bad


def _check_group_sizes(plan: dict[str, LayerSpec], linears: dict[str, nn.Linear]) -> None:
    bad = _misfits(plan, linears)
    if not bad:
        return
    size, names = next(iter(bad.items()))
    common = reduce(math.gcd, (linears[n].in_features for n in plan))
    dims = sorted({linears[n].in_features for n in names})
    raise LowbitError(
        f"group size {size} does not divide the input dimension of {len(names)} of the {len(plan)} targeted layers "
        f"(input dimensions {', '.join(map(str, dims))}; e.g. {names[0]}). Group sizes that divide every targeted "
        f"layer: {working_group_sizes(common)}. Or use --group-size 0 for per-channel scales, or a recipe override for "
        f"the layers concerned."
    )
