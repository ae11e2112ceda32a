"""End-to-end tests of the ``ghostpl`` command on a tiny Llama model saved in a temporary directory.

The model, its word-level tokenizer and the calibration and evaluation text are all built in the
test process, and the hub and datasets libraries run in offline mode, so no test reads the network.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
import math
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import ghostpl.models
import ghostpl.module
import ghostpl.recovery
from ghostpl.cli import build_cli
from ghostpl.data import TextSourceError
from ghostpl.models import ModelSpecError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))

NUM_LAYERS = 6
NUM_REMOVED = 2
SEQ_LEN = 32
NUM_CALIBRATION = 8
NUM_EVALUATION = 4
SPECIAL_TOKENS = ["[UNK]", "[BOS]", "[EOS]", "[PAD]"]
WORDS = (
    "the quick brown fox jumps over a lazy dog while birds sing in tall trees near the river bank "
    "and children play with a red ball on green grass under bright summer sky"
).split()
HUB_ID = "someone/nonexistent-model"


@dataclass(frozen=True)
class Workspace:
    """Paths of the tiny model directory and the text files that every CLI run reads."""

    root: Path
    model_dir: Path
    calibration: Path
    evaluation: Path


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


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("workspace")
    model_dir = root / "tiny-llama"
    save_tiny_llama(model_dir, build_tokenizer())
    # Each word is one token, so both files contain about 2.4 times the tokens that their windows need.
    calibration = root / "calibration.txt"
    calibration.write_text(random_text(600, seed=1))
    evaluation = root / "evaluation.txt"
    evaluation.write_text(random_text(300, seed=2))
    return Workspace(root, model_dir, calibration, evaluation)


def cli_args(workspace: Workspace, *extra: str, subcommand: str = "validate", model: str | None = None) -> list[str]:
    """Build the arguments of a CPU run without progress bars. ``extra`` comes last, so it overrides them."""
    return [
        subcommand,
        "--seed_everything",
        "0",
        "--model.model",
        model if model is not None else str(workspace.model_dir),
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
        *extra,
    ]


def tensorboard_args(save_dir: Path) -> list[str]:
    return [
        "--trainer.logger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir",
        str(save_dir),
    ]


def quiet_args(root_dir: Path) -> list[str]:
    """Disable the logger. Without one, Lightning writes results.json and config.yaml to default_root_dir."""
    return ["--trainer.logger", "false", "--trainer.default_root_dir", str(root_dir)]


def run_cli(args: list[str]) -> Path:
    """Run the command and return the logger's log directory."""
    cli = build_cli(args=args, run=True)
    return Path(cli.trainer.log_dir)


def read_results(log_dir: Path) -> dict:
    return json.loads((log_dir / "results.json").read_text())


def read_events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def validate_dir(workspace: Workspace) -> Path:
    """Log directory of one cosine-criterion ``validate`` run that removes NUM_REMOVED layers."""
    args = cli_args(workspace, "--model.num_layers", str(NUM_REMOVED), *tensorboard_args(workspace.root / "validate"))
    return run_cli(args)


@pytest.fixture(scope="module")
def stage_test_dir(workspace: Workspace) -> Path:
    """Log directory of the same run as ``validate_dir`` under the ``test`` subcommand."""
    args = cli_args(
        workspace,
        "--model.num_layers",
        str(NUM_REMOVED),
        *tensorboard_args(workspace.root / "test"),
        subcommand="test",
    )
    return run_cli(args)


