"""Sufficient statistics of each boundary, accumulated in float64 over calibration tokens.

Rows are tokens: ``X_pre`` and ``X_post`` are ``(N, D)``. Every field is a sum over tokens, never a
mean, so that chunks of a batch, batches and ranks combine by addition; padded positions are
removed before anything is summed. Nothing here keeps activations beyond the call that adds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

ACCUMULATION_DTYPE = torch.float64


@dataclass
class BoundaryStatistics:
    """Float64 sums over the calibration tokens of one boundary.

    Attributes:
        XtX: ``X_preᵀ X_pre``, ``(D, D)``.
        XtDelta: ``X_preᵀ (X_post - X_pre)``, ``(D, D)``.
        delta_sq: ``‖X_post - X_pre‖²``, a scalar, for the residual of a fitted operator.
        abs_pre, abs_post: per-channel sums of ``|X_pre|`` and ``|X_post|``, ``(D,)``.
        count: number of tokens summed, as a float64 scalar so it all-reduces with the rest.
    """

    XtX: torch.Tensor
    XtDelta: torch.Tensor
    delta_sq: torch.Tensor
    abs_pre: torch.Tensor
    abs_post: torch.Tensor
    count: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def zeros(cls, hidden_size: int, device: torch.device | str = "cpu") -> BoundaryStatistics:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=ACCUMULATION_DTYPE, device=device)

        d = hidden_size
        return cls(XtX=z(d, d), XtDelta=z(d, d), delta_sq=z(), abs_pre=z(d), abs_post=z(d), count=z())

    @property
    def hidden_size(self) -> int:
        return self.XtX.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """All sums by name, the optional ones under ``extra/<name>``."""
        named = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        named.update({f"extra/{k}": v for k, v in sorted(self.extra.items())})
        return named

    def add(self, x_pre: torch.Tensor, x_post: torch.Tensor) -> None:
        """Add the tokens of ``x_pre`` and ``x_post``, both ``(N, D)`` with padding already removed."""
        if x_pre.shape != x_post.shape or x_pre.dim() != 2:
            raise ValueError(f"Expected two (N, D) tensors of one shape, got {tuple(x_pre.shape)} and {tuple(x_post.shape)}.")
        x = x_pre.to(ACCUMULATION_DTYPE)
        delta = x_post.to(ACCUMULATION_DTYPE) - x
        self.XtX.addmm_(x.T, x)
        self.XtDelta.addmm_(x.T, delta)
        self.delta_sq += delta.square().sum()
        self.abs_pre += x.abs().sum(0)
        self.abs_post += x_post.to(ACCUMULATION_DTYPE).abs().sum(0)
        self.count += x.shape[0]

    def add_extra(self, name: str, value: torch.Tensor) -> None:
        """Add to an optional named sum, creating it on first use."""
        value = value.to(ACCUMULATION_DTYPE)
        if name in self.extra:
            self.extra[name] += value
        else:
            self.extra[name] = value.clone()

    def merge_(self, other: BoundaryStatistics) -> BoundaryStatistics:
        """Add another accumulator's sums to this one, in place."""
        if set(self.extra) != set(other.extra):
            raise ValueError(f"Cannot merge statistics with extra sums {sorted(self.extra)} and {sorted(other.extra)}.")
        for name, tensor in self.tensors().items():
            tensor += other.tensors()[name].to(tensor.device)
        return self

    def to(self, device: torch.device | str) -> BoundaryStatistics:
        return BoundaryStatistics(
            **{f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "extra"},
            extra={k: v.to(device) for k, v in self.extra.items()},
        )


def all_reduce_statistics(stats: list[BoundaryStatistics]) -> None:
    """Sum every boundary's statistics over all ranks in place; a no-op in a single process.

    The sums travel as one flat float64 buffer so that a rank pays one collective, not one per
    tensor. Every rank must hold the same boundaries with the same extra sums.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    tensors = [t for s in stats for t in s.tensors().values()]
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        tensor.copy_(flat[offset : offset + n].view_as(tensor))
        offset += n


def all_reduce_tensors(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over all ranks in place; a no-op in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
