"""Results of a run: the ``results.json`` payload, a Markdown table, and atomic file writes.

Every file is written under a temporary name in its target directory and renamed into place, so a
reader never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ghostpl.recovery import DENSE, PRUNED, RecoveredModel
from ghostpl.selection import Selection
from ghostpl.solvers import Solution


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, lambda temporary: Path(temporary).write_text(text))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON; tensors become lists."""

    def default(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.tolist()
        raise TypeError(f"Cannot serialise {type(value).__name__} to JSON.")

    write_text_atomic(path, json.dumps(payload, indent=2, default=default) + "\n")


def save_operators_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save float64 operator deltas ``M = W - I`` by name in a safetensors file."""
    from safetensors.torch import save_file

    # Plans that share a boundary share its tensors, and safetensors rejects shared storage.
    tensors = {name: t.detach().to("cpu", torch.float64).contiguous().clone() for name, t in tensors.items()}
    metadata = {"format": "pt", "layout": "x_new = x (I + M), rows are tokens"}
    _write_atomic(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def save_figure_atomic(path: Path, figure) -> None:
    _write_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))


def describe_boundaries(recovered: RecoveredModel, solutions: dict[str, dict[str, Solution]]) -> list[dict[str, Any]]:
    """One entry per boundary: removed layers, where each method acts, and how its solve went."""
    entries = []
    for boundary in recovered.boundaries:
        methods = {}
        for method, by_boundary in solutions.items():
            solution = by_boundary[boundary.name]
            methods[method] = {
                "operator_applied_at": recovered.describe_hosts(method)[boundary.name],
                "relative_residual": solution.residual,
                "solver": solution.solver,
                "ridge": solution.ridge,
                "guarded_channels": solution.guarded_channels,
            }
        entries.append({"name": boundary.name, "removed_layers": boundary.removed, "methods": methods})
    return entries


def plan_results(
    label: str,
    selection: Selection,
    recovered: RecoveredModel,
    solutions: dict[str, dict[str, Solution]],
    perplexity: dict[str, float],
) -> dict[str, Any]:
    """Results of one pruning plan; ``perplexity`` maps ``pruned`` and each method to its value."""
    pruned = perplexity[PRUNED]
    ratios = {k: (v / pruned if v is not None else None) for k, v in perplexity.items()}
    return {
        "label": label,
        "criterion": selection.criterion,
        "removed_layers": selection.removed,
        "num_layers_after": len(recovered.pruner.kept),
        "selection": selection.as_dict(),
        "boundaries": describe_boundaries(recovered, solutions),
        "solver_fallbacks": sum(s.fallback for by in solutions.values() for s in by.values()),
        "perplexity": perplexity,
        "perplexity_ratio_to_pruned": ratios,
    }


def markdown_table(dense: float, plans: list[dict[str, Any]], methods: list[str]) -> str:
    """Held-out perplexity with one column per plan; each cell also gives the ratio to pruned."""
    header = "| variant | " + " | ".join(p["label"] or "pruned model" for p in plans) + " |"
    rule = "|---|" + "---:|" * len(plans)
    rows = [header, rule, "| dense | " + " | ".join(f"{dense:.2f}" for _ in plans) + " |"]
    for variant in [PRUNED, *methods]:
        cells = []
        for plan in plans:
            value = plan["perplexity"][variant]
            ratio = plan["perplexity_ratio_to_pruned"][variant]
            if value is None:
                cells.append("n/a")
            else:
                cells.append(f"{value:.2f}" if variant == PRUNED else f"{value:.2f} ({ratio:.3f})")
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    removed = "; ".join(f"{p['label'] or p['criterion']}: {p['removed_layers']}" for p in plans)
    notes = [
        "",
        "Held-out perplexity; in brackets, the ratio to the pruned model without repair. n/a: the",
        "method cannot repair that plan (replaceme needs a kept layer before the first removed one).",
        f"Removed layers (0-based): {removed}.",
    ]
    return "\n".join(rows + notes) + "\n"


def console_table(dense: float, plans: list[dict[str, Any]], methods: list[str], evaluated_tokens: int) -> str:
    lines = [f"Held-out perplexity over {evaluated_tokens} predicted tokens:"]
    lines.append(f"  {DENSE:<32} {dense:10.3f}")
    for plan in plans:
        prefix = f"{plan['label']}/" if plan["label"] else ""
        for variant in [PRUNED, *methods]:
            value = plan["perplexity"][variant]
            ratio = plan["perplexity_ratio_to_pruned"][variant]
            if value is None:
                lines.append(f"  {prefix + variant:<32} {'n/a':>10}")
            else:
                lines.append(f"  {prefix + variant:<32} {value:10.3f}   {ratio:6.3f} x pruned")
    return "\n".join(lines)
