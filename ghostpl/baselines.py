"""Baseline recovery operators, each a closed form of one boundary's statistics.

Every function maps a :class:`~ghostpl.statistics.BoundaryStatistics` and a relative ridge to a
:class:`~ghostpl.solvers.Solution` whose ``delta`` is ``M = W - I`` for an operator ``x ↦ x W``.
Each operator is exactly the identity (``M = 0``) when ``X_post == X_pre``.

* ``linearpatch_diag``: ``W = diag(d)`` with ``d_c = mean |X_post[:, c]| / mean |X_pre[:, c]|``.
* ``linearpatch_rotate``: the same ratio after rotating both streams by a normalised Hadamard
  matrix ``H``, ``W = H diag(d) Hᵀ``.
* ``lstsq_diag``: the per-channel least-squares scale ``d_c = ⟨X_pre[:, c], X_post[:, c]⟩ / ‖X_pre[:, c]‖²``.
* ``replaceme``: ``T = I + M`` applied to the MLP output ``m`` of the last kept layer before the
  gap, fitted by ridge least squares ``min ‖m T + r - X_post‖²``, where ``X_pre = r + m``.

The per-channel methods take no ridge. A channel whose denominator is zero (no signal on any
calibration token) keeps the scale 1, and the solution counts it in ``guarded_channels``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ghostpl.hadamard import hadamard_matrix
from ghostpl.solvers import CLOSED_FORM, Solution, correction_residual, ridge_term, solve_regularized
from ghostpl.statistics import (
    ACCUMULATION_DTYPE,
    MLP_CROSS,
    MLP_GRAM,
    MLP_OUTPUT,
    ROTATED_ABS,
    ROTATED_ABS_POST,
    ROTATED_ABS_PRE,
    BoundaryStatistics,
)

log = logging.getLogger(__name__)


def _check_tokens(stats: BoundaryStatistics) -> None:
    if float(stats.count) == 0:
        raise ValueError("Cannot solve a boundary with no calibration tokens: check that the calibration windows are not all padding.")


def _require_extra(stats: BoundaryStatistics, kind: str, method: str) -> None:
    if not stats.has_extra(kind):
        raise ValueError(
            f"Method {method} needs the {kind} statistics, which this calibration pass did not collect: "
            f"pass methods=[..., {method!r}] to calibrate() or extras=[{kind!r}] to collect_boundary_statistics()."
        )


def guarded_ratio(
    numerator: torch.Tensor, denominator: torch.Tensor, method: str, fill: float = 1.0
) -> tuple[torch.Tensor, int]:
    """Return ``numerator / denominator`` per channel, with ``fill`` where the denominator is zero, and that count."""
    zero = denominator == 0
    safe_denominator = torch.where(zero, torch.ones_like(denominator), denominator)
    ratio = torch.where(zero, torch.full_like(numerator, fill), numerator / safe_denominator)
    guarded = int(zero.sum())
    if guarded:
        log.warning("%s: %d channels had no signal on any calibration token; their scale is set to 1.", method, guarded)
    return ratio, guarded


def _diagonal_solution(stats: BoundaryStatistics, scale: torch.Tensor, guarded: int) -> Solution:
    """Build the ``Solution`` of ``W = diag(scale)``, computing its residual from the diagonals alone."""
    shift = scale.to(ACCUMULATION_DTYPE) - 1.0
    baseline = float(stats.delta_sq)
    if baseline == 0.0:
        residual = 0.0
    else:
        linear = float((shift * stats.XtDelta.diagonal()).sum())
        quadratic = float((shift.square() * stats.XtX.diagonal()).sum())
        residual = (baseline - 2.0 * linear + quadratic) / baseline
    return Solution(delta=torch.diag(shift), ridge=0.0, solver=CLOSED_FORM, residual=residual, guarded_channels=guarded)


def solve_linearpatch_diag(stats: BoundaryStatistics, relative_ridge: float = 0.0) -> Solution:
    """Scale each channel by the ratio of mean absolute values, ``W = diag(Σ|X_post| / Σ|X_pre|)``.

    The ratio of sums equals the ratio of means because both sums run over the same tokens, so
    the result does not depend on how the tokens were split into windows. ``relative_ridge`` is
    accepted for a uniform solver signature and is not used.
    """
    _check_tokens(stats)
    scale, guarded = guarded_ratio(stats.abs_post, stats.abs_pre, "linearpatch_diag")
    return _diagonal_solution(stats, scale, guarded)


def solve_lstsq_diag(stats: BoundaryStatistics, relative_ridge: float = 0.0) -> Solution:
    """Fit one least-squares scale per channel, ``d = 1 + diag(XᵀΔ) / diag(XᵀX)``, with no ridge.

    ``diag(XᵀX)_c = ‖X_pre[:, c]‖²`` and ``diag(XᵀΔ)_c = ⟨X_pre[:, c], X_post[:, c]⟩ - ‖X_pre[:, c]‖²``.
    ``relative_ridge`` is accepted for a uniform solver signature and is not used.
    """
    _check_tokens(stats)
    # A guarded channel gets shift 0, that is scale 1.
    shift, guarded = guarded_ratio(stats.XtDelta.diagonal(), stats.XtX.diagonal(), "lstsq_diag", fill=0.0)
    return _diagonal_solution(stats, 1.0 + shift, guarded)


def solve_linearpatch_rotate(stats: BoundaryStatistics, relative_ridge: float = 0.0) -> Solution:
    """Scale the Hadamard-rotated channels by their ratio of mean absolute values, ``W = H diag(d) Hᵀ``.

    ``d_c = Σ|(X_post H)_c| / Σ|(X_pre H)_c|`` with ``H`` the normalised Hadamard matrix of the
    hidden size, the one the calibration pass rotated by. ``relative_ridge`` is not used.
    """
    _check_tokens(stats)
    _require_extra(stats, ROTATED_ABS, "linearpatch_rotate")
    scale, guarded = guarded_ratio(stats.extra[ROTATED_ABS_POST], stats.extra[ROTATED_ABS_PRE], "linearpatch_rotate")
    rotation = hadamard_matrix(stats.hidden_size).to(stats.XtX.device)
    delta = (rotation * (scale - 1.0)) @ rotation.T  # H diag(d - 1) Hᵀ
    residual = correction_residual(stats.XtX, stats.XtDelta, stats.delta_sq, delta)
    return Solution(delta=delta, ridge=0.0, solver=CLOSED_FORM, residual=residual, guarded_channels=guarded)


def solve_replaceme(stats: BoundaryStatistics, relative_ridge: float = 1e-4) -> Solution:
    """Fit ``T = I + M`` on the MLP output: ``(mᵀm + λI) M = mᵀ(X_post - X_pre)``.

    Applying ``T`` to the MLP output ``m`` of the last kept layer turns the stream into
    ``r + m T = X_pre + m M``, so the fit minimises ``‖m M - (X_post - X_pre)‖² + λ‖M‖²`` with
    ``λ = relative_ridge × mean diag(mᵀm)``. The residual is that of the stream ``X_pre + m M``
    against ``X_post``, computed from the same sums, so it compares directly with ghost's.
    """
    _check_tokens(stats)
    _require_extra(stats, MLP_OUTPUT, "replaceme")
    gram, cross = stats.extra[MLP_GRAM], stats.extra[MLP_CROSS]
    ridge = ridge_term(gram, relative_ridge)
    delta, solver = solve_regularized(gram, cross, ridge)
    residual = correction_residual(gram, cross, stats.delta_sq, delta)
    return Solution(delta=delta, ridge=ridge, solver=solver, residual=residual)


@torch.no_grad()
def fold_replaceme(mlp_down_proj: nn.Linear, T: torch.Tensor) -> nn.Linear:
    """Fold ``y ↦ y T`` into the MLP's down projection in place, and return it.

    ``nn.Linear`` computes ``y = a Wᵀ + b``, so ``y T = a (Tᵀ W)ᵀ + b T``: the new weight is
    ``Tᵀ W`` and the new bias ``b T``. The product is formed in float64 and cast to the layer's
    dtype. ``T`` is the full operator ``I + delta``, ``(D, D)`` with ``D`` the layer's output size.
    This fits MLPs whose down projection output is added to the residual stream as is (Llama,
    Mistral, Qwen2), not Gemma 3, which normalises the MLP output before adding it.
    """
    out_features = mlp_down_proj.out_features
    if T.shape != (out_features, out_features):
        raise ValueError(
            f"Expected T of shape ({out_features}, {out_features}) for a down projection with {out_features} outputs, "
            f"got {tuple(T.shape)}."
        )
    weight = mlp_down_proj.weight
    operator = T.to(device=weight.device, dtype=ACCUMULATION_DTYPE)
    weight.copy_((operator.T @ weight.to(ACCUMULATION_DTYPE)).to(weight.dtype))
    if mlp_down_proj.bias is not None:
        bias = mlp_down_proj.bias
        bias.copy_((bias.to(ACCUMULATION_DTYPE) @ operator).to(bias.dtype))
    return mlp_down_proj
