"""GPU kernels (Triton) for quantized layers, each checked against the plain-torch reference it replaces.

QuantLinear calls `kernel_for(...)` on CUDA inputs; CPU inputs, and formats without a kernel, keep the reference
path (lowbit.runtime.qlinear), the latter with one log line per reason. `set_enabled(False)` (or the environment
variable LOWBIT_KERNELS=0) forces the reference everywhere, for comparisons.
"""

from __future__ import annotations

import logging
import os
from functools import cache

log = logging.getLogger("lowbit.kernels")
_state = {"enabled": os.environ.get("LOWBIT_KERNELS", "1") != "0"}
_said: set[str] = set()


def set_enabled(enabled: bool) -> None:
    """Use the Triton kernels on CUDA tensors (True, the default) or the plain-torch reference (False)."""
    _state["enabled"] = bool(enabled)


def enabled() -> bool:
    return _state["enabled"] and triton_available()


def wanted_for(x) -> bool:
    """Whether a layer should try its kernel on input x: a CUDA tensor, kernels on, Triton importable."""
    if not x.is_cuda or not _state["enabled"]:
        return False
    if not triton_available():
        say_fallback("any layer", "Triton is not installed: pip install triton")
        return False
    return True


@cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def say_fallback(what: str, reason: str) -> None:
    """One log line per distinct reason that a layer runs the reference instead of a kernel."""
    if reason not in _said:
        _said.add(reason)
        log.warning("lowbit: no GPU kernel for %s (%s); running the plain-torch reference for such layers", what,
                    reason)
