"""Choose which decoder layers to remove.

Criteria, all on the residual-stream states ``h_0 … h_L`` of the unpruned model (``h_i`` enters
layer ``i``; ``h_L`` enters the final norm), averaged over calibration tokens:

* ``indices``: an explicit list of 0-based layer indices.
* ``cosine``: the contiguous block ``[s, s + n)`` whose input and output are most similar,
  maximising the mean per-token cosine similarity of ``h_s`` and ``h_{s+n}``.
* ``angular``: the same block search minimising the mean angular distance ``arccos(cos) / π``.
* ``block_influence``: the ``n`` layers ``i`` with the least influence
  ``1 - mean cos(h_i, h_{i+1})``, contiguous or not.

Every start is a candidate, layer 0 and blocks that end at the last layer included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ghostpl.boundaries import validate_removed_layers

CRITERIA = ("indices", "cosine", "angular", "block_influence")


@dataclass
class SimilarityStatistics:
    """Float64 sums over tokens of the similarity of every pair of states ``(h_i, h_j)``.

    Attributes:
        cosine: ``(S, S)`` sums of per-token cosine similarity, ``S = L + 1``.
        angular: ``(S, S)`` sums of per-token angular distance ``arccos(cos) / π``.
        count: number of tokens summed.
    """

    cosine: torch.Tensor
    angular: torch.Tensor
    count: torch.Tensor

    @classmethod
    def zeros(cls, num_states: int, device: torch.device | str = "cpu") -> SimilarityStatistics:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        return cls(cosine=z(num_states, num_states), angular=z(num_states, num_states), count=z())

    @property
    def num_layers(self) -> int:
        return self.cosine.shape[0] - 1

    def add(self, states: torch.Tensor) -> None:
        """Add ``states`` of shape ``(S, N, D)``: every residual-stream state of N unpadded tokens."""
        # Normalise in float32 at least: float16 norms of large activations overflow or underflow.
        dtype = torch.promote_types(states.dtype, torch.float32)
        unit = torch.nn.functional.normalize(states.to(dtype), dim=-1)  # (S, N, D)
        cosine = torch.einsum("ind,jnd->ijn", unit, unit).clamp(-1.0, 1.0)  # (S, S, N)
        self.cosine += cosine.sum(-1, dtype=torch.float64)
        self.angular += (torch.arccos(cosine.double()) / math.pi).sum(-1)
        self.count += states.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [self.cosine, self.angular, self.count]

    def mean_cosine(self) -> torch.Tensor:
        return self.cosine / self.count.clamp_min(1)

    def mean_angular(self) -> torch.Tensor:
        return self.angular / self.count.clamp_min(1)


@dataclass
class Selection:
    """The layers a criterion chose, with the score of every candidate.

    Attributes:
        criterion: one of :data:`CRITERIA`.
        removed: sorted 0-based indices of the layers to remove.
        candidates: candidate labels, in order: block starts ``s-e`` or single layers ``i``.
        scores: the criterion's score of each candidate.
        chosen: labels of the chosen candidates.
        score_name: what the score is, for logs and plots.
        higher_is_better: whether the criterion keeps the highest scores.
    """

    criterion: str
    removed: list[int]
    candidates: list[str]
    scores: list[float]
    chosen: list[str]
    score_name: str
    higher_is_better: bool

    def as_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "removed_layers": self.removed,
            "score_name": self.score_name,
            "higher_is_better": self.higher_is_better,
            "scores": dict(zip(self.candidates, self.scores)),
            "chosen": self.chosen,
        }


def check_block_size(num_remove: int, num_layers: int) -> None:
    if not isinstance(num_remove, int) or isinstance(num_remove, bool) or num_remove < 1:
        raise ValueError(f"Invalid number of layers to remove {num_remove!r}: set num_layers to an integer >= 1.")
    if num_remove >= num_layers:
        raise ValueError(
            f"Cannot remove {num_remove} of {num_layers} decoder layers: at least one must remain. "
            f"Set num_layers to at most {num_layers - 1}."
        )


def select_contiguous(stats: SimilarityStatistics, num_remove: int, criterion: str = "cosine") -> Selection:
    """Choose the block of ``num_remove`` layers whose input and output states are most similar."""
    num_layers = stats.num_layers
    check_block_size(num_remove, num_layers)
    starts = list(range(num_layers - num_remove + 1))
    if criterion == "cosine":
        matrix, higher, name = stats.mean_cosine(), True, "mean cosine similarity of block input and output"
    elif criterion == "angular":
        matrix, higher, name = stats.mean_angular(), False, "mean angular distance of block input and output"
    else:
        raise ValueError(f"Invalid contiguous criterion {criterion!r}: set 'cosine' or 'angular'.")
    scores = [float(matrix[s, s + num_remove]) for s in starts]
    best = max(starts, key=lambda s: scores[s]) if higher else min(starts, key=lambda s: scores[s])
    labels = [f"{s}-{s + num_remove}" for s in starts]
    return Selection(
        criterion=criterion,
        removed=list(range(best, best + num_remove)),
        candidates=labels,
        scores=scores,
        chosen=[labels[best]],
        score_name=name,
        higher_is_better=higher,
    )


def select_block_influence(stats: SimilarityStatistics, num_remove: int) -> Selection:
    """Choose the ``num_remove`` individually least influential layers."""
    num_layers = stats.num_layers
    check_block_size(num_remove, num_layers)
    cosine = stats.mean_cosine()
    influence = [1.0 - float(cosine[i, i + 1]) for i in range(num_layers)]
    order = sorted(range(num_layers), key=lambda i: influence[i])
    removed = sorted(order[:num_remove])
    labels = [str(i) for i in range(num_layers)]
    return Selection(
        criterion="block_influence",
        removed=removed,
        candidates=labels,
        scores=influence,
        chosen=[labels[i] for i in removed],
        score_name="block influence 1 - cos(layer input, layer output)",
        higher_is_better=False,
    )


def select_indices(indices: list[int], num_layers: int) -> Selection:
    removed = validate_removed_layers(indices, num_layers)
    return Selection(
        criterion="indices",
        removed=removed,
        candidates=[str(i) for i in removed],
        scores=[1.0] * len(removed),
        chosen=[str(i) for i in removed],
        score_name="listed by the user",
        higher_is_better=True,
    )


def select_layers(
    stats: SimilarityStatistics | None,
    criterion: str,
    num_remove: int | None = None,
    indices: list[int] | None = None,
    num_layers: int | None = None,
) -> Selection:
    """Apply one criterion; ``indices`` needs ``num_layers``, the others need ``stats``."""
    if criterion == "indices":
        if not indices:
            raise ValueError("Criterion 'indices' needs a list of 0-based layer indices: set layers, e.g. [13, 14].")
        if num_layers is None:
            raise ValueError("Criterion 'indices' needs the model's layer count.")
        return select_indices(list(indices), num_layers)
    if criterion not in CRITERIA:
        raise ValueError(f"Invalid selection criterion {criterion!r}: set one of {', '.join(CRITERIA)}.")
    if num_remove is None:
        raise ValueError(f"Criterion {criterion!r} needs the number of layers to remove: set num_layers.")
    if stats is None:
        raise ValueError(f"Criterion {criterion!r} needs similarity statistics from a calibration pass.")
    if criterion == "block_influence":
        return select_block_influence(stats, num_remove)
    return select_contiguous(stats, num_remove, criterion)
