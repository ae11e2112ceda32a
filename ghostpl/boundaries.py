"""Pruning plans: which layers go, and the boundaries where the residual stream must be repaired.

Layer indices are 0-based. A boundary is one maximal run of consecutive removed layers
``[start, end)``. Its input ``X_pre`` is the residual stream entering layer ``start`` and its target
``X_post`` is the stream entering layer ``end`` of the unpruned model. When ``end`` equals the layer
count, ``X_post`` is the input of the final norm.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Boundary:
    """One run ``[start, end)`` of consecutive removed layers."""

    start: int
    end: int

    @property
    def name(self) -> str:
        """Label used in logs, metric names and results, such as ``13-19``."""
        return f"{self.start}-{self.end}"

    @property
    def removed(self) -> list[int]:
        return list(range(self.start, self.end))


def validate_removed_layers(removed: Iterable[int], num_layers: int) -> list[int]:
    """Return the removed indices sorted, or raise if any is repeated or out of range."""
    removed = list(removed)
    for index in removed:
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"Invalid layer index {index!r}: layer indices are 0-based integers.")
        if not 0 <= index < num_layers:
            raise ValueError(
                f"Layer index {index} is out of range: the model has {num_layers} decoder layers, "
                f"so indices run from 0 to {num_layers - 1}."
            )
    repeated = sorted({i for i in removed if removed.count(i) > 1})
    if repeated:
        raise ValueError(f"Layer indices {repeated} are listed more than once: list each removed layer once.")
    if not removed:
        raise ValueError("No layers to remove: list at least one 0-based index, or set num_layers >= 1.")
    if len(removed) >= num_layers:
        raise ValueError(
            f"Cannot remove {len(removed)} of {num_layers} decoder layers: at least one must remain. "
            f"Remove at most {num_layers - 1}."
        )
    return sorted(removed)


def boundaries_of(removed: Iterable[int]) -> list[Boundary]:
    """Group sorted removed indices into runs of consecutive layers."""
    boundaries: list[Boundary] = []
    for index in sorted(removed):
        if boundaries and boundaries[-1].end == index:
            boundaries[-1] = Boundary(boundaries[-1].start, index + 1)
        else:
            boundaries.append(Boundary(index, index + 1))
    return boundaries


def kept_layers(removed: Iterable[int], num_layers: int) -> list[int]:
    removed = set(removed)
    return [i for i in range(num_layers) if i not in removed]
