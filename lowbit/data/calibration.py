"""Calibration samples: the set's texts joined, tokenized once, cut into non-overlapping windows, sampled."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lowbit.data.datasets import calibration_texts
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class CalibConfig:
    """`samples` windows of `seqlen` tokens from `dataset`, drawn without replacement with `seed`."""

    dataset: str = "c4"
    samples: int = 128
    seqlen: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 2:
            raise LowbitError(f"calibration needs at least 1 sample of 2 tokens; got --calib-samples {self.samples}, "
                              f"--calib-seqlen {self.seqlen}.")

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "samples": self.samples, "seqlen": self.seqlen, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: Mapping) -> CalibConfig:
        unknown = sorted(set(d) - set(cls().to_dict()))
        if unknown:
            raise LowbitError(f"unknown calibration setting(s) {', '.join(map(repr, unknown))}; a calibration is "
                              f"given by {', '.join(cls().to_dict())}.")
        return cls(**d)


FAST = CalibConfig(samples=32, seqlen=512)  # `lowbit quantize --fast`: 1/8 of the default's tokens


def calibration_ids(tokenizer, cfg: CalibConfig, max_seqlen: int | None = None) -> torch.Tensor:
    """Token ids [samples, seqlen]; seqlen is capped at the model's context."""
    seqlen = min(cfg.seqlen, max_seqlen) if max_seqlen else cfg.seqlen
    text = "\n\n".join(calibration_texts(cfg.dataset))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    available = ids.numel() // seqlen
    if available < cfg.samples:
        raise LowbitError(f"calibration set smaller than requested: {cfg.dataset} gives {ids.numel():,} tokens, "
                          f"{available} windows of {seqlen} tokens, but {cfg.samples} were requested. Lower "
                          f"--calib-samples or --calib-seqlen, or pass a larger --calib file.")
    pick = torch.randperm(available, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.samples]
    windows = ids[: available * seqlen].view(available, seqlen)
    return windows[pick]