@pytest.fixture(scope="module", autouse=True)
def command_argv():
    """Replace pytest's arguments in sys.argv, because LightningCLI warns when sys.argv contains any besides args."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["ghostpl"])
        yield


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Keep the hub offline and run from tmp_path, so that relative output paths stay out of the repository."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------------------------ validate


def test_validate_writes_results(validate_dir):
    assert (validate_dir / "results.json").is_file()
    results = read_results(validate_dir)

    assert results["stage"] == "val"
    assert set(results["perplexity"]) == {"dense", "pruned", "ghost"}
    for variant, value in results["perplexity"].items():
        assert math.isfinite(value), f"{variant} perplexity is {value}"
        assert value > 0, f"{variant} perplexity is {value}"


def test_validate_layer_counts(validate_dir):
    results = read_results(validate_dir)

    assert len(results["selection"]["removed_layers"]) == NUM_REMOVED
    assert results["num_layers"] == NUM_LAYERS
    assert results["num_layers_after"] == NUM_LAYERS - NUM_REMOVED


def test_validate_removes_contiguous_block(validate_dir):
    removed = read_results(validate_dir)["selection"]["removed_layers"]
    start = removed[0]

    assert removed == list(range(start, start + NUM_REMOVED))


def test_validate_scores_every_block(validate_dir):
    selection = read_results(validate_dir)["selection"]
    # Labels are start-end with the end excluded, so "4-6" is the block that ends at the last layer.
    expected = [f"{start}-{start + NUM_REMOVED}" for start in range(NUM_LAYERS - NUM_REMOVED + 1)]

    assert list(selection["scores"]) == expected
    assert "0-2" in selection["scores"]
    assert "4-6" in selection["scores"]
    for label, score in selection["scores"].items():
        assert math.isfinite(score), f"score of {label} is {score}"


def test_validate_chosen_block_best(validate_dir):
    selection = read_results(validate_dir)["selection"]
    scores = selection["scores"]
    start = selection["removed_layers"][0]
    chosen = f"{start}-{start + NUM_REMOVED}"

    assert selection["chosen"] == [chosen]
    assert scores[chosen] == max(scores.values())


def test_validate_token_counts(validate_dir):
    results = read_results(validate_dir)

    # The tokenizer adds BOS, so each window contains SEQ_LEN tokens and predicts SEQ_LEN - 1 of them.
    assert results["calibration_tokens"] == NUM_CALIBRATION * SEQ_LEN
    assert results["evaluation_tokens"] == NUM_EVALUATION * (SEQ_LEN - 1)


def test_validate_tensorboard_scalars(validate_dir):
    assert list(validate_dir.glob("events.out.tfevents.*"))
    events = read_events(validate_dir)
    scalars = events.Tags()["scalars"]
    results = read_results(validate_dir)

    for variant in ("dense", "pruned", "ghost"):
        tag = f"val/perplexity/{variant}"
        assert tag in scalars
        logged = events.Scalars(tag)[-1].value
        assert logged == pytest.approx(results["perplexity"][variant], rel=1e-5)


def test_validate_tensorboard_figure(validate_dir):
    events = read_events(validate_dir)

    assert "selection/scores" in events.Tags()["images"]
    assert len(events.Images("selection/scores")) == 1


def test_validate_hparams_yaml(validate_dir, workspace):
    path = validate_dir / "hparams.yaml"
    assert path.is_file()
    hparams = yaml.safe_load(path.read_text())

    assert hparams["num_layers"] == NUM_REMOVED
    assert hparams["model"] == str(workspace.model_dir)
    # The CLI links data.tokenizer to model.model.
    assert hparams["tokenizer"] == str(workspace.model_dir)
    assert hparams["seq_len"] == SEQ_LEN


# ---------------------------------------------------------------------------------------- test


def test_test_stage_results(stage_test_dir):
    results = read_results(stage_test_dir)

    assert results["stage"] == "test"
    assert set(results["perplexity"]) == {"dense", "pruned", "ghost"}


def test_test_stage_scalars(stage_test_dir):
    scalars = read_events(stage_test_dir).Tags()["scalars"]

    assert "test/perplexity/ghost" in scalars
    assert "val/perplexity/ghost" not in scalars


def test_test_matches_validate(stage_test_dir, validate_dir):
    # Both runs read the same windows and seed, so every variant scores the same.
    validated = read_results(validate_dir)
    tested = read_results(stage_test_dir)

    assert tested["selection"]["removed_layers"] == validated["selection"]["removed_layers"]
    for variant, value in validated["perplexity"].items():
        assert tested["perplexity"][variant] == pytest.approx(value, rel=1e-6), variant


# ---------------------------------------------------------------------------------- criteria


def test_indices_criterion(workspace):
    args = cli_args(
        workspace,
        "--model.criterion",
        "indices",
        "--model.layers",
        "[1, 2]",
        *tensorboard_args(workspace.root / "indices"),
    )
    log_dir = run_cli(args)
    results = read_results(log_dir)

    assert results["selection"]["criterion"] == "indices"
    assert results["selection"]["removed_layers"] == [1, 2]
    assert [b["removed_layers"] for b in results["boundaries"]] == [[1, 2]]
    assert results["num_layers_after"] == NUM_LAYERS - 2
    assert math.isfinite(results["perplexity"]["ghost"])


def test_block_influence_criterion(workspace):
    args = cli_args(
        workspace,
        "--model.criterion",
        "block_influence",
        "--model.num_layers",
        str(NUM_REMOVED),
        *tensorboard_args(workspace.root / "block_influence"),
    )
    log_dir = run_cli(args)
    results = read_results(log_dir)
    selection = results["selection"]
    removed = selection["removed_layers"]

    assert selection["criterion"] == "block_influence"
    assert list(selection["scores"]) == [str(i) for i in range(NUM_LAYERS)]
    assert len(removed) == NUM_REMOVED
    assert removed == sorted(removed)
    # block_influence removes the layers with the lowest scores.
    kept_scores = [selection["scores"][str(i)] for i in range(NUM_LAYERS) if i not in removed]
    assert max(selection["scores"][str(i)] for i in removed) <= min(kept_scores)
    # One boundary per run of consecutive removed layers.
    runs = 1 + sum(1 for a, b in zip(removed, removed[1:]) if b != a + 1)
    assert len(results["boundaries"]) == runs
    for variant, value in results["perplexity"].items():
        assert math.isfinite(value), f"{variant} perplexity is {value}"


# ----------------------------------------------------------------------------------- configs


def test_configs_exist():
    assert CONFIGS, f"no YAML config under {REPO_ROOT / 'configs'}"


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(REPO_ROOT)) for p in CONFIGS])
def test_config_instantiates(config, monkeypatch):
    def fail_load(*args, **kwargs):
        raise AssertionError(f"instantiating {config} loaded a model or tokenizer")

    # Instantiation must not load weights or a tokenizer, because setup() loads them.
    monkeypatch.setattr(ghostpl.module, "load_model", fail_load)
    monkeypatch.setattr(ghostpl.models, "load_tokenizer", fail_load)
    # The trainer runs on CPU here, so that configs written for GPUs instantiate on any machine.
    args = ["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    cli = build_cli(args=args, run=False)
    settings = yaml.safe_load(config.read_text())

    for key, value in settings.get("model", {}).items():
        parsed = cli.model.hparams[key]
        if isinstance(value, dict):
            # A nested group lists only the fields it changes; the rest keep their defaults.
            parsed = vars(parsed) if not isinstance(parsed, dict) else parsed
            for field, field_value in value.items():
                assert parsed[field] == field_value, f"model.{key}.{field}"
        else:
            assert parsed == value, f"model.{key}"
    if "optimizer" in settings:
        assert cli.model.hparams["optimizer"]["class_path"] == settings["optimizer"]["class_path"]
    for key, value in settings.get("data", {}).items():
        assert cli.datamodule.hparams[key] == value, f"data.{key}"
    assert cli.datamodule.hparams["tokenizer"] == cli.model.hparams["model"]


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("num_layers", [NUM_LAYERS, NUM_LAYERS + 1])
def test_num_layers_too_many(workspace, tmp_path, monkeypatch, num_layers):
    def fail_calibration(*args, **kwargs):
        raise AssertionError("the similarity pass ran before num_layers was checked")

    monkeypatch.setattr(ghostpl.recovery, "collect_similarity_statistics", fail_calibration)
    args = cli_args(workspace, "--model.num_layers", str(num_layers), *quiet_args(tmp_path))

    with pytest.raises(ValueError) as error:
        build_cli(args=args)
    message = str(error.value)
    assert f"Cannot remove {num_layers} of {NUM_LAYERS}" in message
    assert f"at most {NUM_LAYERS - 1}" in message


def test_index_out_of_range(workspace, tmp_path):
    args = cli_args(workspace, "--model.criterion", "indices", "--model.layers", "[9]", *quiet_args(tmp_path))

    with pytest.raises(ValueError) as error:
        build_cli(args=args)
    message = str(error.value)
    assert "Layer index 9" in message
    assert "out of range" in message
    assert f"0 to {NUM_LAYERS - 1}" in message


def test_index_repeated(workspace, tmp_path):
    args = cli_args(workspace, "--model.criterion", "indices", "--model.layers", "[1, 1]", *quiet_args(tmp_path))

    with pytest.raises(ValueError) as error:
        build_cli(args=args)
    message = str(error.value)
    assert "[1]" in message
    assert "more than once" in message


def test_calibration_too_short(workspace, tmp_path, monkeypatch):
    def fail_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the calibration text was checked")

    monkeypatch.setattr(ghostpl.module, "load_model", fail_load)
    short = tmp_path / "short.txt"
    short.write_text(random_text(SEQ_LEN // 2, seed=3))
    args = cli_args(workspace, "--model.num_layers", "1", "--data.calibration", str(short), *quiet_args(tmp_path))

    with pytest.raises(TextSourceError) as error:
        build_cli(args=args)
    message = str(error.value)
    assert str(short) in message
    assert f"seq_len={SEQ_LEN}" in message
    assert "0 full windows" in message


def test_model_without_layers(workspace, tmp_path):
    # GPT-2 keeps its blocks in transformer.h, not in a ModuleList named layers.
    tokenizer = build_tokenizer()
    model_dir = tmp_path / "tiny-gpt2"
    config = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=2 * SEQ_LEN,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    args = cli_args(workspace, "--model.num_layers", "1", *quiet_args(tmp_path), model=str(model_dir))

    with pytest.raises(ValueError) as error:
        build_cli(args=args)
    message = str(error.value)
    assert "GPT2LMHeadModel" in message
    assert "decoder layers" in message


def test_directory_without_config(workspace, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    args = cli_args(workspace, "--model.num_layers", "1", *quiet_args(tmp_path), model=str(empty))

    with pytest.raises(ModelSpecError) as error:
        build_cli(args=args)
    message = str(error.value)
    assert str(empty) in message
    assert "config.json" in message


def test_hub_id_offline(workspace, tmp_path, monkeypatch):
    def fail_connect(*args, **kwargs):
        raise AssertionError(f"connection attempted to {args[0] if args else kwargs}")

    monkeypatch.setattr(socket, "create_connection", fail_connect)
    args = cli_args(workspace, "--model.num_layers", "1", *quiet_args(tmp_path), model=HUB_ID)

    started = time.monotonic()
    with pytest.raises(ModelSpecError) as error:
        build_cli(args=args)
    elapsed = time.monotonic() - started
    message = str(error.value)
    assert repr(HUB_ID) in message
    assert "huggingface.co cannot be reached" in message
    assert "not in the local cache" in message
    # With HF_HUB_OFFLINE set, ghostpl raises without waiting on a network timeout.
    assert elapsed < 10, f"the offline error took {elapsed:.1f} s"


ALL_METHODS = ["ghost", "linearpatch_diag", "linearpatch_rotate", "lstsq_diag", "replaceme"]


@pytest.fixture(scope="module")
def compare_dir(workspace: Workspace) -> Path:
    """Log directory of one run comparing two criteria at two layer counts with every method."""
    args = cli_args(
        workspace,
        "--model.criterion",
        "[cosine, block_influence]",
        "--model.num_layers",
        "[1, 2]",
        "--model.methods",
        f"[{', '.join(ALL_METHODS)}]",
        *tensorboard_args(workspace.root / "compare"),
    )
    return run_cli(args)


def test_compare_plans(compare_dir):
    results = read_results(compare_dir)
    labels = [plan["label"] for plan in results["plans"]]
    assert labels == ["cosine-1", "cosine-2", "block_influence-1", "block_influence-2"]
    for plan in results["plans"]:
        assert len(plan["removed_layers"]) == int(plan["label"].rsplit("-", 1)[1])
        assert set(plan["perplexity"]) == {"pruned", *ALL_METHODS}
        # replaceme acts on the MLP before the gap, so a plan that removes layer 0 skips it.
        skipped = {"replaceme"} if 0 in plan["removed_layers"] else set()
        assert set(plan["skipped_methods"]) == skipped
        for variant, value in plan["perplexity"].items():
            if variant in skipped:
                assert value is None
            else:
                assert math.isfinite(value), variant
                assert value > 0, variant


def test_compare_flat_perplexity_names(compare_dir):
    perplexity = read_results(compare_dir)["perplexity"]
    assert "dense" in perplexity
    assert "cosine-2/ghost" in perplexity
    assert "block_influence-1/replaceme" in perplexity
    assert len(perplexity) == 1 + 4 * (1 + len(ALL_METHODS))


def test_compare_matches_single_run(compare_dir, workspace):
    """A plan inside a comparison gives the numbers of the same plan run alone."""
    # The tiny model's cosine block starts at layer 0, where a single run rejects replaceme.
    methods = [m for m in ALL_METHODS if m != "replaceme"]
    args = cli_args(
        workspace,
        "--model.num_layers",
        "2",
        "--model.methods",
        f"[{', '.join(methods)}]",
        *tensorboard_args(workspace.root / "single"),
    )
    single = read_results(run_cli(args))
    compared = read_results(compare_dir)
    plan = next(p for p in compared["plans"] if p["label"] == "cosine-2")
    assert plan["removed_layers"] == single["selection"]["removed_layers"]
    assert plan["removed_layers"][0] == 0
    for variant in ["pruned", *methods]:
        assert plan["perplexity"][variant] == pytest.approx(single["perplexity"][variant], rel=1e-5)
    assert compared["perplexity"]["dense"] == pytest.approx(single["perplexity"]["dense"], rel=1e-6)


def test_compare_writes_table_and_chart(compare_dir):
    table = (compare_dir / "results.md").read_text()
    assert "| variant | cosine-1 | cosine-2 | block_influence-1 | block_influence-2 |" in table
    for variant in ["dense", "pruned", *ALL_METHODS]:
        assert f"| {variant} |" in table
    assert (compare_dir / "perplexity.png").read_bytes().startswith(b"\x89PNG")


def test_compare_tensorboard(compare_dir):
    events = read_events(compare_dir)
    assert "val/perplexity/cosine-1/ghost" in events.Tags()["scalars"]
    assert "val/perplexity" in events.Tags()["images"]
    assert "selection/block_influence-2/scores" in events.Tags()["images"]


def test_compare_one_calibration_pass(workspace, monkeypatch):
    """Every plan's statistics come from one boundary pass and one selection pass."""
    from ghostpl import recovery

    calls = {"boundaries": 0, "similarity": 0}
    collect_boundaries = recovery.collect_boundary_statistics
    collect_similarity = recovery.collect_similarity_statistics

    def count_boundaries(*args, **kwargs):
        calls["boundaries"] += 1
        return collect_boundaries(*args, **kwargs)

    def count_similarity(*args, **kwargs):
        calls["similarity"] += 1
        return collect_similarity(*args, **kwargs)

    monkeypatch.setattr(recovery, "collect_boundary_statistics", count_boundaries)
    monkeypatch.setattr(recovery, "collect_similarity_statistics", count_similarity)
    args = cli_args(
        workspace,
        "--model.criterion",
        "[cosine, angular, block_influence]",
        "--model.num_layers",
        "[1, 3]",
        *quiet_args(workspace.root / "count"),
    )
    run_cli(args)
    assert calls == {"boundaries": 1, "similarity": 1}


def test_fit_rejects_comparison(workspace):
    args = cli_args(
        workspace,
        "--model.criterion",
        "[cosine, block_influence]",
        "--model.num_layers",
        "2",
        "--trainer.max_steps",
        "1",
        *quiet_args(workspace.root / "fit"),
        subcommand="fit",
    )
    with pytest.raises(ValueError, match="fit trains one plan"):
        run_cli(args)
