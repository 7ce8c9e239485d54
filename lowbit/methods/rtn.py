"""RTN: round-to-nearest, the data-free baseline.

Each weight is mapped independently to its nearest grid point, ŵ = (clamp(round(w/s) + z, 0, 2^b − 1) − z)·s,
with s and z from the group's range (absmax) or from the clipping search. It sees no activations.
"""

from __future__ import annotations

import torch

from lowbit.formats import QuantizedWeight, quantize
from lowbit.formats.spec import LayerSpec

NEEDS_CALIBRATION = False
Config = None  # no options beyond the format


def quantize_layer(weight: torch.Tensor, stats: None, spec: LayerSpec, cfg: None = None) -> QuantizedWeight:
    """Quantize one weight on its own; RTN uses no statistics."""
    return quantize(weight, spec.weight)
