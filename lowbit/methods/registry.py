"""The one visible table from a method name to the module that implements it."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

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
