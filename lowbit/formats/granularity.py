"""Which weights share one scale (and zero): the whole tensor, one output row, or a group of input columns."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole weight matrix."""

    def to_dict(self) -> dict:
        return {"type": "per_tensor"}


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (row of the [out, in] weight)."""

    def to_dict(self) -> dict:
        return {"type": "per_channel"}


@dataclass(frozen=True)
class PerGroup:
    """One scale per `size` consecutive input columns of each row."""

    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise LowbitError(f"group size must be a positive integer, got {self.size!r}.")

    def to_dict(self) -> dict:
        return {"type": "per_group", "size": self.size}


Granularity = PerTensor | PerChannel | PerGroup


def granularity_from_group_size(group_size: int | None) -> Granularity:
    """The CLI's convention: 0 or -1 (or None) is per channel, N > 0 is groups of N."""
    if group_size is None or group_size in (0, -1):
        return PerChannel()
    if group_size < -1:
        raise LowbitError(f"--group-size {group_size} is not valid: use a positive size, or 0 / -1 for per-channel.")
    return PerGroup(group_size)


def granularity_from_dict(d: dict) -> Granularity:
    kind = d.get("type")
    if kind == "per_tensor":
        return PerTensor()
    if kind == "per_channel":
        return PerChannel()
    if kind == "per_group":
        return PerGroup(int(d["size"]))
    raise LowbitError(f"unknown granularity {d!r}: expected per_tensor, per_channel or per_group.")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def working_group_sizes(n: int) -> str:
    """The group sizes that divide n, for error messages: those of at least 8 when there are any."""
    return ", ".join(map(str, [d for d in divisors(n) if d >= 8] or divisors(n)))


def num_groups(granularity: Granularity, in_features: int) -> int:
    """Groups per row; raises a LowbitError naming working group sizes when the size does not divide."""
    if isinstance(granularity, PerGroup):
        if in_features % granularity.size:
            raise LowbitError(
                f"group size {granularity.size} does not divide the input dimension {in_features}. "
                f"Group sizes that divide it: {working_group_sizes(in_features)}; or use --group-size 0 for "
                f"per-channel."
            )
        return in_features // granularity.size
    return 1
