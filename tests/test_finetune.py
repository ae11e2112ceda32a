"""Fine-tuning after the closed-form initialisation: what trains, the losses, and resuming."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import build_tokenizer, random_text, save_tiny_llama

from ghostpl.cli import build_cli
from ghostpl.finetune import FinetuneSettings, kd_loss, relative_hidden_error
from ghostpl.module import GhostRecoveryModule
from ghostpl.operators import LinearOperator

SEQ_LEN = 32


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    save_tiny_llama(root / "tiny-llama", build_tokenizer())
    (root / "calibration.txt").write_text(random_text(900, seed=3))
    (root / "evaluation.txt").write_text(random_text(300, seed=4))
    return root


@pytest.fixture(autouse=True)
def command_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ghostpl"])


def fit_args(root: Path, *extra: str, run_dir: str = "runs") -> list[str]:
    return [
        "fit",
        "--seed_everything",
        "0",
        "--model.model",
        str(root / "tiny-llama"),
        "--model.criterion",
        "indices",
        "--model.num_layers",
        "null",
        "--model.layers",
        "[2, 3]",
        "--model.progress",
        "false",
        "--data.calibration",
        str(root / "calibration.txt"),
        "--data.evaluation",
        str(root / "evaluation.txt"),
        "--data.seq_len",
        str(SEQ_LEN),
        "--data.num_calibration",
        "8",
        "--data.num_evaluation",
        "4",
        "--data.num_train",
        "4",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir",
        str(root / run_dir),
        *extra,
    ]


def build_without_running(args: list[str]):
    """Build the CLI for ``fit`` arguments without running: run=False takes no subcommand."""
    return build_cli(args=args[1:], run=False)


def run_fit(args: list[str]):
    cli = build_cli(args=args, run=True)
    return cli, Path(cli.trainer.log_dir)


def parameters(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_kd_loss_zero_for_same_model():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100
    assert float(kd_loss(logits, logits.clone(), labels)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(logits, logits.clone(), labels, temperature=2.0, top_k=3)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_positive_for_different_model():
    labels = torch.randint(0, 11, (2, 5))
    assert float(kd_loss(torch.randn(2, 5, 11), torch.randn(2, 5, 11), labels)) > 0.0


def test_kd_loss_ignores_padded_positions():
    student, teacher = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    labels = torch.tensor([[1, 2, -100, -100]])
    changed_teacher = teacher.clone()
    changed_teacher[0, 2:] = torch.randn(2, 7)
    assert float(kd_loss(student, teacher, labels)) == pytest.approx(float(kd_loss(student, changed_teacher, labels)))


def test_relative_hidden_error():
    teacher = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert float(relative_hidden_error(teacher.clone(), teacher, mask)) == 0.0
    assert float(relative_hidden_error(torch.zeros_like(teacher), teacher, mask)) == pytest.approx(1.0)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="trainable"):
        FinetuneSettings(trainable="everything")
    with pytest.raises(ValueError, match="'l1'"):
        FinetuneSettings(losses={"l1": 1.0})
    with pytest.raises(ValueError, match="No positive loss weight"):
        FinetuneSettings(losses={"kd": 0.0})


@pytest.mark.parametrize(
    ("trainable", "expect_operator", "expect_lora"),
    [("ghost", True, False), ("lora", False, True), ("both", True, True)],
)
def test_only_chosen_parameters_change(workspace, trainable, expect_operator, expect_lora):
    args = fit_args(
        workspace,
        "--model.methods",
        "[ghost, lstsq_diag]",
        "--model.finetune.trainable",
        trainable,
        "--model.finetune.learning_rate",
        "0.01",
        "--trainer.max_steps",
        "1",
        "--trainer.limit_val_batches",
        "0",
        run_dir=f"only-{trainable}",
    )
    cli = build_without_running(args)
    trainer, module = cli.trainer, cli.model
    trainer.strategy.connect(module)
    snapshots = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots["before"] = parameters(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots["after"] = parameters(pl_module)

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, datamodule=cli.datamodule)
    moved = changed(snapshots["before"], snapshots["after"])

    operator_moved = {n for n in moved if ".ghost_adapter.operators.ghost." in n}
    other_operator_moved = {n for n in moved if ".ghost_adapter.operators.lstsq_diag." in n}
    lora_moved = {n for n in moved if "lora_" in n}
    assert bool(operator_moved) == expect_operator
    assert not other_operator_moved
    assert bool(lora_moved) == expect_lora
    assert moved == operator_moved | lora_moved


def test_weight_decay_pulls_toward_identity():
    module = GhostRecoveryModule(finetune=FinetuneSettings(weight_decay=0.5, learning_rate=0.1))
    generator = torch.Generator().manual_seed(0)
    module.operator = LinearOperator(8, delta=0.3 * torch.randn(8, 8, generator=generator))
    optimizer = module.configure_optimizers()
    eye = torch.eye(8)
    before = module.operator.matrix().detach().clone()
    for _ in range(5):
        optimizer.zero_grad()
        module.operator.delta.grad = torch.zeros_like(module.operator.delta)
        optimizer.step()
    after = module.operator.matrix().detach()
    assert float((after - eye).norm()) < 0.9 * float((before - eye).norm())
    # Decay toward zero would shrink the diagonal of W too; toward the identity it stays near 1.
    assert float(after.diagonal().mean()) == pytest.approx(float(before.diagonal().mean()), abs=0.1)
    assert float(after.norm()) > 0.9 * float(eye.norm())


def test_fit_logs_training_free_at_step_zero(workspace):
    _, log_dir = run_fit(fit_args(workspace, "--model.finetune.learning_rate", "0.01", run_dir="curve"))
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    ghost = events.Scalars("val/perplexity/ghost")
    steps = [event.step for event in ghost]
    assert steps[0] == 0
    assert len(steps) >= 2
    dense = events.Scalars("val/perplexity/dense")
    assert dense[0].step == 0
    results = json.loads((log_dir / "results.json").read_text())
    table = results["fine_tune"]["perplexity"]
    assert set(table) == {"dense", "pruned", "training_free", "fine_tuned"}
    assert table["training_free"] == pytest.approx(ghost[0].value, rel=1e-6)
    assert results["fine_tune"]["steps"] == 4
    assert 0 < results["fine_tune"]["trainable_parameters"] < results["fine_tune"]["total_parameters"]


def test_fit_saves_trained_operator(workspace):
    from safetensors.torch import load_file

    cli, log_dir = run_fit(fit_args(workspace, "--model.finetune.learning_rate", "0.01", run_dir="saved"))
    saved = load_file(log_dir / "operators.safetensors")["ghost/2-4"]
    trained = cli.model.recovered.adapters["2-4"].operators["ghost"].delta.detach().double()
    closed_form = cli.model.solutions["ghost"]["2-4"].delta
    assert torch.equal(saved, trained)
    assert not torch.allclose(saved, closed_form)


def test_checkpoint_holds_trainable_and_plan(workspace):
    _, log_dir = run_fit(fit_args(workspace, run_dir="checkpoint"))
    checkpoint_path = next((log_dir / "checkpoints").glob("*.ckpt"))
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert keys
    assert all(".ghost_adapter." in key for key in keys)
    assert not any("embed_tokens" in key or "mlp.down_proj.weight" in key for key in keys)
    assert checkpoint["ghostpl_plan"]["removed_layers"] == [2, 3]


class SimulatedKill(RuntimeError):
    pass


class StopAtStep(L.Callback):
    """Raise at the start of a step, as a killed process would stop, after a checkpoint exists."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SimulatedKill(f"stopped at step {self.step}")


