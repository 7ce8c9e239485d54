"""llama.cpp's tensor-type mixes (its `--ftype` names Q4_K_M, Q5_K_M, Q3_K_M, Q6_K, Q8_0) as per-layer formats.

llama.cpp (src/llama-quant.cpp, llama_tensor_get_type) gives most tensors the mix's base type and some more bits:

    mix      base   attn_v (layer i of n)                 ffn_down (layer i of n)                attn_output
    Q4_K_M   Q4_K   Q6_K where more_bits(i, n)            Q6_K where more_bits(i, n)             base
    Q5_K_M   Q5_K   Q6_K where more_bits(i, n)            Q6_K where more_bits(i, n)             base
    Q3_K_M   Q3_K   Q5_K for i < 2, else Q4_K             Q5_K for i < n/16, else Q4_K            Q4_K
    Q6_K     Q6_K   base                                  base                                   base
    Q8_0     Q8_0   base                                  base                                   base

with more_bits(i, n) = i < n/8 or i ≥ 7n/8 or (i − n/8) mod 3 = 2. A row whose length is not a multiple of 256
cannot hold a k-quant super-block; llama.cpp then falls back: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, Q2_K and
Q3_K → IQ4_NL (and to 16 bits when even blocks of 32 do not fit). `layer_format` applies both, so a lowbit file
can be set against llama.cpp's of the same name. (llama.cpp also sets the output/tied embedding tensor to Q6_K, or
Q8_0 on such rows; lowbit keeps embeddings and lm_head as the source has them unless they are targeted.)
"""

from __future__ import annotations

import logging
import re

from lowbit.formats.ggml import LEGACY
from lowbit.formats.kquant import KQuantFormat

log = logging.getLogger("lowbit")

MIXES = ("q4_k_m", "q5_k_m", "q3_k_m")
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q3_k": "iq4_nl", "q2_k": "iq4_nl"}


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(mix: str, name: str, layer: int, layers: int) -> str:
    """The ggml type of layer `name` (decoder block `layer` of `layers`) under a mix."""
    base = mix[:4]  # q4_k_m → q4_k
    kind = name.rsplit(".", 1)[-1]
    if mix == "q3_k_m":
        if kind == "v_proj":
            return "q5_k" if layer < 2 else "q4_k"
        if kind == "down_proj":
            return "q5_k" if layer < layers // 16 else "q4_k"
        if kind == "o_proj":
            return "q4_k"
        return base
    if kind in ("v_proj", "down_proj") and more_bits(layer, layers):
        return "q6_k"
    return base


def block_index(name: str, blocks: str) -> int | None:
    m = re.match(re.escape(blocks) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def fitted_type(type_name: str, in_features: int) -> str | None:
    """The type llama.cpp stores a row of `in_features` in: the type itself, its fallback, or None for 16 bits."""
    if in_features % (256 if type_name in FALLBACK else 32) == 0:
        return type_name
    fallback = FALLBACK.get(type_name)
    return fallback if fallback is not None and in_features % 32 == 0 else None


def say_fallbacks(changed: dict[tuple[str, str | None, int], list[str]]) -> None:
    """One log line per (type, fallback, row length) with how many layers and one example."""
    for (was, now, cols), names in changed.items():
        to = now.upper() if now else "16 bits (not quantized)"
        log.warning("%d layer(s) with rows of %d (e.g. %s) are not whole %s blocks: %s → %s, as llama.cpp does",
                    len(names), cols, names[0], was.upper(), was.upper(), to)


def type_format(type_name: str):
    """The lowbit weight format of a ggml type name."""
    if type_name in LEGACY:
        return LEGACY[type_name].lowbit_format()
    return KQuantFormat(type_name)
