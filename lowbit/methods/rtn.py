"""RTN: round-to-nearest, the data-free baseline.

Each weight is mapped independently to its nearest grid point, ŵ = (clamp(round(w/s) + z, 0, 2^b − 1) − z)·s,
with s and z from the group's range (absmax) or from the clipping search. It sees no activations.
"""

from __future__ import annotations

from torch import nn

from lowbit.formats import QuantizedWeight, quantize
from lowbit.model.capture import BlockInputs
from lowbit.recipe import LayerSpec

NEEDS_CALIBRATION = False


def quantize_block(block: nn.Module, specs: dict[str, LayerSpec], inputs: BlockInputs | None = None,
                   device: str = "cpu") -> dict[str, QuantizedWeight]:
    """Quantize each named linear layer of the block on its own; `inputs` are not used."""
    return {name: quantize(block.get_submodule(name).weight, spec.weight) for name, spec in specs.items()}
