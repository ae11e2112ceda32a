"""Figures for TensorBoard and reports, drawn with matplotlib's non-interactive Agg backend."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ghostpl.selection import Selection  # noqa: E402


def selection_figure(selection: Selection) -> Figure:
    """Bar chart of every candidate's selection score, with the chosen candidates highlighted."""
    chosen = set(selection.chosen)
    colors = ["tab:red" if label in chosen else "tab:gray" for label in selection.candidates]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.3 * len(selection.candidates)), 3.5))
    axis.bar(range(len(selection.scores)), selection.scores, color=colors)
    axis.set_xticks(range(len(selection.candidates)), selection.candidates, rotation=90, fontsize=7)
    best = "higher" if selection.higher_is_better else "lower"
    axis.set_ylabel(selection.score_name, fontsize=8)
    axis.set_xlabel("candidate (0-based layers; blocks as start-end, end excluded)")
    axis.set_title(f"{selection.criterion}: removed {selection.removed} ({best} is better, red = chosen)", fontsize=9)
    figure.tight_layout()
    return figure


def perplexity_figure(dense: float, plans: list[dict], variants: list[str]) -> Figure:
    """Grouped bars of held-out perplexity per plan and variant, with the dense model as a line."""
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(plans) * max(1, len(variants)) / 3), 4.0))
    width = 0.8 / len(variants)
    for offset, variant in enumerate(variants):
        values = [plan["perplexity"][variant] or float("nan") for plan in plans]
        positions = [i + (offset - (len(variants) - 1) / 2) * width for i in range(len(plans))]
        axis.bar(positions, values, width=width, label=variant)
    axis.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
    axis.set_xticks(range(len(plans)), [plan["label"] or plan["criterion"] for plan in plans])
    axis.set_ylabel("held-out perplexity (lower is better)")
    axis.legend(fontsize=7, ncols=2)
    figure.tight_layout()
    return figure
