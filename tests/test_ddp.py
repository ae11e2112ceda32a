"""Multi-process calibration: the ``ghostpl`` command on two CPU processes against one process.

Both runs read the same tiny Llama model, tokenizer and text files, built here in a temporary
directory, and run ``python -m ghostpl.cli validate`` in a subprocess with the hub and datasets
libraries offline. The two-process run uses Lightning's ``ddp`` strategy with the gloo backend on
localhost. Each rank calibrates on its own shard of the windows, so the operators, the selected
layers and the perplexities agree with one process only if every statistic is summed across ranks
and no window is counted twice. The window counts are odd, so rank 0 gets one window more than
rank 1 in both calibration and evaluation.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ghostpl.data import TextDataModule

NUM_LAYERS = 6
NUM_REMOVED = 2
SEQ_LEN = 32
NUM_CALIBRATION = 5
NUM_EVALUATION = 5
# ghost needs the base sums, linearpatch_rotate adds the rotated sums and replaceme the MLP output
# sums, so every kind of sum goes through the all-reduce. The seeded model's cosine selection
# removes layers 4 and 5, so replaceme has a kept layer before the gap.
METHODS = ["ghost", "linearpatch_rotate", "replaceme"]
# A run took about 12 s with one process and 30 s with two on 2 busy CPU cores. The limit only
# stops a run whose ranks wait on each other forever.
RUN_TIMEOUT_S = 300
SPECIAL_TOKENS = ["[UNK]", "[BOS]", "[EOS]", "[PAD]"]
WORDS = (
    "the quick brown fox jumps over a lazy dog while birds sing in tall trees near the river bank "
    "and children play with a red ball on green grass under bright summer sky"
).split()
# Launcher variables that would make a run's processes believe they belong to another job.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Workspace:
    root: Path
    model_dir: Path
    calibration: Path
    evaluation: Path


@dataclass(frozen=True)
class Run:
    """One finished ``validate`` run: its output directory, log directory and console output."""

    root: Path
    log_dir: Path
    output: str

    def results(self) -> dict:
        return json.loads((self.log_dir / "results.json").read_text())

    def operators(self) -> dict[str, torch.Tensor]:
        return load_file(self.log_dir / "operators.safetensors")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer over WORDS that puts [BOS] before every text, as Llama's does."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]"
    )


def save_tiny_llama(directory: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tokenizer),
        max_position_embeddings=2 * SEQ_LEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def random_text(num_words: int, seed: int) -> str:
    generator = random.Random(seed)
    return " ".join(generator.choice(WORDS) for _ in range(num_words))


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.norm(value - reference) / torch.linalg.norm(reference))


def subprocess_environment() -> dict[str, str]:
    """Return the test's environment, offline, without launcher variables and with one thread per process.

    With a single intra-op thread, every window's forward pass runs the same float32 arithmetic
    in both runs, so the float64 sums differ only in the order in which the ranks' shares add.
    """
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    environment.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return environment


def run_validate(workspace: Workspace, name: str, *trainer_args: str) -> Run:
    """Run ``python -m ghostpl.cli validate`` in a subprocess from a fresh directory."""
    root = workspace.root / name
    root.mkdir()
    command = [
        sys.executable,
        "-m",
        "ghostpl.cli",
        "validate",
        "--seed_everything",
        "0",
        "--model.model",
        str(workspace.model_dir),
        "--model.criterion",
        "cosine",
        "--model.num_layers",
        str(NUM_REMOVED),
        "--model.methods",
        json.dumps(METHODS),
        "--model.progress",
        "false",
        "--data.calibration",
        str(workspace.calibration),
        "--data.evaluation",
        str(workspace.evaluation),
        "--data.seq_len",
        str(SEQ_LEN),
        "--data.num_calibration",
        str(NUM_CALIBRATION),
        "--data.num_evaluation",
        str(NUM_EVALUATION),
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir",
        str(root),
        *trainer_args,
    ]
    completed = subprocess.run(
        command,
        cwd=root,
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{name} run exited with {completed.returncode}:\n{output[-6000:]}"
    log_dirs = sorted(root.glob("lightning_logs/version_*"))
    assert len(log_dirs) == 1, f"{name} run made log directories {log_dirs}"
    return Run(root, log_dirs[0], output)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("ddp")
    model_dir = root / "tiny-llama"
    save_tiny_llama(model_dir, build_tokenizer())
    # Each word is one token, so each file contains about twice the tokens that its windows need.
    calibration = root / "calibration.txt"
    calibration.write_text(random_text(400, seed=1))
    evaluation = root / "evaluation.txt"
    evaluation.write_text(random_text(300, seed=2))
    return Workspace(root, model_dir, calibration, evaluation)


@pytest.fixture(scope="module")
def single(workspace) -> Run:
    return run_validate(workspace, "single", "--trainer.devices", "1")


@pytest.fixture(scope="module")
def ddp(workspace) -> Run:
    return run_validate(workspace, "ddp", "--trainer.strategy", "ddp", "--trainer.devices", "2")


# ------------------------------------------------------------------------------ two processes


@pytest.mark.ddp
def test_ddp_started_two_ranks(ddp):
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in ddp.output
    assert "distributed_backend=gloo" in ddp.output


@pytest.mark.ddp
def test_ddp_writes_files_once(ddp):
    for name in ("results.json", "operators.safetensors", "config.yaml", "hparams.yaml"):
        paths = sorted(ddp.root.rglob(name))
        assert paths == [ddp.log_dir / name], name
    assert len(list(ddp.log_dir.glob("events.out.tfevents.*"))) == 1


@pytest.mark.ddp
def test_ddp_logs_once(ddp):
    for line in ("INFO ghostpl.data: Calibration:", "Held-out perplexity", "Wrote results.json"):
        assert ddp.output.count(line) == 1, line
    for method in METHODS:
        assert ddp.output.count(f"INFO ghostpl.recovery: {method} at boundary") == 1, method


@pytest.mark.ddp
def test_ddp_counts_every_token_once(ddp, single):
    for run in (ddp, single):
        results = run.results()
        # The tokenizer adds BOS, so each window contains SEQ_LEN tokens and predicts SEQ_LEN - 1 of them.
        assert results["calibration_tokens"] == NUM_CALIBRATION * SEQ_LEN
        assert results["evaluation_tokens"] == NUM_EVALUATION * (SEQ_LEN - 1)


@pytest.mark.ddp
def test_ddp_same_selection(ddp, single):
    reference = single.results()["selection"]
    selection = ddp.results()["selection"]

    assert selection["removed_layers"] == reference["removed_layers"]
    assert list(selection["scores"]) == list(reference["scores"])
    for label, score in reference["scores"].items():
        assert selection["scores"][label] == pytest.approx(score, rel=1e-10, abs=1e-12), label


@pytest.mark.ddp
def test_ddp_same_operators(ddp, single):
    reference = single.operators()
    operators = ddp.operators()

    assert sorted(operators) == sorted(reference)
    assert {key.split("/")[0] for key in reference} == set(METHODS)
    for key, expected in reference.items():
        assert operators[key].dtype == torch.float64, key
        assert torch.linalg.norm(expected) > 0, key
        assert relative_difference(operators[key], expected) < 1e-10, key


@pytest.mark.ddp
def test_ddp_same_perplexity(ddp, single):
    reference = single.results()["perplexity"]
    perplexity = ddp.results()["perplexity"]

    assert sorted(perplexity) == sorted(reference)
    for variant, value in reference.items():
        assert perplexity[variant] == pytest.approx(value, rel=1e-5), variant


# ------------------------------------------------------------------------ windows per rank


@pytest.fixture
def datamodule(tmp_path) -> TextDataModule:
    text = tmp_path / "text.txt"
    text.write_text(random_text(400, seed=3))
    module = TextDataModule(
        calibration=str(text), evaluation=str(text), seq_len=SEQ_LEN, num_calibration=3, num_evaluation=3
    )
    module.set_tokenizer(build_tokenizer())
    module.setup()
    return module


def test_calibration_shards_every_rank(datamodule):
    shards = [list(datamodule.calibration_dataloader(rank, 3)) for rank in range(3)]

    assert [len(shard) for shard in shards] == [1, 1, 1]


@pytest.mark.parametrize("rank", [0, 3])
def test_calibration_too_few_windows(datamodule, rank):
    # Every rank raises, the ones with a window included, so none waits in the all-reduce.
    with pytest.raises(ValueError) as error:
        datamodule.calibration_dataloader(rank, 4)
    message = str(error.value)
    assert "3 calibration windows" in message
    assert "4 processes" in message
    assert "data.num_calibration to at least 4" in message


def test_evaluation_too_few_windows(datamodule, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)

    with pytest.raises(ValueError) as error:
        datamodule.val_dataloader()
    message = str(error.value)
    assert "3 evaluation windows" in message
    assert "data.num_evaluation to at least 4" in message
