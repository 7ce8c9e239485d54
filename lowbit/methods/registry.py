"""The one visible table from a method name to the module that implements it, and each method's options.

A method module (and a transform module) declares `Config`: a frozen dataclass of its options with their
defaults, or None when it has none. A recipe's `options` are these fields by name; `configure` checks them
(names, types, each config's own validation) and builds the configs the pipeline hands the method.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

from lowbit.errors import LowbitError
from lowbit.methods import awq, gptq, imatrix, rtn, smoothquant, spqr


@dataclass(frozen=True)
class MethodEntry:
    """`module` quantizes each layer; `transform`, when there is one, first rewrites each block in a way that
    leaves the float model unchanged (scales folded into the previous operation) and may clamp weights."""

    module: ModuleType
    description: str
    required_scheme: str | None = None
    transform: ModuleType | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.module.NEEDS_CALIBRATION or self.transform is not None

    @property
    def configs(self) -> tuple[type, ...]:
        """The option classes of its parts, transform first; a method without options has none."""
        return tuple(m.Config for m in (self.transform, self.module) if m is not None and m.Config is not None)


METHODS: dict[str, MethodEntry] = {
    "rtn": MethodEntry(rtn, "round-to-nearest, data-free"),
    "fp8": MethodEntry(rtn, "round-to-nearest onto FP8 E4M3 (scheme fp8)", required_scheme="fp8"),
    "imatrix": MethodEntry(imatrix, "round-to-nearest with each group's range chosen for the least error weighted "
                           "by mean squared activations (llama.cpp's imatrix)"),
    "gptq": MethodEntry(gptq, "GPTQ: second-order error compensation from calibration Hessians"),
    "spqr": MethodEntry(spqr, "SpQR: GPTQ in small groups with quantized statistics and sparse 16-bit outliers"),
    "awq": MethodEntry(rtn, "AWQ: activation-aware scales and clipping, then round-to-nearest", transform=awq),
    "smoothquant": MethodEntry(rtn, "SmoothQuant: activation outliers migrated into the weights, then "
                               "round-to-nearest", transform=smoothquant),
    "smoothquant+gptq": MethodEntry(gptq, "SmoothQuant: activation outliers migrated into the weights, then GPTQ",
                                    transform=smoothquant),
}


def get_method(name: str) -> MethodEntry:
    key = name.lower()
    if key in METHODS:
        return METHODS[key]
    raise LowbitError(f"unknown method {name!r}; available methods: {', '.join(METHODS)}.")


def transform_name(method: MethodEntry) -> str:
    """The block transform's name (awq, smoothquant): what its saved scales are labelled with."""
    return method.transform.__name__.rpartition(".")[2]


_TYPES: dict[str, tuple[type, ...]] = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,),
                                       "None": (type(None),)}


def _check_type(method: str, cls: type, name: str, value: Any) -> Any:
    """The value if it has the field's declared type (an int where a float is declared becomes a float)."""
    declared = next(f.type for f in fields(cls) if f.name == name)
    declared = declared if isinstance(declared, str) else declared.__name__
    allowed = [t for part in declared.split("|") for t in _TYPES[part.strip()]]
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, tuple(allowed)):
        raise LowbitError(f"method {method}'s option {name!r} must be {declared}, got {value!r}.")
    return float(value) if "float" in declared and type(value) is int else value


def configure(method: str, options: dict[str, Any]) -> dict[type, Any]:
    """Each of the method's option classes, built from `options` (its defaults where none is given).

    Unknown names, values of the wrong type and values a config refuses are errors naming the method."""
    entry = get_method(method)
    owner = {f.name: cls for cls in entry.configs for f in fields(cls)}
    unknown = sorted(set(options) - set(owner))
    if unknown:
        takes = f"its options are {', '.join(owner)}" if owner else "it has none"
        raise LowbitError(f"method {method} has no option {', '.join(map(repr, unknown))}; {takes}. Drop the "
                          f"option or choose the method it belongs to.")
    given: dict[type, dict[str, Any]] = {cls: {} for cls in entry.configs}
    for name, value in options.items():
        given[owner[name]][name] = _check_type(method, owner[name], name, value)
    return {cls: cls(**kw) for cls, kw in given.items()}


def non_defaults(configs: dict[type, Any]) -> dict[str, Any]:
    """The options that differ from their class's defaults, by name, sorted."""
    out = {}
    for cls, cfg in configs.items():
        default = cls()
        out.update({f.name: getattr(cfg, f.name) for f in fields(cls)
                    if getattr(cfg, f.name) != getattr(default, f.name)})
    return dict(sorted(out.items()))


def all_options(configs: dict[type, Any]) -> dict[str, Any]:
    """Every option with its value, defaults included, by name."""
    return {f.name: getattr(cfg, f.name) for cls, cfg in configs.items() for f in fields(cls)}


