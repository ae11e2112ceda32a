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
