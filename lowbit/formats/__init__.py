"""Number formats: integer grids (sym/asym), fp8, SpQR, llama.cpp's k-quants, granularities, clipping search, bit
packing."""

from lowbit.formats.activation import ActFormat, fake_quantize_activation
from lowbit.formats.fp8 import FP8Format
from lowbit.formats.granularity import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    granularity_from_group_size,
    num_groups,
)
from lowbit.formats.intgrid import IntFormat
from lowbit.formats.kquant import KQuantFormat, KQuantWeight
from lowbit.formats.packing import pack, unpack
from lowbit.formats.spqr import SpQRFormat, SpQRWeight
from lowbit.formats.weight import (
    QuantizedWeight,
    WeightFormat,
    fake_quantize,
    format_from_dict,
    from_packed,
    packed_shapes,
    quantize,
)

__all__ = [
    "ActFormat", "FP8Format", "Granularity", "IntFormat", "KQuantFormat", "KQuantWeight", "PerChannel", "PerGroup",
    "PerTensor",
    "QuantizedWeight", "SpQRFormat", "SpQRWeight", "WeightFormat", "fake_quantize", "fake_quantize_activation",
    "format_from_dict",
    "from_packed", "granularity_from_group_size", "num_groups", "pack", "packed_shapes", "quantize", "unpack",
]