def test_resume_matches_uninterrupted(workspace):
    # Two windows make an epoch of two steps, so the checkpoint after step 2 closes an epoch and
    # the resumed run gets the same batches in the same order as the uninterrupted one.
    checkpoint_args = [
        "--data.num_train",
        "2",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_epochs=1",
        "--trainer.callbacks.save_top_k=-1",
        "--model.finetune.learning_rate",
        "0.01",
    ]
    _, full_dir = run_fit(fit_args(workspace, *checkpoint_args, run_dir="full"))
    full = json.loads((full_dir / "results.json").read_text())["fine_tune"]["perplexity"]["fine_tuned"]

    interrupted = build_without_running(fit_args(workspace, *checkpoint_args, run_dir="interrupted"))
    interrupted.trainer.callbacks.append(StopAtStep(3))
    with pytest.raises(SimulatedKill):
        interrupted.trainer.fit(interrupted.model, datamodule=interrupted.datamodule)
    checkpoints = sorted(Path(interrupted.trainer.log_dir, "checkpoints").glob("*step=2*.ckpt"))
    assert checkpoints
    assert not (Path(interrupted.trainer.log_dir) / "results.json").exists()

    resumed_args = fit_args(workspace, *checkpoint_args, "--ckpt_path", str(checkpoints[0]), run_dir="resumed")
    _, resumed_dir = run_fit(resumed_args)
    resumed = json.loads((resumed_dir / "results.json").read_text())["fine_tune"]["perplexity"]["fine_tuned"]
    assert resumed == full


def test_optimizer_and_scheduler_flags(workspace):
    args = fit_args(
        workspace,
        "--optimizer",
        "SGD",
        "--optimizer.lr",
        "0.05",
        "--lr_scheduler",
        "StepLR",
        "--lr_scheduler.step_size",
        "1",
        "--lr_scheduler.gamma",
        "0.5",
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "0",
        run_dir="optimizer",
    )
    cli, _ = run_fit(args)
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    # StepLR halves the rate after each of the two optimizer steps.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)
    trained = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert trained == {id(p) for p in cli.model.parameters() if p.requires_grad}
