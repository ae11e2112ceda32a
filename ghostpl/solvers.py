"""Closed-form operators from boundary statistics.

An operator acts on the right, ``x_new = x W``, and is stored as ``M = W - I`` so that an exact
zero is an exact identity. The ghost operator is the ridge-regularised least-squares solution of
``min ‖X_pre (I + M) - X_post‖² + λ‖M‖²``, that is ``(XᵀX + λI) M = Xᵀ(X_post - X_pre)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ghostpl.statistics import ACCUMULATION_DTYPE, BoundaryStatistics

log = logging.getLogger(__name__)


CHOLESKY = "cholesky"
EIGH_PINV = "eigh_pinv"
# Solver name of the operators given by a per-channel formula, with no linear system to factorise.
CLOSED_FORM = "closed_form"
FALLBACK_SOLVERS = frozenset({EIGH_PINV})


@dataclass
class Solution:
    """An operator ``W = I + delta`` with the facts of how it was solved.

    Attributes:
        delta: ``M = W - I``, ``(D, D)`` float64.
        ridge: the absolute ridge term λ that was added to the diagonal (0.0 where none is used).
        solver: ``"cholesky"``, ``"closed_form"`` for per-channel formulas, or ``"eigh_pinv"``, the
            fallback used when the Cholesky factorisation failed.
        residual: ``‖X_pre W - X_post‖² / ‖X_pre - X_post‖²`` on the calibration tokens, so 1.0 is
            the plain pruned model and 0.0 a perfect repair. An operator applied elsewhere than at
            ``X_pre`` reports the residual of the stream it produces at the boundary instead.
        guarded_channels: number of channels with no signal, that is with a zero denominator.
            Their scale is set to 1 instead of being solved. Only the per-channel methods set it.
    """

    delta: torch.Tensor
    ridge: float
    solver: str
    residual: float
    guarded_channels: int = 0

    @property
    def fallback(self) -> bool:
        return self.solver in FALLBACK_SOLVERS


def ridge_term(XtX: torch.Tensor, relative_ridge: float) -> float:
    """Scale the ridge to the data: a fraction of the mean diagonal of ``XᵀX``."""
    if relative_ridge < 0:
        raise ValueError(f"Invalid ridge {relative_ridge}: set a non-negative relative ridge, such as 1e-4.")
    return relative_ridge * float(XtX.diagonal().mean())


def solve_regularized(A: torch.Tensor, B: torch.Tensor, ridge: float) -> tuple[torch.Tensor, str]:
    """Solve ``(A + ridge I) X = B`` for symmetric positive semi-definite ``A`` in float64.

    Cholesky is tried first. If the matrix is not numerically positive definite (a dead channel, too
    few tokens, ridge 0), the minimum-norm least-squares solution from an eigendecomposition is used
    and the returned solver name says so.
    """
    A = A.to(ACCUMULATION_DTYPE)
    B = B.to(ACCUMULATION_DTYPE)
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    regularized = A + ridge * eye
    factor, info = torch.linalg.cholesky_ex(regularized)
    # A singular matrix often factorises with a tiny positive pivot instead of failing, so the
    # pivots' spread is checked too: a squared ratio at machine precision means rank deficiency.
    pivots = factor.diagonal()
    well_conditioned = bool(pivots.min() > 0) and float(pivots.min() / pivots.max()) ** 2 > A.shape[0] * torch.finfo(A.dtype).eps
    if int(info) == 0 and well_conditioned:
        solution = torch.cholesky_solve(B, factor)
        if torch.isfinite(solution).all():
            return solution, CHOLESKY
    log.warning(
        "Cholesky factorisation failed or is near singular (info=%d, ridge=%.3g); using an eigendecomposition pseudo-inverse. "
        "Raise the ridge or use more calibration tokens if the repair is poor.",
        int(info),
        ridge,
    )
    eigenvalues, eigenvectors = torch.linalg.eigh(regularized)
    cutoff = eigenvalues.abs().max() * A.shape[0] * torch.finfo(A.dtype).eps
    inverse = torch.where(eigenvalues.abs() > cutoff, 1.0 / eigenvalues, torch.zeros_like(eigenvalues))
    solution = eigenvectors @ (inverse[:, None] * (eigenvectors.T @ B))
    return solution, EIGH_PINV


def relative_residual(stats: BoundaryStatistics, delta: torch.Tensor) -> float:
    """Return ``‖X_pre (I + M) - X_post‖² / ‖X_pre - X_post‖²`` from the sums alone.

    With ``D = X_post - X_pre``, the residual is ``‖X M - D‖² = ‖D‖² - 2 tr(Mᵀ XᵀD) + tr(Mᵀ XᵀX M)``.
    """
    return correction_residual(stats.XtX, stats.XtDelta, stats.delta_sq, delta)


def correction_residual(gram: torch.Tensor, cross: torch.Tensor, delta_sq: torch.Tensor, delta: torch.Tensor) -> float:
    """Return ``‖A M - D‖² / ‖D‖²`` from ``gram = AᵀA``, ``cross = AᵀD`` and ``delta_sq = ‖D‖²``.

    ``A`` is whatever the correction ``A M`` is computed from: ``X_pre`` for an operator on the
    stream, or the MLP output ``m`` for an operator on that output. A zero ``‖D‖²`` returns 0.0.
    """
    delta = delta.to(ACCUMULATION_DTYPE)
    baseline = float(delta_sq)
    if baseline == 0.0:
        return 0.0
    linear = float((delta * cross).sum())
    quadratic = float((delta * (gram @ delta)).sum())
    return (baseline - 2.0 * linear + quadratic) / baseline


def solve_ghost(stats: BoundaryStatistics, relative_ridge: float = 1e-4) -> Solution:
    """Fit the unconstrained linear operator ``W = I + M`` of one boundary."""
    if float(stats.count) == 0:
        raise ValueError("Cannot solve a boundary with no calibration tokens: check that the calibration windows are not all padding.")
    ridge = ridge_term(stats.XtX, relative_ridge)
    delta, solver = solve_regularized(stats.XtX, stats.XtDelta, ridge)
    return Solution(delta=delta, ridge=ridge, solver=solver, residual=relative_residual(stats, delta))
