"""What one linear layer is quantized to: its weight format and, optionally, its activation format."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.formats import ActFormat, WeightFormat, format_from_dict


@dataclass(frozen=True)
class LayerSpec:
    """The resolved quantization of one linear layer."""

    weight: WeightFormat
    act: ActFormat | None = None

    def to_dict(self) -> dict:
        return {"weight": self.weight.to_dict(), "act": self.act.to_dict() if self.act else None}

    @classmethod
    def from_dict(cls, d: dict) -> LayerSpec:
        return cls(format_from_dict(d["weight"]), ActFormat.from_dict(d["act"]) if d.get("act") else None)
