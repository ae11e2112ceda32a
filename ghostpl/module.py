"""GhostRecoveryModule: the training-free recovery in ``setup``, perplexity in ``validate``/``test``."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torchmetrics.text import Perplexity

from ghostpl.boundaries import validate_removed_layers
from ghostpl.models import count_decoder_layers, decoder_layers, load_model, parse_dtype
from ghostpl.recovery import (
    DENSE,
    PRUNED,
    RecoveredModel,
    calibrate,
    check_methods,
    choose_layers,
    solve_all,
)
from ghostpl.selection import CRITERIA, Selection, check_block_size

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class GhostRecoveryModule(L.LightningModule):
    """Prune a causal LM and repair it with closed-form operators fitted on calibration text.

    ``setup`` runs the training-free recovery once: it selects the layers to remove, accumulates
    float64 statistics at every boundary in one calibration pass (summed over DDP ranks), solves
    one operator per boundary and method, removes the layers and installs the operators.
    ``validate`` and ``test`` report the held-out perplexity of the dense model, the pruned model
    without repair, and each recovery method.

    Args:
        model: The model to prune: an embedded model name (``smollm2-135m``, ``gemma3-270m``), a
            ``.gguf`` file, a local Hugging Face directory, or a hub id.
        dtype: Dtype the model runs in: float32, bfloat16 or float16. Statistics are always summed
            in float64 and operators are kept in float32.
        criterion: How layers are chosen: ``cosine`` or ``angular`` (most similar contiguous block),
            ``block_influence`` (least influential single layers), or ``indices`` (``layers``).
        num_layers: Number of decoder layers to remove, for every criterion but ``indices``.
        layers: 0-based indices of the layers to remove, for criterion ``indices``.
        methods: Recovery methods to solve and evaluate side by side.
        ridge: Ridge term relative to the mean diagonal of ``XᵀX`` (0 disables it).
        progress: Show progress bars for the calibration passes.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: str = "float32",
        criterion: str = "cosine",
        num_layers: int | None = 6,
        layers: list[int] | None = None,
        methods: list[str] | None = None,
        ridge: float = 1e-4,
        progress: bool = True,
    ):
        super().__init__()
        parse_dtype(dtype)
        if criterion not in CRITERIA:
            raise ValueError(f"Invalid criterion {criterion!r}: set one of {', '.join(CRITERIA)}.")
        if criterion == "indices" and not layers:
            raise ValueError("criterion 'indices' needs layers: set layers to 0-based indices, e.g. [13, 14, 15].")
        if criterion != "indices" and layers:
            raise ValueError(f"layers={layers} is only read with criterion 'indices'; set criterion: indices or drop layers.")
        if criterion != "indices" and (num_layers is None or num_layers < 1):
            raise ValueError(f"Invalid num_layers {num_layers!r}: set the number of layers to remove, at least 1.")
        if ridge < 0:
            raise ValueError(f"Invalid ridge {ridge}: set a non-negative value relative to the mean diagonal of XᵀX.")
        methods = check_methods(list(methods) if methods is not None else ["ghost"])
        self.save_hyperparameters()
        self.methods = methods
        self.model: torch.nn.Module | None = None
        self.recovered: RecoveredModel | None = None
        self.selection: Selection | None = None
        self.solutions: dict[str, dict[str, Any]] = {}
        self.variants = [DENSE, PRUNED, *methods]
        self.perplexity = torch.nn.ModuleDict({v: Perplexity(ignore_index=IGNORE_INDEX) for v in self.variants})
        self.results: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------- setup

    def setup(self, stage: str) -> None:
        if self.recovered is not None:
            return
        if self.model is None:
            self.check_request()
            self.model = load_model(self.hparams.model, self.hparams.dtype)
            self.model.requires_grad_(False)
        device = self.trainer.strategy.root_device
        self.model.to(device)
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "calibration_dataloader"):
            raise ValueError("GhostRecoveryModule needs a datamodule with calibration_dataloader(), such as TextDataModule.")
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        show = self.hparams.progress and self.trainer.is_global_zero

        def batches():
            return datamodule.calibration_dataloader(rank=rank, world_size=world_size)

        self.selection, _ = choose_layers(
            self.model, batches, self.hparams.criterion, self.hparams.num_layers, self.hparams.layers, progress=show
        )
        rank_zero_info(
            f"Selected layers {self.selection.removed} (0-based) of {len(decoder_layers(self.model))} by {self.selection.criterion}."
        )
        self._log_selection_scores()

        recovered = RecoveredModel.build(self.model, self.selection.removed)
        # Statistics come from the dense model, so calibrate before switching layouts for good.
        with recovered.pruner.dense():
            stats = calibrate(self.model, recovered.boundaries, batches, progress=show, methods=self.methods)
        solutions = solve_all(stats, recovered.boundaries, self.methods, self.hparams.ridge)
        for method, by_boundary in solutions.items():
            recovered.add_method(method, by_boundary)
        self.solutions = solutions
        self.recovered = recovered
        self.calibration_tokens = int(stats[0].count)
        self._set_method(self.methods[0])

    def check_request(self) -> None:
        """Raise on a layer request the model cannot satisfy, reading only the model's metadata."""
        if getattr(self, "_request_checked", False):
            return
        num_layers = count_decoder_layers(self.hparams.model)
        if self.hparams.criterion == "indices":
            validate_removed_layers(self.hparams.layers, num_layers)
        else:
            check_block_size(self.hparams.num_layers, num_layers)
        self._request_checked = True

    def _set_method(self, method: str | None) -> None:
        from ghostpl.operators import set_active_method

        set_active_method(self.model, method)

    # ------------------------------------------------------------------------------ evaluation

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _evaluate_batch(self, batch: dict[str, torch.Tensor]) -> None:
        targets = batch["labels"][:, 1:]
        for variant in self.variants:
            with self.recovered.variant(variant):
                logits = self(batch["input_ids"], batch["attention_mask"])
            self.perplexity[variant].update(logits[:, :-1].float(), targets)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate_batch(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate_batch(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def _finish_evaluation(self, prefix: str) -> None:
        perplexities = {}
        evaluated_tokens = 0
        for variant in self.variants:
            metric = self.perplexity[variant]
            evaluated_tokens = int(metric.count)
            value = float(metric.compute())
            perplexities[variant] = value
            self.log(f"{prefix}/perplexity/{variant}", value, sync_dist=False)
            metric.reset()
        if self.trainer.sanity_checking:
            return
        self.results = self._build_results(prefix, perplexities, evaluated_tokens)
        self._report(prefix, perplexities)
        self._write_results()

    # -------------------------------------------------------------------------------- training

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        parameters = [p for p in self.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError("Nothing to train: no parameter requires gradients.")
        return torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0)

    # --------------------------------------------------------------------------------- reports

    def _build_results(self, prefix: str, perplexities: dict[str, float], evaluated_tokens: int) -> dict[str, Any]:
        recovered = self.recovered
        boundaries = []
        hosts = recovered.describe_hosts()
        for boundary in recovered.boundaries:
            boundaries.append(
                {
                    "name": boundary.name,
                    "removed_layers": boundary.removed,
                    "operator_applied_at": hosts[boundary.name],
                    "methods": {
                        method: {
                            "relative_residual": solutions[boundary.name].residual,
                            "solver": solutions[boundary.name].solver,
                            "ridge": solutions[boundary.name].ridge,
                        }
                        for method, solutions in self.solutions.items()
                    },
                }
            )
        fallbacks = sum(s.fallback for by_boundary in self.solutions.values() for s in by_boundary.values())
        datamodule = self.trainer.datamodule
        results = {
            "stage": prefix,
            "model": self.hparams.model,
            "dtype": self.hparams.dtype,
            "num_layers": recovered.pruner.num_layers,
            "num_layers_after": len(recovered.pruner.kept),
            "layer_indexing": "0-based",
            "selection": self.selection.as_dict(),
            "boundaries": boundaries,
            "solver_fallbacks": fallbacks,
            "ridge": self.hparams.ridge,
            "calibration_tokens": self.calibration_tokens,
            "evaluation_tokens": evaluated_tokens,
            "data": getattr(datamodule, "summary", {}),
            "perplexity": perplexities,
            "perplexity_ratio_to_pruned": {
                v: perplexities[v] / perplexities[PRUNED] for v in self.variants if v != PRUNED
            },
        }
        return results

    def _report(self, prefix: str, perplexities: dict[str, float]) -> None:
        width = max(len(v) for v in perplexities)
        lines = [f"Held-out perplexity ({prefix}, {self.results['evaluation_tokens']} tokens):"]
        for variant, value in perplexities.items():
            ratio = value / perplexities[PRUNED]
            lines.append(f"  {variant:<{width}}  {value:10.3f}   {ratio:6.3f} x pruned")
        rank_zero_info("\n".join(lines))

    def results_dir(self) -> Path | None:
        log_dir = self.trainer.log_dir if self.trainer is not None else None
        return Path(log_dir) if log_dir else None

    @rank_zero_only
    def _write_results(self) -> None:
        directory = self.results_dir()
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / "results.json", self.results)
        save_solutions_atomic(directory / "operators.safetensors", self.solutions)
        rank_zero_info(f"Wrote {directory / 'results.json'} and {directory / 'operators.safetensors'}")

    @rank_zero_only
    def _log_selection_scores(self) -> None:
        selection = self.selection
        for label, score in zip(selection.candidates, selection.scores):
            log.info("Selection candidate %s: %s = %.6f", label, selection.criterion, score)
        logger = self.logger
        if not isinstance(logger, TensorBoardLogger) or selection.criterion == "indices":
            return
        from ghostpl.plots import selection_figure

        logger.experiment.add_figure("selection/scores", selection_figure(selection), global_step=0)
        logger.experiment.add_text("selection/removed_layers", str(selection.removed), global_step=0)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(payload, out, indent=2, default=_json_default)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_solutions_atomic(path: Path, solutions: dict[str, dict[str, Any]]) -> None:
    """Save every solved ``M = W - I`` in float64 as ``<method>/<boundary>`` in a safetensors file."""
    from safetensors.torch import save_file

    tensors = {
        f"{method}/{boundary}": solution.delta.detach().to("cpu", torch.float64).contiguous()
        for method, by_boundary in solutions.items()
        for boundary, solution in by_boundary.items()
    }
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={"format": "pt", "layout": "x_new = x (I + M), rows are tokens"})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"Cannot serialise {type(value).__name__} to JSON.")
