"""Quantized modules used at inference."""

from lowbit.runtime.qlinear import QuantLinear, set_module

__all__ = ["QuantLinear", "set_module"]
