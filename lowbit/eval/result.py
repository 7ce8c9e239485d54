"""An evaluation's result as a value with typed fields: the JSON object `lowbit eval --json` writes (DESIGN.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation measured. Each field is the JSON object's entry of that name (None where it was not
    asked for); `to_dict()` gives the object back, as `lowbit eval --json` writes it."""

    reference: str | None
    candidate: str | None
    kl: Mapping | None = None  # divergence on the reference's generations: all / prefill / generation / by_position
    kl_text: Mapping | None = None  # dataset → divergence on its perplexity windows
    ppl: Mapping | None = None  # dataset → reference and candidate perplexity
    tasks: Mapping | None = None  # task → accuracy of each, and flips
    size: Mapping | None = None  # the candidate's bits per weight and bytes; a lowbit checkpoint's method and recipe
    endpoint: Mapping | None = None  # a served candidate: how it was asked
    reference_endpoint: Mapping | None = None  # a served reference: how its record was made, k, its holes
    lowbit_version: str | None = None  # the lowbit that evaluated
    date: str | None = None  # when the evaluation ran (ISO 8601, local time with its UTC offset)
    timings_s: Mapping = field(default_factory=dict)
    other: Mapping = field(default_factory=dict)  # entries this version of the class does not name

    @classmethod
    def from_dict(cls, d: Mapping) -> EvalResult:
        names = {f.name for f in dataclasses.fields(cls)} - {"other"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   other=MappingProxyType({k: v for k, v in d.items() if k not in names}))

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "other"}
        out = {k: v for k, v in out.items() if v is not None or k in ("reference", "candidate", "size")}
        return {**out, **self.other}

    @property
    def kl_mean(self) -> float | None:
        """Mean KL divergence (Fireworks' top-N KL) over every position, or None without --kl."""
        return self.kl["all"]["mean"] if self.kl else None

    @property
    def token_rejection_rate(self) -> float | None:
        """Share of positions where the candidate's most likely token is not the reference's."""
        return self.kl["all"]["token_rejection_rate"] if self.kl else None
