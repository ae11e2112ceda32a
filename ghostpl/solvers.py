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


@dataclass
class Solution:
    """An operator ``W = I + delta`` with the facts of how it was solved.

    Attributes:
        delta: ``M = W - I``, ``(D, D)`` float64.
        ridge: the absolute ridge term λ that was added to the diagonal.
        solver: ``"cholesky"``, or the fallback that was used when the factorisation failed.
        residual: ``‖X_pre W - X_post‖² / ‖X_pre - X_post‖²`` on the calibration tokens, so 1.0 is
            the plain pruned model and 0.0 a perfect repair.
    """

    delta: torch.Tensor
    ridge: float
    solver: str
    residual: float

    @property
    def fallback(self) -> bool:
        return self.solver != "cholesky"


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
    if int(info) == 0:
        solution = torch.cholesky_solve(B, factor)
        if torch.isfinite(solution).all():
            return solution, "cholesky"
    log.warning(
        "Cholesky factorisation failed (info=%d, ridge=%.3g); using an eigendecomposition pseudo-inverse. "
        "Raise the ridge or use more calibration tokens if the repair is poor.",
        int(info),
        ridge,
    )
    eigenvalues, eigenvectors = torch.linalg.eigh(regularized)
    cutoff = eigenvalues.abs().max() * A.shape[0] * torch.finfo(A.dtype).eps
    inverse = torch.where(eigenvalues.abs() > cutoff, 1.0 / eigenvalues, torch.zeros_like(eigenvalues))
    solution = eigenvectors @ (inverse[:, None] * (eigenvectors.T @ B))
    return solution, "eigh_pinv"


def relative_residual(stats: BoundaryStatistics, delta: torch.Tensor) -> float:
    """Return ``‖X_pre (I + M) - X_post‖² / ‖X_pre - X_post‖²`` from the sums alone.

    With ``D = X_post - X_pre``, the residual is ``‖X M - D‖² = ‖D‖² - 2 tr(Mᵀ XᵀD) + tr(Mᵀ XᵀX M)``.
    """
    delta = delta.to(ACCUMULATION_DTYPE)
    baseline = float(stats.delta_sq)
    if baseline == 0.0:
        return 0.0
    cross = float((delta * stats.XtDelta).sum())
    quadratic = float((delta * (stats.XtX @ delta)).sum())
    return (baseline - 2.0 * cross + quadratic) / baseline


def solve_ghost(stats: BoundaryStatistics, relative_ridge: float = 1e-4) -> Solution:
    """Fit the unconstrained linear operator ``W = I + M`` of one boundary."""
    if float(stats.count) == 0:
        raise ValueError("Cannot solve a boundary with no calibration tokens: check that the calibration windows are not all padding.")
    ridge = ridge_term(stats.XtX, relative_ridge)
    delta, solver = solve_regularized(stats.XtX, stats.XtDelta, ridge)
    return Solution(delta=delta, ridge=ridge, solver=solver, residual=relative_residual(stats, delta))
