"""The training-free recovery pipeline: select layers, calibrate, solve, prune and install.

Each step is a plain function of its inputs; :class:`~ghostpl.module.GhostRecoveryModule` calls
them in order, and scripts can call them without Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ghostpl.boundaries import Boundary, boundaries_of
from ghostpl.calibration import collect_boundary_statistics, collect_similarity_statistics, stream_input_module
from ghostpl.models import decoder_layers
from ghostpl.operators import BoundaryAdapter, LinearOperator, install_adapters, set_active_method
from ghostpl.pruning import LayerPruner
from ghostpl.selection import Selection, SimilarityStatistics, select_layers
from ghostpl.solvers import Solution, solve_ghost
from ghostpl.statistics import BoundaryStatistics, all_reduce_statistics, all_reduce_tensors

log = logging.getLogger(__name__)

Batches = Callable[[], Iterable[dict[str, torch.Tensor]]]

# Solvers by method name; each maps one boundary's statistics and the relative ridge to a Solution.
SOLVERS: dict[str, Callable[[BoundaryStatistics, float], Solution]] = {"ghost": solve_ghost}

DENSE = "dense"
PRUNED = "pruned"


def check_methods(methods: list[str]) -> list[str]:
    if not methods:
        raise ValueError(f"No recovery method given: set methods to a list such as [ghost]. Available: {', '.join(SOLVERS)}.")
    for method in methods:
        if method not in SOLVERS:
            raise ValueError(f"Invalid recovery method {method!r}: set one of {', '.join(SOLVERS)}.")
        if method in (DENSE, PRUNED):
            raise ValueError(f"{method!r} is a reference variant, not a method.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"Recovery methods {methods} repeat a name: list each once.")
    return list(methods)


def choose_layers(
    model: nn.Module,
    batches: Batches,
    criterion: str,
    num_remove: int | None,
    indices: list[int] | None,
    progress: bool = True,
) -> tuple[Selection, SimilarityStatistics | None]:
    """Select the layers to remove; similarity sums are all-reduced so every rank agrees."""
    num_layers = len(decoder_layers(model))
    if criterion == "indices":
        return select_layers(None, criterion, indices=indices, num_layers=num_layers), None
    if num_remove is not None:
        # Check the request before the calibration pass, not after it.
        select_layers(SimilarityStatistics.zeros(num_layers + 1), criterion, num_remove=num_remove)
    stats = collect_similarity_statistics(model, batches(), progress=progress)
    all_reduce_tensors(stats.tensors())
    return select_layers(stats, criterion, num_remove=num_remove), stats


def calibrate(
    model: nn.Module, boundaries: list[Boundary], batches: Batches, progress: bool = True
) -> list[BoundaryStatistics]:
    """One pass of boundary statistics, summed over every rank."""
    stats = collect_boundary_statistics(model, boundaries, batches(), progress=progress)
    all_reduce_statistics(stats)
    return stats


def solve_all(
    stats: list[BoundaryStatistics], boundaries: list[Boundary], methods: list[str], relative_ridge: float
) -> dict[str, dict[str, Solution]]:
    """Solve every method at every boundary: ``{method: {boundary name: Solution}}``."""
    solutions: dict[str, dict[str, Solution]] = {}
    for method in methods:
        solutions[method] = {}
        for boundary, boundary_stats in zip(boundaries, stats):
            solution = SOLVERS[method](boundary_stats, relative_ridge)
            solutions[method][boundary.name] = solution
            log.info(
                "%s at boundary %s: residual %.4f of the pruned model's, solver %s, ridge %.3g",
                method,
                boundary.name,
                solution.residual,
                solution.solver,
                solution.ridge,
            )
    return solutions


@dataclass
class RecoveredModel:
    """A model with layers removed and one adapter per boundary, switchable between variants.

    Variants: ``dense`` (the unpruned model), ``pruned`` (no operator), and one per method.
    """

    model: nn.Module
    pruner: LayerPruner
    boundaries: list[Boundary]
    adapters: dict[str, BoundaryAdapter]
    handles: list = field(default_factory=list)

    @classmethod
    def build(cls, model: nn.Module, removed: list[int]) -> RecoveredModel:
        """Attach empty adapters at each boundary, then switch the model to its pruned layout."""
        pruner = LayerPruner(model, removed)
        boundaries = boundaries_of(pruner.removed)
        hosts = {b.name: stream_input_module(model, b.end) for b in boundaries}
        adapters, handles = install_adapters(hosts)
        pruner.prune()
        return cls(model, pruner, boundaries, adapters, handles)

    @property
    def methods(self) -> list[str]:
        first = next(iter(self.adapters.values()))
        return list(first.operators)

    @property
    def variants(self) -> list[str]:
        return [DENSE, PRUNED, *self.methods]

    def add_method(self, method: str, solutions: dict[str, Solution], dtype: torch.dtype = torch.float32) -> None:
        """Install one operator per boundary for ``method`` from its solutions."""
        for boundary in self.boundaries:
            delta = solutions[boundary.name].delta
            operator = LinearOperator(delta.shape[0], delta, dtype=dtype)
            device = next(self.model.parameters()).device
            self.adapters[boundary.name].operators[method] = operator.to(device)

    def describe_hosts(self) -> dict[str, str]:
        """Where each boundary's operator is applied in the pruned model."""
        hosts = {}
        for boundary in self.boundaries:
            if boundary.end == self.pruner.num_layers:
                hosts[boundary.name] = "input of the final norm"
            else:
                hosts[boundary.name] = f"input of pruned layer {self.pruner.new_index(boundary.end)}"
        return hosts

    @contextmanager
    def variant(self, name: str) -> Iterator[nn.Module]:
        """Run a block with one variant active, restoring the previous state afterwards."""
        previous = next(iter(self.adapters.values())).active
        try:
            if name == DENSE:
                set_active_method(self.model, None)
                with self.pruner.dense():
                    yield self.model
            else:
                set_active_method(self.model, None if name == PRUNED else name)
                yield self.model
        finally:
            set_active_method(self.model, previous)
