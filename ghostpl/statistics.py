"""Sufficient statistics of each boundary, accumulated in float64 over calibration tokens.

Rows are tokens: ``X_pre`` and ``X_post`` are ``(N, D)``. Every field is a sum over tokens, never a
mean, so that chunks of a batch, batches and ranks combine by addition. Padded positions are
removed before anything is summed. Nothing here keeps activations beyond the call that adds them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

ACCUMULATION_DTYPE = torch.float64

# Kinds of optional sums that a recovery method can request from the calibration pass.
ROTATED_ABS = "rotated_abs"
MLP_OUTPUT = "mlp_output"
EXTRA_KINDS = (ROTATED_ABS, MLP_OUTPUT)

# Names in ``BoundaryStatistics.extra`` of the sums each kind adds.
ROTATED_ABS_PRE = "rotated_abs_pre"
ROTATED_ABS_POST = "rotated_abs_post"
MLP_GRAM = "mlp_gram"
MLP_CROSS = "mlp_cross"
EXTRA_NAMES = {ROTATED_ABS: (ROTATED_ABS_PRE, ROTATED_ABS_POST), MLP_OUTPUT: (MLP_GRAM, MLP_CROSS)}


@dataclass
class BoundaryStatistics:
    """Float64 sums over the calibration tokens of one boundary.

    Attributes:
        XtX: ``X_preᵀ X_pre``, ``(D, D)``.
        XtDelta: ``X_preᵀ (X_post - X_pre)``, ``(D, D)``.
        delta_sq: ``‖X_post - X_pre‖²``, a scalar, for the residual of a fitted operator.
        abs_pre, abs_post: per-channel sums of ``|X_pre|`` and ``|X_post|``, ``(D,)``.
        count: number of tokens summed, as a float64 scalar so it all-reduces with the rest.
        extra: optional sums by name. Kind ``rotated_abs`` adds ``rotated_abs_pre`` and
            ``rotated_abs_post``, the per-channel sums of ``|X_pre H|`` and ``|X_post H|`` for an
            orthogonal rotation ``H``, ``(D,)``. Kind ``mlp_output`` adds ``mlp_gram = mᵀ m`` and
            ``mlp_cross = mᵀ (X_post - X_pre)``, ``(D, D)``, where ``m`` is the MLP branch output of
            the last kept layer before the boundary, the term that layer adds to the residual stream.
    """

    XtX: torch.Tensor
    XtDelta: torch.Tensor
    delta_sq: torch.Tensor
    abs_pre: torch.Tensor
    abs_post: torch.Tensor
    count: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def zeros(
        cls, hidden_size: int, device: torch.device | str = "cpu", extras: Collection[str] = ()
    ) -> BoundaryStatistics:
        """Return all-zero sums, with the optional sums of each kind in ``extras`` (see :data:`EXTRA_KINDS`)."""

        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=ACCUMULATION_DTYPE, device=device)

        d = hidden_size
        extra: dict[str, torch.Tensor] = {}
        for kind in check_extra_kinds(extras):
            if kind == ROTATED_ABS:
                extra[ROTATED_ABS_PRE] = z(d)
                extra[ROTATED_ABS_POST] = z(d)
            else:
                extra[MLP_GRAM] = z(d, d)
                extra[MLP_CROSS] = z(d, d)
        return cls(XtX=z(d, d), XtDelta=z(d, d), delta_sq=z(), abs_pre=z(d), abs_post=z(d), count=z(), extra=extra)

    @property
    def hidden_size(self) -> int:
        return self.XtX.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return all sums by name, the optional ones under ``extra/<name>``."""
        named = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        named.update({f"extra/{k}": v for k, v in sorted(self.extra.items())})
        return named

    def has_extra(self, kind: str) -> bool:
        """Return whether the optional sums of ``kind`` (see :data:`EXTRA_KINDS`) are present."""
        return all(name in self.extra for name in EXTRA_NAMES[kind])

    def add(
        self,
        x_pre: torch.Tensor,
        x_post: torch.Tensor,
        *,
        rotation: torch.Tensor | None = None,
        mlp_output: torch.Tensor | None = None,
    ) -> None:
        """Add the tokens of ``x_pre`` and ``x_post``, both ``(N, D)`` with padding already removed.

        ``rotation`` (``(D, D)``, orthogonal) adds to the ``rotated_abs`` sums and ``mlp_output``
        (``(N, D)``, the same tokens) to the ``mlp_output`` sums. Each must be given exactly when
        those sums were created by :meth:`zeros`, so that every batch adds to every sum.
        """
        if x_pre.shape != x_post.shape or x_pre.dim() != 2:
            raise ValueError(f"Expected two (N, D) tensors of one shape, got {tuple(x_pre.shape)} and {tuple(x_post.shape)}.")
        self._check_extra_input(ROTATED_ABS, rotation, "rotation")
        self._check_extra_input(MLP_OUTPUT, mlp_output, "mlp_output")
        x = x_pre.to(ACCUMULATION_DTYPE)
        y = x_post.to(ACCUMULATION_DTYPE)
        delta = y - x
        self.XtX.addmm_(x.T, x)
        self.XtDelta.addmm_(x.T, delta)
        self.delta_sq += delta.square().sum()
        self.abs_pre += x.abs().sum(0)
        self.abs_post += y.abs().sum(0)
        self.count += x.shape[0]
        if rotation is not None:
            rotation = rotation.to(device=x.device, dtype=ACCUMULATION_DTYPE)
            self.extra[ROTATED_ABS_PRE] += (x @ rotation).abs().sum(0)
            self.extra[ROTATED_ABS_POST] += (y @ rotation).abs().sum(0)
        if mlp_output is not None:
            if mlp_output.shape != x_pre.shape:
                raise ValueError(
                    f"Expected the MLP output to have the shape of X_pre {tuple(x_pre.shape)}, got {tuple(mlp_output.shape)}."
                )
            m = mlp_output.to(ACCUMULATION_DTYPE)
            self.extra[MLP_GRAM].addmm_(m.T, m)
            self.extra[MLP_CROSS].addmm_(m.T, delta)

    def _check_extra_input(self, kind: str, value: torch.Tensor | None, argument: str) -> None:
        if self.has_extra(kind) and value is None:
            raise ValueError(f"These statistics include the {kind} sums, so add() needs {argument}.")
        if not self.has_extra(kind) and value is not None:
            raise ValueError(
                f"add() got {argument}, but these statistics have no {kind} sums: create them with "
                f"BoundaryStatistics.zeros(..., extras=[{kind!r}])."
            )

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


def check_extra_kinds(extras: Collection[str]) -> list[str]:
    """Return the requested kinds of optional sums in a fixed order, or raise on an unknown one."""
    for kind in extras:
        if kind not in EXTRA_KINDS:
            raise ValueError(f"Invalid kind of statistics {kind!r}: set one of {', '.join(EXTRA_KINDS)}.")
    return [kind for kind in EXTRA_KINDS if kind in extras]


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
