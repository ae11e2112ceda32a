"""The training-free recovery pipeline: select layers, calibrate, solve, prune and install.

Each step is a plain function of its inputs; :class:`~ghostpl.module.GhostRecoveryModule` calls
them in order, and scripts can call them without Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ghostpl.baselines import solve_linearpatch_diag, solve_linearpatch_rotate, solve_lstsq_diag, solve_replaceme
from ghostpl.boundaries import Boundary, boundaries_of
from ghostpl.calibration import (
    check_kept_layer_before,
    collect_boundary_statistics,
    collect_similarity_statistics,
    mlp_branch_module,
    stream_input_module,
)
from ghostpl.models import decoder_layers
from ghostpl.operators import (
    ADAPTER_ATTRIBUTE,
    INPUT,
    OUTPUT,
    BoundaryAdapter,
    LinearOperator,
    activate,
    install_adapters,
)
from ghostpl.pruning import LayerPruner
from ghostpl.selection import CRITERIA, Selection, SimilarityStatistics, select_layers
from ghostpl.solvers import Solution, solve_ghost
from ghostpl.statistics import (
    MLP_OUTPUT,
    ROTATED_ABS,
    BoundaryStatistics,
    all_reduce_statistics,
    all_reduce_tensors,
    check_extra_kinds,
)

log = logging.getLogger(__name__)

Batches = Callable[[], Iterable[dict[str, torch.Tensor]]]
Solver = Callable[[BoundaryStatistics, float], Solution]


@dataclass(frozen=True)
class RecoveryMethod:
    """A recovery method: its solver, the optional sums it needs, and where its operator acts.

    Attributes:
        name: the name used in ``methods`` lists, logs and results.
        solve: maps one boundary's statistics and the relative ridge to a :class:`Solution`.
        statistics: kinds of optional sums (:data:`ghostpl.statistics.EXTRA_KINDS`) that the
            calibration pass must collect for this method.
        position: ``"input"`` for an operator on the residual stream entering the first layer after
            the gap, ``"output"`` for one on the MLP branch output of the last kept layer before it.
    """

    name: str
    solve: Solver
    statistics: frozenset[str] = frozenset()
    position: str = INPUT


METHODS: dict[str, RecoveryMethod] = {
    method.name: method
    for method in (
        RecoveryMethod("ghost", solve_ghost),
        RecoveryMethod("linearpatch_diag", solve_linearpatch_diag),
        RecoveryMethod("linearpatch_rotate", solve_linearpatch_rotate, statistics=frozenset({ROTATED_ABS})),
        RecoveryMethod("lstsq_diag", solve_lstsq_diag),
        RecoveryMethod("replaceme", solve_replaceme, statistics=frozenset({MLP_OUTPUT}), position=OUTPUT),
    )
}

# Solvers by method name; each maps one boundary's statistics and the relative ridge to a Solution.
# A solver added here alone is a method on the stream input that needs only the base sums.
SOLVERS: dict[str, Solver] = {name: method.solve for name, method in METHODS.items()}

DENSE = "dense"
PRUNED = "pruned"


def method_spec(name: str) -> RecoveryMethod:
    """Return the :class:`RecoveryMethod` of ``name``, with its solver taken from :data:`SOLVERS`."""
    if name not in SOLVERS:
        raise ValueError(f"Invalid recovery method {name!r}: set one of {', '.join(SOLVERS)}.")
    registered = METHODS.get(name)
    if registered is None:
        return RecoveryMethod(name, SOLVERS[name])
    return replace(registered, solve=SOLVERS[name])


def method_applies(method: str, boundaries: Iterable[Boundary]) -> bool:
    """Check whether ``method`` can repair every boundary. A method on the MLP output needs a kept layer before each."""
    return method_spec(method).position != OUTPUT or all(b.start > 0 for b in boundaries)


def required_statistics(methods: Iterable[str]) -> list[str]:
    """Kinds of optional sums that the calibration pass must collect for ``methods``."""
    kinds: set[str] = set()
    for name in methods:
        kinds |= method_spec(name).statistics
    return check_extra_kinds(kinds)


@dataclass(frozen=True)
class PlanRequest:
    """One way to prune: a criterion with a layer count, or an explicit list of layers.

    Attributes:
        label: name of the plan in metric names and results; empty when a run has a single plan.
        criterion: one of :data:`ghostpl.selection.CRITERIA`.
        num_layers: layers to remove, for every criterion but ``indices``.
        layers: 0-based layer indices, for ``indices``.
    """

    label: str
    criterion: str
    num_layers: int | None = None
    layers: tuple[int, ...] | None = None


def expand_plans(
    criteria: str | list[str], num_layers: int | list[int] | None, layers: list[int] | None
) -> list[PlanRequest]:
    """Expand criteria × layer counts into plans; a single combination gets an empty label."""
    criteria = [criteria] if isinstance(criteria, str) else list(criteria)
    counts = [num_layers] if num_layers is None or isinstance(num_layers, int) else list(num_layers)
    if not criteria:
        raise ValueError(f"No selection criterion given: set criterion to one of {', '.join(CRITERIA)} or a list of them.")
    if not counts:
        raise ValueError("num_layers is an empty list: give the number of layers to remove, e.g. 6 or [4, 6, 8].")
    for criterion in criteria:
        if criterion not in CRITERIA:
            raise ValueError(f"Invalid criterion {criterion!r}: set one of {', '.join(CRITERIA)}.")
    if len(set(criteria)) != len(criteria) or len(set(counts)) != len(counts):
        raise ValueError(f"criterion={criteria} and num_layers={counts} must not repeat an entry.")
    if "indices" in criteria and not layers:
        raise ValueError("criterion 'indices' needs layers: set layers to 0-based indices, e.g. [13, 14, 15].")
    if layers and "indices" not in criteria:
        raise ValueError(f"layers={layers} is only read with criterion 'indices': add indices to criterion or drop layers.")
    plans: list[PlanRequest] = []
    for criterion in criteria:
        if criterion == "indices":
            plans.append(PlanRequest("indices", criterion, layers=tuple(layers)))
            continue
        for count in counts:
            if count is None or isinstance(count, bool) or count < 1:
                raise ValueError(f"Invalid num_layers {count!r}: set the number of layers to remove, at least 1.")
            plans.append(PlanRequest(f"{criterion}-{count}", criterion, num_layers=count))
    if len(plans) == 1:
        plans = [replace(plans[0], label="")]
    return plans


def similarity_statistics(model: nn.Module, batches: Batches, progress: bool = True) -> SimilarityStatistics:
    """Run one selection pass over the dense model and sum the result over every rank."""
    stats = collect_similarity_statistics(model, batches(), progress=progress)
    all_reduce_tensors(stats.tensors())
    return stats


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
    model: nn.Module,
    boundaries: list[Boundary],
    batches: Batches,
    progress: bool = True,
    methods: list[str] | None = None,
    strict: bool = True,
) -> list[BoundaryStatistics]:
    """Collect one pass of boundary statistics, summed over every rank.

    ``methods`` selects the optional sums collected in the same pass; ``None`` collects only the
    base sums, which ghost, linearpatch_diag and lstsq_diag need. Requirements that the model or
    the boundaries cannot meet (a hidden size with no Hadamard matrix, replaceme with a boundary at
    layer 0) raise ``ValueError`` before the pass. With ``strict=False`` a boundary at layer 0 is
    calibrated without the MLP sums instead, for runs that skip replaceme on such plans.
    """
    extras = required_statistics(methods or [])
    if strict:
        for name in methods or []:
            if not method_applies(name, boundaries):
                check_kept_layer_before(boundaries, name)
    stats = collect_boundary_statistics(model, boundaries, batches(), progress=progress, extras=extras)
    all_reduce_statistics(stats)
    return stats


def solve_all(
    stats: list[BoundaryStatistics], boundaries: list[Boundary], methods: list[str], relative_ridge: float
) -> dict[str, dict[str, Solution]]:
    """Solve every method at every boundary: ``{method: {boundary name: Solution}}``."""
    solutions: dict[str, dict[str, Solution]] = {}
    for method in methods:
        spec = method_spec(method)
        if spec.position == OUTPUT:
            check_kept_layer_before(boundaries, method)
        solutions[method] = {}
        for boundary, boundary_stats in zip(boundaries, stats):
            solution = spec.solve(boundary_stats, relative_ridge)
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
    ``adapters`` act on the stream entering each boundary's end. ``output_adapters`` act on the MLP
    branch output of layer ``start - 1``, and they are attached when the first method of that
    position is added.
    """

    model: nn.Module
    pruner: LayerPruner
    boundaries: list[Boundary]
    adapters: dict[str, BoundaryAdapter]
    handles: list = field(default_factory=list)
    output_adapters: dict[str, BoundaryAdapter] = field(default_factory=dict)
    attribute: str = ADAPTER_ATTRIBUTE

    @classmethod
    def build(cls, model: nn.Module, removed: list[int], tag: str = "", prune: bool = True) -> RecoveredModel:
        """Attach empty adapters at each boundary and, with ``prune``, switch to the pruned layout.

        Several plans can share one model when each has its own ``tag`` and all are built with
        ``prune=False`` while the model is dense. Each plan then prunes only inside :meth:`variant`.
        """
        attribute = f"{ADAPTER_ATTRIBUTE}_{tag}" if tag else ADAPTER_ATTRIBUTE
        pruner = LayerPruner(model, removed)
        boundaries = boundaries_of(pruner.removed)
        hosts = {b.name: stream_input_module(model, b.end) for b in boundaries}
        adapters, handles = install_adapters(hosts, attribute=attribute)
        if prune:
            pruner.prune()
        return cls(model, pruner, boundaries, adapters, handles, attribute=attribute)

    def all_adapters(self) -> list[BoundaryAdapter]:
        return [*self.adapters.values(), *self.output_adapters.values()]

    @property
    def methods(self) -> list[str]:
        """Installed methods, those on the stream input first."""
        boundary = self.boundaries[0].name
        methods = list(self.adapters[boundary].operators)
        if boundary in self.output_adapters:
            methods += [m for m in self.output_adapters[boundary].operators if m not in methods]
        return methods

    @property
    def variants(self) -> list[str]:
        return [DENSE, PRUNED, *self.methods]

    def add_method(self, method: str, solutions: dict[str, Solution], dtype: torch.dtype = torch.float32) -> None:
        """Install one operator per boundary for ``method`` from its solutions.

        A method on the MLP output (replaceme) gets its operator on the MLP branch of layer
        ``start - 1``, which must exist, so a boundary at layer 0 raises ``ValueError``.
        """
        adapters = self._output_adapters(method) if method_spec(method).position == OUTPUT else self.adapters
        device = next(self.model.parameters()).device
        for boundary in self.boundaries:
            delta = solutions[boundary.name].delta
            operator = LinearOperator(delta.shape[0], delta, dtype=dtype)
            adapters[boundary.name].operators[method] = operator.to(device)

    def _output_adapters(self, method: str) -> dict[str, BoundaryAdapter]:
        """Return the output adapters, attaching one to each boundary's MLP branch on first use."""
        if not self.output_adapters:
            check_kept_layer_before(self.boundaries, method)
            with self.pruner.dense():
                hosts = {b.name: mlp_branch_module(self.model, b.start - 1) for b in self.boundaries}
            adapters, handles = install_adapters(hosts, position=OUTPUT, attribute=self.attribute)
            active = next(iter(self.adapters.values())).active
            for adapter in adapters.values():
                adapter.active = active
            self.output_adapters.update(adapters)
            self.handles.extend(handles)
        return self.output_adapters

    def describe_hosts(self, method: str | None = None) -> dict[str, str]:
        """Describe where each boundary's operator is applied in the pruned model.

        Without ``method``, or for a method on the stream input, this is the input of the first
        layer after the gap. For a method on the MLP output, it is the MLP branch output of the
        last layer before the gap.
        """
        hosts = {}
        output = method is not None and method_spec(method).position == OUTPUT
        for boundary in self.boundaries:
            if output:
                hosts[boundary.name] = f"MLP branch output of pruned layer {self.pruner.new_index(boundary.start - 1)}"
            elif boundary.end == self.pruner.num_layers:
                hosts[boundary.name] = "input of the final norm"
            else:
                hosts[boundary.name] = f"input of pruned layer {self.pruner.new_index(boundary.end)}"
        return hosts

    @contextmanager
    def variant(self, name: str) -> Iterator[nn.Module]:
        """Run a block with one variant active, restoring the previous layout and method afterwards."""
        adapters = self.all_adapters()
        previous = adapters[0].active
        try:
            if name == DENSE:
                activate(adapters, None)
                with self.pruner.dense():
                    yield self.model
            else:
                activate(adapters, None if name == PRUNED else name)
                with self.pruner.pruned():
                    yield self.model
        finally:
            activate(adapters, previous)
