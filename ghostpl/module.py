"""GhostRecoveryModule: the training-free recovery in ``setup``, perplexity in ``validate``/``test``."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torchmetrics import SumMetric
from torchmetrics.text import Perplexity

from ghostpl.boundaries import validate_removed_layers
from ghostpl.calibration import capture_inputs, check_kept_layer_before, stream_input_module
from ghostpl.finetune import (
    FinetuneSettings,
    apply_lora,
    count_parameters,
    kd_loss,
    lm_cross_entropy,
    relative_hidden_error,
    set_lora_enabled,
)
from ghostpl.export import check_export_settings, export_recovered
from ghostpl.models import count_decoder_layers, decoder_layers, load_model, parse_dtype
from ghostpl.recovery import (
    DENSE,
    PRUNED,
    PlanRequest,
    RecoveredModel,
    calibrate,
    check_methods,
    expand_plans,
    method_applies,
    similarity_statistics,
    solve_all,
)
from ghostpl.reports import (
    console_table,
    markdown_table,
    plan_results,
    save_figure_atomic,
    save_operators_atomic,
    write_json_atomic,
    write_text_atomic,
)
from ghostpl.selection import Selection, check_block_size, select_layers
from ghostpl.solvers import Solution

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class Plan:
    """A pruning plan after setup: its selection, its recovered model and its solutions."""

    def __init__(self, request: PlanRequest, selection: Selection, recovered: RecoveredModel):
        self.request = request
        self.selection = selection
        self.recovered = recovered
        self.solutions: dict[str, dict[str, Solution]] = {}
        self.skipped: dict[str, str] = {}

    def applicable(self, methods: list[str]) -> list[str]:
        return [m for m in methods if m not in self.skipped]

    @property
    def label(self) -> str:
        return self.request.label

    def metric_name(self, variant: str) -> str:
        return f"{self.label}/{variant}" if self.label else variant


class GhostRecoveryModule(L.LightningModule):
    """Prune a causal LM and repair it with closed-form operators fitted on calibration text.

    ``setup`` runs the training-free recovery once: it selects the layers to remove, accumulates
    float64 statistics at every boundary in one calibration pass (summed over DDP ranks), solves
    one operator per boundary and method, removes the layers and installs the operators.
    ``validate`` and ``test`` report the held-out perplexity of the dense model, the pruned model
    without repair, and each recovery method.

    Lists of criteria or layer counts compare every combination in one run: the selection pass
    and the boundary calibration pass are shared, and each combination is evaluated on the same
    windows.

    Args:
        model: The model to prune: an embedded model name (``smollm2-135m``, ``gemma3-270m``), a
            ``.gguf`` file, a local Hugging Face directory, or a hub id.
        dtype: Dtype the model runs in: float32, bfloat16 or float16. Statistics are always summed
            in float64 and operators are kept in float32.
        criterion: How layers are chosen, or a list of criteria to compare: ``cosine`` or
            ``angular`` (most similar contiguous block), ``block_influence`` (least influential
            single layers), or ``indices`` (``layers``).
        num_layers: Number of decoder layers to remove, or a list of numbers to compare, for every
            criterion but ``indices``.
        layers: 0-based indices of the layers to remove, for criterion ``indices``.
        methods: Recovery methods to solve and evaluate side by side: ghost, linearpatch_diag,
            linearpatch_rotate, lstsq_diag, replaceme.
        ridge: Ridge term relative to the mean diagonal of ``XᵀX`` (0 disables it).
        progress: Show progress bars for the calibration passes.
        finetune: What ``fit`` trains (operators, LoRA or both) and its loss; see
            :class:`~ghostpl.finetune.FinetuneSettings`. Read only by ``fit``.
        optimizer: Optimizer for ``fit`` as ``class_path``/``init_args``, set with ``--optimizer``;
            without one, AdamW with ``finetune.learning_rate`` and ``finetune.weight_decay``.
        lr_scheduler: Learning-rate scheduler for ``fit``, set with ``--lr_scheduler``; it steps
            after every optimizer step, not every epoch.
        export_dir: Directory to write the pruned model with the first method's repair to, as a
            Hugging Face model directory (see :mod:`ghostpl.export`), at the end of ``validate``,
            ``test`` and ``fit``. Needs a single plan. ``None`` exports nothing.
        export_dtype: Dtype of the exported weights: float32, bfloat16 or float16. Operators are
            exported in float32.
        export_overwrite: Replace an existing ``export_dir``. Without it, an existing directory
            raises ``FileExistsError`` when the module is built.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: str = "float32",
        criterion: str | list[str] = "cosine",
        num_layers: int | list[int] | None = 6,
        layers: list[int] | None = None,
        methods: list[str] | None = None,
        ridge: float = 1e-4,
        progress: bool = True,
        finetune: FinetuneSettings | None = None,
        export_dir: str | None = None,
        export_dtype: str = "float32",
        export_overwrite: bool = False,
        optimizer: dict | None = None,
        lr_scheduler: dict | None = None,
    ):
        super().__init__()
        parse_dtype(dtype)
        if ridge < 0:
            raise ValueError(f"Invalid ridge {ridge}: set a non-negative value relative to the mean diagonal of XᵀX.")
        methods = check_methods(list(methods) if methods is not None else ["ghost"])
        self.plan_requests = expand_plans(criterion, num_layers, layers)
        check_export_settings(export_dir, export_dtype, export_overwrite, len(self.plan_requests))
        self.save_hyperparameters()
        self.methods = methods
        self.model: torch.nn.Module | None = None
        self.plans: list[Plan] = []
        self.metric_names = [DENSE] + [
            f"{request.label}/{variant}" if request.label else variant
            for request in self.plan_requests
            for variant in [PRUNED, *methods]
        ]
        self.perplexity = torch.nn.ModuleDict(
            {_metric_key(name): Perplexity(ignore_index=IGNORE_INDEX) for name in self.metric_names}
        )
        self.evaluated_tokens = SumMetric()
        self.results: dict[str, Any] = {}
        self.finetune = finetune if finetune is not None else FinetuneSettings()
        self.lora_layers: list[torch.nn.Module] = []
        self.reference: dict[str, float] = {}
        # Checkpoints hold only trainable parameters and operators, so loading one is not strict.
        self.strict_loading = False

    @property
    def recovered(self) -> RecoveredModel | None:
        """The recovered model of a single-plan run."""
        return self.plans[0].recovered if len(self.plans) == 1 else None

    @property
    def selection(self) -> Selection | None:
        return self.plans[0].selection if len(self.plans) == 1 else None

    @property
    def solutions(self) -> dict[str, dict[str, Solution]]:
        return self.plans[0].solutions if len(self.plans) == 1 else {}

    # ----------------------------------------------------------------------------------- setup

    def setup(self, stage: str) -> None:
        if stage == "fit" and len(self.plan_requests) > 1:
            raise ValueError(
                f"fit trains one plan, but the config compares {len(self.plan_requests)}: set a single "
                "criterion and num_layers, or run validate to compare."
            )
        if self.plans:
            return
        if self.model is None:
            self.check_request()
            self.model = load_model(self.hparams.model, self.hparams.dtype)
            self.model.requires_grad_(False)
        self.model.to(self.trainer.strategy.root_device)
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "calibration_dataloader"):
            raise ValueError("GhostRecoveryModule needs a datamodule with calibration_dataloader(), such as TextDataModule.")
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        show = self.hparams.progress and self.trainer.is_global_zero

        def batches():
            return datamodule.calibration_dataloader(rank=rank, world_size=world_size)

        num_layers = len(decoder_layers(self.model))
        similarity = None
        if any(request.criterion != "indices" for request in self.plan_requests):
            similarity = similarity_statistics(self.model, batches, progress=show)
        single = len(self.plan_requests) == 1
        plans = []
        for request in self.plan_requests:
            selection = select_layers(
                similarity, request.criterion, request.num_layers, list(request.layers or []), num_layers
            )
            rank_zero_info(
                f"{request.label or 'Plan'}: removing layers {selection.removed} (0-based) of {num_layers} "
                f"chosen by {selection.criterion}."
            )
            recovered = RecoveredModel.build(self.model, selection.removed, tag=_metric_key(request.label), prune=False)
            plans.append(Plan(request, selection, recovered))
        self._log_selection(plans)

        for plan in plans:
            for method in self.methods:
                if not method_applies(method, plan.recovered.boundaries):
                    if single:
                        check_kept_layer_before(plan.recovered.boundaries, method)
                    plan.skipped[method] = "needs a kept layer before the first removed one"
                    rank_zero_warn(f"{plan.label}: {method} skipped, because the plan removes layer 0.")

        # One pass for the boundaries of every plan, taken on the dense model.
        boundaries = sorted({b for plan in plans for b in plan.recovered.boundaries})
        stats = calibrate(self.model, boundaries, batches, progress=show, methods=self.methods, strict=single)
        stats_by_name = {b.name: s for b, s in zip(boundaries, stats)}
        solved: dict[str, dict[str, Solution]] = {}
        for method in self.methods:
            usable = [b for b in boundaries if method_applies(method, [b])]
            by_boundary = solve_all([stats_by_name[b.name] for b in usable], usable, [method], self.hparams.ridge)
            solved[method] = by_boundary[method]
        for plan in plans:
            for method in plan.applicable(self.methods):
                plan.solutions[method] = {b.name: solved[method][b.name] for b in plan.recovered.boundaries}
                plan.recovered.add_method(method, plan.solutions[method])
        self.calibration_tokens = int(stats[0].count)
        self.plans = plans
        if single:
            # A single plan stays pruned, with its first method active, for training and export.
            plans[0].recovered.pruner.prune()
            self.set_method(self.methods[0])
        if stage == "fit":
            self._prepare_training()

    def check_request(self) -> None:
        """Raise on a layer request the model cannot satisfy, reading only the model's metadata."""
        if getattr(self, "_request_checked", False):
            return
        num_layers = count_decoder_layers(self.hparams.model)
        for request in self.plan_requests:
            if request.criterion == "indices":
                validate_removed_layers(list(request.layers), num_layers)
            else:
                check_block_size(request.num_layers, num_layers)
        self._request_checked = True

    def set_method(self, method: str | None) -> None:
        """Activate ``method`` (``None`` for no operator) in a single-plan run."""
        from ghostpl.operators import activate

        activate(self.plans[0].recovered.all_adapters(), method)

    # ------------------------------------------------------------------------------ evaluation

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _skipped_metric_names(self) -> set[str]:
        return {plan.metric_name(method) for plan in self.plans for method in plan.skipped}

    def _evaluate_batch(self, batch: dict[str, torch.Tensor]) -> None:
        targets = batch["labels"][:, 1:]
        self.evaluated_tokens.update((targets != IGNORE_INDEX).sum())
        for name, plan, variant in self._evaluations():
            with self._variant(plan, variant):
                logits = self(batch["input_ids"], batch["attention_mask"])
            self.perplexity[_metric_key(name)].update(logits[:, :-1].float(), targets)

    def _evaluations(self, variants: list[str] | None = None) -> list[tuple[str, Plan, str]]:
        """``(metric name, plan, variant)`` to evaluate: during ``fit`` only the trained variant."""
        if variants is None and self._fitting():
            variants = [self.trained_method]
        evaluations = [(DENSE, self.plans[0], DENSE)]
        for plan in self.plans:
            evaluations += [(plan.metric_name(v), plan, v) for v in [PRUNED, *plan.applicable(self.methods)]]
        if variants is not None:
            evaluations = [e for e in evaluations if e[2] in variants]
        return evaluations

    def _fitting(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == "fit"

    @contextmanager
    def _variant(self, plan: Plan, variant: str):
        """Switch to a variant; LoRA adapters count as part of the recovered model, not the references."""
        lora = self.lora_layers and variant not in (DENSE, PRUNED)
        set_lora_enabled(self.lora_layers, bool(lora))
        try:
            with plan.recovered.variant(variant) as model:
                yield model
        finally:
            set_lora_enabled(self.lora_layers, True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate_batch(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate_batch(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def _finish_evaluation(self, prefix: str) -> None:
        # compute() synchronises the sums across ranks, so every rank logs the global values.
        if self._fitting():
            self._finish_training_evaluation(prefix)
            return
        perplexities: dict[str, float | None] = {}
        for name in self.metric_names:
            metric = self.perplexity[_metric_key(name)]
            if name in self._skipped_metric_names():
                perplexities[name] = None
                continue
            perplexities[name] = float(metric.compute())
            self.log(f"{prefix}/perplexity/{name}", perplexities[name])
            metric.reset()
        evaluated_tokens = int(self.evaluated_tokens.compute())
        self.evaluated_tokens.reset()
        if self.trainer.sanity_checking:
            return
        self.results = self._build_results(prefix, perplexities, evaluated_tokens)
        dense = perplexities[DENSE]
        rank_zero_info(console_table(dense, self.results["plans"], self.methods, evaluated_tokens))
        self._write_results()
        self.export_model()

    # -------------------------------------------------------------------------------- training

    @property
    def trained_method(self) -> str:
        return self.methods[0]

    def _prepare_training(self) -> None:
        """Freeze everything but what ``finetune.trainable`` names, and add LoRA adapters if asked."""
        settings = self.finetune
        self.model.requires_grad_(False)
        # peft marks every parameter but its adapters as frozen, so it runs before operators are unfrozen.
        if settings.uses_lora and not self.lora_layers:
            self.lora_layers = apply_lora(self.model, settings)
        recovered = self.plans[0].recovered
        for adapter in recovered.all_adapters():
            for method, operator in adapter.operators.items():
                operator.requires_grad_(settings.trains_operators and method == self.trained_method)
        trainable, total = count_parameters(self.model)
        parts = {"ghost": f"{self.trained_method} operators", "lora": "LoRA adapters"}
        parts["both"] = f"{parts['ghost']} and {parts['lora']}"
        rank_zero_info(f"Training {trainable:,} of {total:,} parameters ({parts[settings.trainable]}); the rest is frozen.")
        self.trainable_parameters = (trainable, total)
        hosts = {}
        with recovered.pruner.dense():
            for boundary in recovered.boundaries:
                hosts[boundary.name] = stream_input_module(self.model, boundary.end)
        self.boundary_hosts = hosts

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        settings = self.finetune
        weights = {name: w for name, w in settings.losses.items() if w > 0}
        plan = self.plans[0]
        teacher_logits = teacher_states = None
        if "kd" in weights or "mse" in weights:
            with torch.no_grad(), self._variant(plan, DENSE), capture_inputs(self.boundary_hosts) as teacher_states:
                teacher_logits = self(batch["input_ids"], batch["attention_mask"])
        with capture_inputs(self.boundary_hosts) as student_states:
            logits = self(batch["input_ids"], batch["attention_mask"])

        terms = {}
        if "kd" in weights:
            terms["kd"] = kd_loss(logits, teacher_logits, batch["labels"], settings.temperature, settings.top_k)
        if "mse" in weights:
            mask = batch["attention_mask"].bool()
            errors = [relative_hidden_error(student_states[k], teacher_states[k], mask) for k in student_states]
            terms["mse"] = torch.stack(errors).mean()
        if "ce" in weights:
            terms["ce"] = lm_cross_entropy(logits, batch["labels"])
        loss = sum(weights[name] * value for name, value in terms.items())
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        parameters = [p for p in self.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError("Nothing to train: no parameter requires gradients; check finetune.trainable.")
        if self.hparams.get("optimizer"):
            optimizer = instantiate_class(parameters, self.hparams.optimizer)
        else:
            optimizer = torch.optim.AdamW(parameters, lr=self.finetune.learning_rate, weight_decay=self.finetune.weight_decay)
        if not self.hparams.get("lr_scheduler"):
            return optimizer
        scheduler = instantiate_class(optimizer, self.hparams.lr_scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def _evaluate_now(self, variants: list[str]) -> dict[str, float]:
        """Evaluate ``variants`` on the validation windows outside Lightning's loop (all ranks take part)."""
        evaluations = self._evaluations(variants)
        metrics = {name: Perplexity(ignore_index=IGNORE_INDEX).to(self.device) for name, _, _ in evaluations}
        was_training = self.training
        self.eval()
        try:
            for batch in self.trainer.datamodule.val_dataloader():
                batch = {k: v.to(self.device) for k, v in batch.items()}
                for name, plan, variant in evaluations:
                    with self._variant(plan, variant):
                        logits = self(batch["input_ids"], batch["attention_mask"])
                    metrics[name].update(logits[:, :-1].float(), batch["labels"][:, 1:])
        finally:
            self.train(was_training)
        return {name: float(metric.compute()) for name, metric in metrics.items()}

    def on_train_start(self) -> None:
        # The training-free result is step 0 of the same curve that fine-tuned validation continues.
        if self.reference:
            return
        self.reference = self._evaluate_now([DENSE, PRUNED, self.trained_method])
        self.training_free = self.reference.pop(self.trained_method)
        if self.logger is not None:
            metrics = {f"val/perplexity/{name}": value for name, value in self.reference.items()}
            metrics[f"val/perplexity/{self.trained_method}"] = self.training_free
            self.logger.log_metrics(metrics, step=0)
        rank_zero_info(
            f"Before fine-tuning: dense {self.reference[DENSE]:.3f}, pruned {self.reference[PRUNED]:.3f}, "
            f"{self.trained_method} {self.training_free:.3f}"
        )

    def _finish_training_evaluation(self, prefix: str) -> None:
        name = self.trained_method
        metric = self.perplexity[_metric_key(name)]
        value = float(metric.compute())
        metric.reset()
        self.evaluated_tokens.reset()
        if self.trainer.sanity_checking:
            return
        self.log(f"{prefix}/perplexity/{name}", value)
        for reference, reference_value in self.reference.items():
            self.log(f"{prefix}/perplexity/{reference}", reference_value)

    def on_train_end(self) -> None:
        fine_tuned = self._evaluate_now([self.trained_method])[self.trained_method]
        perplexities = {**self.reference, self.trained_method: fine_tuned}
        evaluated = int(self.trainer.datamodule.summary.get("evaluation", {}).get("target_tokens", 0))
        self.results = self._build_results("fit", perplexities, evaluated)
        trainable, total = self.trainable_parameters
        self.results["fine_tune"] = {
            "method": self.trained_method,
            "trainable": self.finetune.trainable,
            "losses": dict(self.finetune.losses),
            "steps": self.global_step,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "perplexity": {
                DENSE: self.reference[DENSE],
                PRUNED: self.reference[PRUNED],
                "training_free": self.training_free,
                "fine_tuned": fine_tuned,
            },
        }
        table = self.results["fine_tune"]["perplexity"]
        rank_zero_info(
            "Held-out perplexity: "
            + ", ".join(f"{name} {value:.3f}" for name, value in table.items())
            + f" after {self.global_step} steps"
        )
        self._write_results()

    def on_fit_end(self) -> None:
        self.export_model()

    @rank_zero_only
    def export_model(self) -> Path | None:
        """Export the single plan with its first method to ``export_dir``; returns the directory, or None without one."""
        if self.hparams.get("export_dir") is None or not self.plans:
            return None
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer_object", None)
        return export_recovered(
            self.model,
            self.recovered,
            self.methods[0],
            self.hparams.export_dir,
            dtype=self.hparams.export_dtype,
            tokenizer=tokenizer,
            card=self.results,
            overwrite=self.hparams.export_overwrite,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep trainable parameters and operators only, with the plan they belong to."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            name: tensor
            for name, tensor in checkpoint["state_dict"].items()
            if name in trainable or ".ghost_adapter" in name
        }
        plan = self.plans[0]
        checkpoint["ghostpl_plan"] = {
            "removed_layers": plan.selection.removed,
            "boundaries": [b.name for b in plan.recovered.boundaries],
            "methods": self.methods,
            "trained_method": self.trained_method,
            "reference_perplexity": self.reference,
            "training_free_perplexity": getattr(self, "training_free", None),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("ghostpl_plan")
        if saved is None or not self.plans:
            return
        removed = self.plans[0].selection.removed
        if saved["removed_layers"] != removed:
            raise ValueError(
                f"The checkpoint was trained with layers {saved['removed_layers']} removed, but this run removes "
                f"{removed}: use the checkpoint's settings (criterion, num_layers, data) to resume."
            )
        if saved.get("reference_perplexity"):
            self.reference = dict(saved["reference_perplexity"])
            self.training_free = saved["training_free_perplexity"]

    # --------------------------------------------------------------------------------- reports

    def _build_results(self, prefix: str, perplexities: dict[str, float], evaluated_tokens: int) -> dict[str, Any]:
        plans = []
        for plan in self.plans:
            variants = {v: perplexities.get(plan.metric_name(v)) for v in [PRUNED, *self.methods]}
            entry = plan_results(plan.label, plan.selection, plan.recovered, plan.solutions, variants)
            entry["skipped_methods"] = dict(plan.skipped)
            plans.append(entry)
        results: dict[str, Any] = {
            "stage": prefix,
            "model": self.hparams.model,
            "dtype": self.hparams.dtype,
            "num_layers": self.plans[0].recovered.pruner.num_layers,
            "layer_indexing": "0-based",
            "methods": self.methods,
            "ridge": self.hparams.ridge,
            "calibration_tokens": self.calibration_tokens,
            "evaluation_tokens": evaluated_tokens,
            "data": getattr(self.trainer.datamodule, "summary", {}),
            "perplexity": perplexities,
            "solver_fallbacks": sum(plan["solver_fallbacks"] for plan in plans),
            "plans": plans,
        }
        if len(plans) == 1:
            # A single plan's fields also sit at the top level, where scripts look for them.
            single = plans[0]
            results["selection"] = single["selection"]
            results["boundaries"] = single["boundaries"]
            results["num_layers_after"] = single["num_layers_after"]
            results["perplexity_ratio_to_pruned"] = {
                v: perplexities[v] / perplexities[PRUNED]
                for v in self.metric_names
                if v != PRUNED and perplexities.get(v) is not None
            }
        return results

    def results_dir(self) -> Path | None:
        """Return the directory that ``Trainer.log_dir`` names, read without a collective call.

        ``Trainer.log_dir`` broadcasts rank zero's path (Lightning 2.6), so calling it from rank zero
        alone, as ``_write_results`` does, hangs or fails under DDP. This reads the value directly.
        """
        from lightning.pytorch.loggers import CSVLogger

        trainer = self._trainer
        if trainer is None:
            return None
        if trainer.loggers:
            logger = trainer.loggers[0]
            log_dir = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
        else:
            log_dir = trainer.default_root_dir
        return Path(log_dir) if log_dir else None

    def operator_tensors(self) -> dict[str, torch.Tensor]:
        """Return every solved ``M`` keyed by ``[<plan>/]<method>/<boundary>``."""
        tensors = {}
        for plan in self.plans:
            prefix = f"{plan.label}/" if plan.label else ""
            for method, by_boundary in plan.solutions.items():
                for boundary, solution in by_boundary.items():
                    tensors[f"{prefix}{method}/{boundary}"] = solution.delta
        if self.results.get("stage") == "fit":
            # After fine-tuning, the trained operators replace their closed-form starting points.
            recovered = self.plans[0].recovered
            for adapters in (recovered.adapters, recovered.output_adapters):
                for name, adapter in adapters.items():
                    if self.trained_method in adapter.operators:
                        tensors[f"{self.trained_method}/{name}"] = adapter.operators[self.trained_method].delta
        return tensors

    @rank_zero_only
    def _write_results(self) -> None:
        from ghostpl.plots import perplexity_figure

        directory = self.results_dir()
        if directory is None:
            return
        dense = self.results["perplexity"][DENSE]
        table = markdown_table(dense, self.results["plans"], self.methods)
        figure = perplexity_figure(dense, self.results["plans"], [PRUNED, *self.methods])
        write_json_atomic(directory / "results.json", self.results)
        write_text_atomic(directory / "results.md", table)
        save_figure_atomic(directory / "perplexity.png", figure)
        save_operators_atomic(directory / "operators.safetensors", self.operator_tensors())
        if isinstance(self.logger, TensorBoardLogger):
            step = self.global_step
            self.logger.experiment.add_text(f"{self.results['stage']}/perplexity_table", table, global_step=step)
            self.logger.experiment.add_figure(f"{self.results['stage']}/perplexity", figure, global_step=step)
        rank_zero_info(f"Wrote results.json, results.md, perplexity.png and operators.safetensors to {directory}")

    @rank_zero_only
    def _log_selection(self, plans: list[Plan]) -> None:
        from ghostpl.plots import selection_figure

        for plan in plans:
            selection = plan.selection
            scores = ", ".join(f"{c}: {v:.4f}" for c, v in zip(selection.candidates, selection.scores))
            log.info("%s scores (%s): %s", selection.criterion, selection.score_name, scores)
            if isinstance(self.logger, TensorBoardLogger) and selection.criterion != "indices":
                tag = f"selection/{plan.label}" if plan.label else "selection"
                self.logger.experiment.add_figure(f"{tag}/scores", selection_figure(selection), global_step=0)
                self.logger.experiment.add_text(f"{tag}/removed_layers", str(selection.removed), global_step=0)


def _metric_key(name: str) -> str:
    """Turn a metric name into a submodule key, because submodule names cannot contain dots or slashes."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name)
