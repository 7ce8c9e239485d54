"""The one visible table from a method name to the module that implements it."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from lowbit.errors import LowbitError
from lowbit.methods import gptq, rtn, spqr


@dataclass(frozen=True)
class MethodEntry:
    module: ModuleType
    description: str
    required_scheme: str | None = None


METHODS: dict[str, MethodEntry] = {
    "rtn": MethodEntry(rtn, "round-to-nearest, data-free"),
    "fp8": MethodEntry(rtn, "round-to-nearest onto FP8 E4M3 (scheme fp8)", required_scheme="fp8"),
    "gptq": MethodEntry(gptq, "GPTQ: second-order error compensation from calibration Hessians"),
    "spqr": MethodEntry(spqr, "SpQR: GPTQ in small groups with quantized statistics and sparse 16-bit outliers"),
}
PLANNED = ("awq", "smoothquant")


def get_method(name: str) -> MethodEntry:
    key = name.lower()
    if key in METHODS:
        return METHODS[key]
    if key in PLANNED:
        raise LowbitError(f"method {name!r} is not available in this version of lowbit yet; available methods: "
                          f"{', '.join(METHODS)}.")
    raise LowbitError(f"unknown method {name!r}; available methods: {', '.join(METHODS)} "
                      f"(planned: {', '.join(PLANNED)}).")
