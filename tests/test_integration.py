"""Runs on the embedded SmolLM2-135M model and checks that tie the README to CI."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
import re
import sys
from pathlib import Path

import pytest

from ghostpl.cli import build_cli

REPO_ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The indented shell commands of the README's quick start that create a virtual environment."""
    text = (REPO_ROOT / "README.md").read_text()
    return [line.strip() for line in text.splitlines() if re.match(r"^    python3 -m venv ", line)]


def test_ci_runs_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2
    test_command = next(c for c in commands if "pytest" in c)
    ci_script = (REPO_ROOT / ".ci" / "run").read_text()
    assert test_command in ci_script.splitlines()


def test_readme_main_command_uses_existing_config():
    main_command = next(c for c in readme_commands() if "ghostpl validate" in c)
    config = re.search(r"--config (\S+)", main_command).group(1)
    assert (REPO_ROOT / config).is_file()


@pytest.mark.integration
def test_smollm2_ghost_repairs_pruned(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ghostpl"])
    monkeypatch.chdir(tmp_path)
    args = [
        "validate",
        "--config",
        str(REPO_ROOT / "configs" / "smollm2-135m" / "ghost.yaml"),
        "--data.num_calibration",
        "4",
        "--data.num_evaluation",
        "2",
        "--model.progress",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    cli = build_cli(args=args, run=True)
    results = json.loads((Path(cli.trainer.log_dir) / "results.json").read_text())
    removed = results["selection"]["removed_layers"]
    perplexity = results["perplexity"]

    assert results["num_layers"] == 30
    assert len(removed) == 6
    assert removed == list(range(removed[0], removed[0] + 6))
    assert perplexity["dense"] < perplexity["pruned"]
    assert perplexity["ghost"] < 0.9 * perplexity["pruned"]
    assert results["solver_fallbacks"] == 0
    assert results["evaluation_tokens"] == 2 * 511
