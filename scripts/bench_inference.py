#!/usr/bin/env python
"""Benchmark the inference cost of a pruned model and of each recovery method, side by side in one run.

Variants, each a model with no hook that the variant does not need:

* ``dense``: the unpruned model.
* ``pruned``: a copy with the layers removed by ``prune_model`` and no adapter at all.
* ``ghost``, ``linearpatch_diag``, ``linearpatch_rotate``, ``lstsq_diag``: one ``RecoveredModel``
  copy that carries only the stream-input adapters, with the variant's operator active. Each
  boundary then costs one forward pre-hook and one ``(N, D) x (D, D)`` product plus an add.
* ``replaceme``: a copy whose ReplaceMe operator is folded into the down projection of the last
  kept MLP before each gap, then pruned, so it has no hook and no extra operation.
* ``pruned_with_adapters`` (diagnostic, not in the default list): the ``RecoveredModel`` copy with
  no method active, so each adapter hook runs and returns at once. Compared with ``pruned``, it
  isolates the hook dispatch, and compared with a hooked method, the operator's own work.
* ``pruned_second_copy`` (control, not in the default list): a second ``prune_model`` copy, the
  same computation as ``pruned`` on weights at other addresses. Its ratio to ``pruned`` shows how
  far two copies of one model differ on this machine, the floor below which a ratio means nothing.

Measurements, with the variants interleaved in every round (the order reverses in odd rounds so that
a drift of the machine's speed spreads over all variants) and untimed warm-up runs first:

* ``prefill``: one forward over ``--prefill-batch`` prompts of ``--prefill-tokens`` tokens, with
  ``use_cache=False`` unless ``--prefill-use-cache`` is given, and LM-head logits for the last
  position only unless ``--prefill-logits all`` is given. Reported as seconds and tokens per second.
* ``generation``: ``generate()`` with the KV cache, greedy, from one prompt of ``--prompt-tokens``
  tokens, with ``min_new_tokens = max_new_tokens = --new-tokens`` so that every variant generates
  the same count. Right before each ``generate()`` call, one cached forward over the same prompt
  is timed. The first new token comes out of that prefill step, so the decode time per token is
  ``(generate - prompt prefill) / (new tokens - 1)``. The total per token,
  ``generate / new tokens``, is reported as well.

Every figure is given as all samples, their median and minimum, and as ratios to ``pruned``: the
ratio of medians and the median of the per-round ratios. The script also times one operator alone
against a bare matrix product, and checks after the timing that every variant's logits are those
its name promises.

Example, the defaults on the embedded SmolLM2-135M model::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/bench_inference.py

On a machine that other jobs share, ``--threads 1`` gives steadier ratios. With 2 threads on 2
shared cores, one run measured from 96 to 2756 ms per decoded token, against 47 to 83 ms with one
thread at a similar load.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The GGUF loader of transformers draws a tqdm progress bar that transformers' own switch does not turn off.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from torch import nn

from ghostpl.baselines import fold_replaceme
from ghostpl.boundaries import Boundary, boundaries_of, validate_removed_layers
from ghostpl.calibration import check_kept_layer_before
from ghostpl.data import (
    build_token_stream,
    collate_windows,
    load_documents,
    select_calibration_windows,
    select_evaluation_windows,
    window_layout,
)
from ghostpl.models import (
    DTYPES,
    ModelSpecError,
    count_decoder_layers,
    decoder_layers,
    load_model,
    load_tokenizer,
    text_config,
)
from ghostpl.operators import iter_adapters
from ghostpl.pruning import prune_model
from ghostpl.recovery import DENSE, PRUNED, RecoveredModel, calibrate, solve_all
from ghostpl.solvers import Solution

Batch = dict[str, torch.Tensor]

log = logging.getLogger("bench_inference")

REPLACEME = "replaceme"
# Methods whose operator acts on the stream entering the first layer after a gap, through a hook.
HOOKED_METHODS = ("ghost", "linearpatch_diag", "linearpatch_rotate", "lstsq_diag")
PRUNED_WITH_ADAPTERS = "pruned_with_adapters"
PRUNED_SECOND_COPY = "pruned_second_copy"
DEFAULT_VARIANTS = (DENSE, PRUNED, *HOOKED_METHODS, REPLACEME)
VARIANTS = (*DEFAULT_VARIANTS, PRUNED_WITH_ADAPTERS, PRUNED_SECOND_COPY)
PREFILL_LOGITS = ("last", "all")


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def parse_layers(text: str) -> list[int]:
    """Parse 0-based layer indices such as ``13..18`` (inclusive) or ``3,5,13..18``."""
    indices: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if ".." in part:
                first, last = (int(value) for value in part.split("..", 1))
                if last < first:
                    raise argparse.ArgumentTypeError(f"Invalid layer range {part!r}: the end is below the start.")
                indices.extend(range(first, last + 1))
            else:
                indices.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"Invalid layer list {text!r}: give 0-based indices and inclusive ranges, such as 13..18 or 3,5,13..18."
            ) from None
    return indices


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"Invalid value {value}: set an integer of at least 1.")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"Invalid value {value}: set an integer of at least 0.")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"Invalid value {text!r}: set a number of at least 0.")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Time prefill and per-token generation of the dense model, the plain pruned model and every "
            "recovery method side by side, and write the results as JSON."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2-135m", help="model spec, as ghostpl.models.load_model takes it")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the model weights")
    parser.add_argument(
        "--layers",
        type=parse_layers,
        default="13..18",
        help="0-based decoder layers to remove, as inclusive ranges and commas (13..18 or 3,5,13..18)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(DEFAULT_VARIANTS),
        help=f"variants to time. pruned is always timed, because every ratio is taken to it. "
        f"{PRUNED_WITH_ADAPTERS} is a diagnostic: the adapter hooks installed, no operator active. "
        f"{PRUNED_SECOND_COPY} is a control: a second copy of the pruned model",
    )

    parser.add_argument("--source", default="sotu", help="text source, as ghostpl.data.load_documents takes it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice of calibration windows")
    parser.add_argument(
        "--calibration-windows", type=positive_int, default=4, help="calibration windows drawn from the calibration split"
    )
    parser.add_argument("--calibration-seq-len", type=positive_int, default=512, help="tokens per calibration window")
    parser.add_argument(
        "--ridge",
        type=non_negative_float,
        default=1e-4,
        help="ridge term relative to the mean diagonal of XᵀX, the default of GhostRecoveryModule. It changes the "
        "operators' values, not their cost",
    )

    parser.add_argument("--prefill-batch", type=positive_int, default=1, help="prompts in each timed prefill forward")
    parser.add_argument("--prefill-tokens", type=positive_int, default=512, help="tokens per prompt in the prefill forward")
    parser.add_argument(
        "--prefill-logits",
        choices=PREFILL_LOGITS,
        default="last",
        help="positions that get LM-head logits in the prefill forward: the last one, as generate() computes, or all",
    )
    parser.add_argument(
        "--prefill-use-cache",
        action="store_true",
        help="fill a KV cache in the prefill forward (use_cache=True); without it the forward runs with use_cache=False",
    )

    parser.add_argument("--prompt-tokens", type=positive_int, default=32, help="tokens of the prompt that generate() extends")
    parser.add_argument(
        "--new-tokens",
        type=positive_int,
        default=64,
        help="tokens that every generate() call produces (min_new_tokens = max_new_tokens); at least 2",
    )

    parser.add_argument("--repeats", type=positive_int, default=7, help="timed rounds; each round times every variant once")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs of each variant before the rounds")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=len(os.sched_getaffinity(0)),
        help="torch intra-op threads (torch.set_num_threads); the default is every CPU this process may use",
    )

    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bench_inference.json"),
        help="JSON result file, written to a temporary file in the same folder and then renamed",
    )
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Reject settings the run cannot satisfy before the model loads, and return the variants in timing order."""
    if len(set(args.layers)) != len(args.layers):
        parser.error(f"Invalid --layers: {args.layers} lists a layer more than once. List each layer once.")
    if args.new_tokens < 2:
        parser.error(
            f"Invalid --new-tokens {args.new_tokens}: set at least 2, because the first new token comes from the prefill step."
        )
    try:
        num_layers = count_decoder_layers(args.model)
    except ModelSpecError as error:
        parser.error(f"Invalid --model: {error}")
    try:
        validate_removed_layers(args.layers, num_layers)
    except ValueError as error:
        parser.error(f"Invalid --layers: {error}")
    variants = [variant for variant in VARIANTS if variant in args.variants or variant == PRUNED]
    if REPLACEME in variants:
        try:
            check_kept_layer_before(boundaries_of(args.layers), REPLACEME)
        except ValueError as error:
            parser.error(f"{error} Or leave {REPLACEME} out of --variants.")
    return variants


# --------------------------------------------------------------------------------------------------
# Token data
# --------------------------------------------------------------------------------------------------


def build_inputs(args: argparse.Namespace, tokenizer) -> tuple[Batch, Batch, Batch]:
    """Return the calibration batch, the prefill batch and the generation prompt.

    Calibration windows are drawn at random from the calibration split of ``--source``. The prefill
    prompts and the generation prompt are full windows of its evaluation split, so none is padded.
    """
    calibration_stream = build_token_stream(load_documents(args.source, "calibration"), tokenizer)
    calibration, _ = select_calibration_windows(
        calibration_stream,
        window_layout(tokenizer, args.calibration_seq_len),
        args.calibration_windows,
        args.seed,
        args.source,
    )
    evaluation_stream = build_token_stream(load_documents(args.source, "evaluation"), tokenizer)
    prefill = select_evaluation_windows(
        evaluation_stream, window_layout(tokenizer, args.prefill_tokens), args.prefill_batch, args.source
    )
    prompt = select_evaluation_windows(evaluation_stream, window_layout(tokenizer, args.prompt_tokens), 1, args.source)

    def inputs_of(windows) -> Batch:
        batch = collate_windows(windows)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    return inputs_of(calibration), inputs_of(prefill), inputs_of(prompt)


# --------------------------------------------------------------------------------------------------
# Variant models
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def fold_replaceme_into_model(model: nn.Module, boundaries: Sequence[Boundary], solutions: dict[str, Solution]) -> nn.Module:
    """Fold each boundary's ReplaceMe operator into the down projection of layer ``start - 1``, in place.

    ``model`` must still have its dense layout, because boundaries use dense layer indices. After
    this, ``prune_model`` gives the shipped ReplaceMe model: no hook and no extra operation. Gemma 3
    normalises the MLP output (``post_feedforward_layernorm``) before adding it to the stream, so
    its operator cannot be folded into a linear layer, and this raises ``ValueError``.

    NOTE: only the Llama layout of SmolLM2 has run through this. The Gemma 3 branch has not run.
    """
    layers = decoder_layers(model)
    check_kept_layer_before(boundaries, REPLACEME)
    for boundary in boundaries:
        layer = layers[boundary.start - 1]
        if isinstance(getattr(layer, "post_feedforward_layernorm", None), nn.Module):
            raise ValueError(
                f"Cannot fold {REPLACEME} into layer {boundary.start - 1} ({type(layer).__name__}): a norm follows its "
                "MLP, so the operator does not act on the down projection's output. Leave replaceme out of --variants."
            )
        down_proj = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if not isinstance(down_proj, nn.Linear):
            raise ValueError(
                f"Cannot fold {REPLACEME} into layer {boundary.start - 1} ({type(layer).__name__}): expected an "
                "nn.Linear at mlp.down_proj. Leave replaceme out of --variants."
            )
        delta = solutions[boundary.name].delta
        operator = torch.eye(delta.shape[0], dtype=delta.dtype, device=delta.device) + delta
        fold_replaceme(down_proj, operator)
    return model


class VariantModels:
    """The models behind the variants, and a context manager that yields the model of one variant.

    ``dense``, ``pruned``, ``pruned_second_copy`` and ``replaceme`` are separate models with no
    adapter. The hooked methods and ``pruned_with_adapters`` share one ``RecoveredModel`` and switch
    between its operators.
    """

    def __init__(
        self,
        dense: nn.Module,
        pruned: nn.Module,
        recovered: RecoveredModel,
        folded: nn.Module | None,
        pruned_copy: nn.Module | None,
    ):
        self.dense = dense
        self.pruned = pruned
        self.recovered = recovered
        self.folded = folded
        self.pruned_copy = pruned_copy

    @contextmanager
    def variant(self, name: str):
        if name == DENSE:
            yield self.dense
        elif name == PRUNED:
            yield self.pruned
        elif name == REPLACEME:
            if self.folded is None:
                raise ValueError(f"No folded {REPLACEME} model was built: add {REPLACEME} to --variants.")
            yield self.folded
        elif name == PRUNED_SECOND_COPY:
            if self.pruned_copy is None:
                raise ValueError(f"No second pruned copy was built: add {PRUNED_SECOND_COPY} to --variants.")
            yield self.pruned_copy
        else:
            with self.recovered.variant(PRUNED if name == PRUNED_WITH_ADAPTERS else name) as model:
                yield model


def count_hooks(model: nn.Module) -> int:
    """Count the forward hooks and forward pre-hooks registered on any module of ``model``."""
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def build_variant_models(
    dense: nn.Module, removed: list[int], calibration: Batch, ridge: float, variants: Sequence[str]
) -> tuple[VariantModels, dict[str, dict[str, Solution]], dict]:
    """Calibrate every requested method on ``dense``, then build the pruned, recovered and folded copies.

    ``dense`` keeps its weights and gets no hook. Returns the models, the solutions by method and
    boundary, and a record of the calibration.
    """
    methods = [method for method in (*HOOKED_METHODS, REPLACEME) if method in variants]
    # pruned_with_adapters needs the recovered model, which needs one installed method to switch between.
    hooked = [method for method in HOOKED_METHODS if method in methods] or (
        ["ghost"] if PRUNED_WITH_ADAPTERS in variants else []
    )
    solved = list(dict.fromkeys([*hooked, *methods]))
    boundaries = boundaries_of(removed)

    log.info("Calibrating %s on %d tokens.", ", ".join(solved), int(calibration["attention_mask"].sum()))
    start = time.perf_counter()
    stats = calibrate(dense, boundaries, lambda: [calibration], progress=False, methods=solved)
    solutions = solve_all(stats, boundaries, solved, ridge)
    calibration_s = time.perf_counter() - start

    pruned = prune_model(copy.deepcopy(dense), removed)
    recovered = RecoveredModel.build(copy.deepcopy(dense), removed)
    for method in hooked:
        recovered.add_method(method, solutions[method])
    folded = None
    if REPLACEME in methods:
        folded = prune_model(fold_replaceme_into_model(copy.deepcopy(dense), boundaries, solutions[REPLACEME]), removed)
    pruned_copy = prune_model(copy.deepcopy(dense), removed) if PRUNED_SECOND_COPY in variants else None

    record = {
        "tokens": int(stats[0].count),
        "seconds": calibration_s,
        "methods": solved,
        "residuals": {
            method: {name: solution.residual for name, solution in by_boundary.items()}
            for method, by_boundary in solutions.items()
        },
        "hooks": {
            DENSE: count_hooks(dense),
            PRUNED: count_hooks(pruned),
            "recovered": count_hooks(recovered.model),
            REPLACEME: None if folded is None else count_hooks(folded),
            PRUNED_SECOND_COPY: None if pruned_copy is None else count_hooks(pruned_copy),
        },
    }
    return VariantModels(dense, pruned, recovered, folded, pruned_copy), solutions, record


# --------------------------------------------------------------------------------------------------
# Timed work
# --------------------------------------------------------------------------------------------------


def prefill_forward(model: nn.Module, batch: Batch, use_cache: bool, logits: str) -> torch.Tensor:
    """Run one prefill forward and return its logits."""
    # transformers 5 reads logits_to_keep=0 as every position, and generate() passes 1.
    keep = 1 if logits == "last" else 0
    output = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=use_cache, logits_to_keep=keep
    )
    return output.logits


def generate_tokens(model: nn.Module, prompt: Batch, new_tokens: int, pad_token_id: int) -> torch.Tensor:
    """Generate exactly ``new_tokens`` tokens greedily with the KV cache, and return the full sequences."""
    return model.generate(
        input_ids=prompt["input_ids"],
        attention_mask=prompt["attention_mask"],
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad_token_id,
        # Reset sampling settings that a model's generation config may carry, which greedy decoding ignores.
        temperature=None,
        top_p=None,
        top_k=None,
    )


def timed(function: Callable[[], object]) -> tuple[dict[str, float], object]:
    """Run ``function`` once, and return its wall-clock and process CPU seconds, the load average before it and its result."""
    load = os.getloadavg()[0]
    cpu_start = time.process_time()
    wall_start = time.perf_counter()
    value = function()
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    return {"wall_s": wall, "cpu_s": cpu, "load_average_1min": load}, value


def round_order(variants: Sequence[str], round_index: int) -> list[str]:
    """Return the timing order of one round: as listed in even rounds, reversed in odd ones."""
    return list(variants) if round_index % 2 == 0 else list(reversed(variants))


def measure_prefill(
    models: VariantModels, variants: Sequence[str], batch: Batch, args: argparse.Namespace
) -> dict[str, list[dict[str, float]]]:
    """Time one prefill forward per variant and round, and return the samples of each variant."""

    def run(model: nn.Module) -> torch.Tensor:
        return prefill_forward(model, batch, args.prefill_use_cache, args.prefill_logits)

    log.info("Prefill warm-up: %d run(s) of each variant.", args.warmup)
    for variant in variants:
        with models.variant(variant) as model:
            for _ in range(args.warmup):
                run(model)
    samples: dict[str, list[dict[str, float]]] = {variant: [] for variant in variants}
    for round_index in range(args.repeats):
        log.info("Prefill round %d of %d.", round_index + 1, args.repeats)
        for variant in round_order(variants, round_index):
            with models.variant(variant) as model:
                sample, _ = timed(lambda: run(model))
            sample["round"] = round_index
            samples[variant].append(sample)
    return samples


def measure_generation(
    models: VariantModels, variants: Sequence[str], prompt: Batch, new_tokens: int, pad_token_id: int, args: argparse.Namespace
) -> dict[str, list[dict[str, float]]]:
    """Time a cached prompt prefill, then ``generate()``, per variant and round, and return the samples of each variant."""
    expected_length = prompt["input_ids"].shape[1] + new_tokens

    def run_prefill(model: nn.Module) -> torch.Tensor:
        return prefill_forward(model, prompt, use_cache=True, logits="last")

    def run_generate(model: nn.Module) -> torch.Tensor:
        return generate_tokens(model, prompt, new_tokens, pad_token_id)

    log.info("Generation warm-up: %d run(s) of each variant.", args.warmup)
    for variant in variants:
        with models.variant(variant) as model:
            for _ in range(args.warmup):
                run_prefill(model)
                run_generate(model)
    samples: dict[str, list[dict[str, float]]] = {variant: [] for variant in variants}
    for round_index in range(args.repeats):
        log.info("Generation round %d of %d.", round_index + 1, args.repeats)
        for variant in round_order(variants, round_index):
            with models.variant(variant) as model:
                prefill_sample, _ = timed(lambda: run_prefill(model))
                generate_sample, sequences = timed(lambda: run_generate(model))
            if sequences.shape[1] != expected_length:
                raise RuntimeError(
                    f"{variant}: generate() returned {sequences.shape[1]} tokens, expected {expected_length} "
                    f"({prompt['input_ids'].shape[1]} prompt + {new_tokens} new)."
                )
            decode_s = generate_sample["wall_s"] - prefill_sample["wall_s"]
            samples[variant].append(
                {
                    "round": round_index,
                    "prompt_prefill_s": prefill_sample["wall_s"],
                    "generate_s": generate_sample["wall_s"],
                    "generate_cpu_s": generate_sample["cpu_s"],
                    "load_average_1min": prefill_sample["load_average_1min"],
                    "decode_ms_per_token": 1e3 * decode_s / (new_tokens - 1),
                    "total_ms_per_token": 1e3 * generate_sample["wall_s"] / new_tokens,
                }
            )
    return samples


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def summarize(samples: dict[str, list[dict[str, float]]], key: str) -> dict[str, dict]:
    """Summarize ``key`` of every variant: median, minimum and ratios to ``pruned``.

    ``ratio_to_pruned`` is the ratio of medians. ``round_ratios`` divides each sample by the
    ``pruned`` sample of the same round, and ``median_round_ratio`` is their median, which a slow
    drift of the machine affects less. A ratio above 1 means slower than ``pruned``.
    """
    reference = [sample[key] for sample in samples[PRUNED]]
    reference_median = statistics.median(reference)
    summary = {}
    for variant, variant_samples in samples.items():
        values = [sample[key] for sample in variant_samples]
        median = statistics.median(values)
        round_ratios = [value / pruned for value, pruned in zip(values, reference)]
        summary[variant] = {
            "median": median,
            "min": min(values),
            "ratio_to_pruned": median / reference_median,
            "min_ratio_to_pruned": min(values) / min(reference),
            "round_ratios": round_ratios,
            "median_round_ratio": statistics.median(round_ratios),
            "samples": values,
        }
    return summary


# --------------------------------------------------------------------------------------------------
# Checks and the operator alone
# --------------------------------------------------------------------------------------------------


def max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def check_variants(
    models: VariantModels,
    variants: Sequence[str],
    batch: Batch,
    solutions: dict[str, dict[str, Solution]],
) -> dict:
    """Check on the prefill batch that each variant computes the model its name describes.

    The pruned copy must match the recovered model with no operator active, and the second pruned
    copy when there is one. Each hooked method must change the logits, which shows that its hook
    ran. The folded ReplaceMe model is compared with ReplaceMe applied through its output hook,
    which this adds to the recovered model, so run it after the timing. Returns the maximum
    absolute logit differences. Raises ``RuntimeError`` when a check fails.
    """

    def logits_of(variant: str) -> torch.Tensor:
        with models.variant(variant) as model:
            return prefill_forward(model, batch, use_cache=False, logits="all")

    pruned = logits_of(PRUNED)
    with models.recovered.variant(PRUNED) as model:
        pruned_with_adapters = prefill_forward(model, batch, use_cache=False, logits="all")
    result = {
        "max_abs_logit": float(pruned.abs().max()),
        "pruned_vs_recovered_no_operator": max_abs_difference(pruned, pruned_with_adapters),
    }
    if result["pruned_vs_recovered_no_operator"] != 0.0:
        raise RuntimeError(
            "The pruned copy and the recovered model with no operator active give different logits "
            f"(max difference {result['pruned_vs_recovered_no_operator']:.3g}): the two pruned layouts differ."
        )
    if PRUNED_SECOND_COPY in variants:
        result["pruned_second_copy_vs_pruned"] = max_abs_difference(logits_of(PRUNED_SECOND_COPY), pruned)
        if result["pruned_second_copy_vs_pruned"] != 0.0:
            raise RuntimeError(
                "The two pruned copies give different logits "
                f"(max difference {result['pruned_second_copy_vs_pruned']:.3g}): the copies are not the same model."
            )
    for method in HOOKED_METHODS:
        if method in variants:
            difference = max_abs_difference(logits_of(method), pruned)
            result[f"{method}_vs_pruned"] = difference
            if difference == 0.0:
                raise RuntimeError(f"{method} gives the logits of the pruned model, so its operator was not applied.")
    if REPLACEME in variants:
        models.recovered.add_method(REPLACEME, solutions[REPLACEME])
        with models.recovered.variant(REPLACEME) as model:
            hooked = prefill_forward(model, batch, use_cache=False, logits="all")
        folded = logits_of(REPLACEME)
        result["replaceme_folded_vs_hooked"] = max_abs_difference(folded, hooked)
        result["replaceme_folded_vs_pruned"] = max_abs_difference(folded, pruned)
        # The fold rounds Tᵀ W to the weight dtype, while the hook computes in float32, so the two agree only up to
        # rounding error. A wrong fold (such as W T) differs by about as much as the change over pruned.
        dtype = next(models.folded.parameters()).dtype
        tolerance = 1e-2 if dtype == torch.float32 else 1e-1
        result["replaceme_relative_tolerance"] = tolerance
        if result["replaceme_folded_vs_hooked"] > tolerance * max(result["replaceme_folded_vs_pruned"], 1e-6):
            raise RuntimeError(
                f"The folded {REPLACEME} model differs from {REPLACEME} through its hook by "
                f"{result['replaceme_folded_vs_hooked']:.3g}, against {result['replaceme_folded_vs_pruned']:.3g} from pruned."
            )
    return result


def time_operator(models: VariantModels, method: str, shapes: dict[str, tuple[int, ...]], repeats: int) -> dict:
    """Time one boundary's operator of ``method`` alone on random inputs, and a bare ``x @ W`` for comparison.

    ``adapter_us`` calls the ``BoundaryAdapter`` module, as the hook does. ``operator_us`` calls
    the ``LinearOperator``. ``matmul_us`` is one product with the full matrix ``W = I + M`` in the
    model dtype, the least work an operator at that spot could cost.
    """
    adapter = next(adapter for adapter in iter_adapters(models.recovered.model) if method in adapter.operators)
    operator = adapter.operators[method]
    dtype = next(models.pruned.parameters()).dtype
    matrix = operator.matrix().to(dtype)
    previous = adapter.active
    adapter.active = method
    generator = torch.Generator().manual_seed(0)
    result = {"boundary": adapter.boundary_name, "operator_dtype": str(operator.delta.dtype), "shapes": {}}
    try:
        for name, shape in shapes.items():
            x = torch.randn(*shape, generator=generator).to(dtype)
            functions = {
                "adapter_us": lambda: adapter(x),
                "operator_us": lambda: operator(x),
                "matmul_us": lambda: x @ matrix,
            }
            for function in functions.values():
                for _ in range(3):
                    function()
            values: dict[str, list[float]] = {label: [] for label in functions}
            # The three calls alternate, like the variants, so that a change of load hits all of them.
            for repeat in range(repeats):
                for label in round_order(list(functions), repeat):
                    values[label].append(1e6 * timed(functions[label])[0]["wall_s"])
            timings = {label: statistics.median(samples) for label, samples in values.items()}
            result["shapes"][name] = {"shape": list(shape), **timings}
    finally:
        adapter.active = previous
    return result


# --------------------------------------------------------------------------------------------------
# Machine facts and output
# --------------------------------------------------------------------------------------------------


def cpu_model_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def git_commit() -> str | None:
    try:
        output = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return output.stdout.strip()


def machine_facts() -> dict:
    """Record the software and hardware behind the figures."""
    import transformers

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
    }


def write_json_atomically(path: Path, data: dict) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp creates the file readable by its owner alone. Give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def print_table(result: dict) -> None:
    """Print the medians and the ratios to ``pruned`` of both measurements."""
    prefill, generation = result["prefill"], result["generation"]
    print(
        f"{'variant':<22} {'prefill s':>10} {'tok/s':>8} {'ratio':>7} {'round':>7}   "
        f"{'decode ms/tok':>13} {'ratio':>7} {'round':>7} {'total ms/tok':>12}"
    )
    for variant in result["variants"]:
        p = prefill["seconds"][variant]
        d = generation["decode_ms_per_token"][variant]
        t = generation["total_ms_per_token"][variant]
        print(
            f"{variant:<22} {p['median']:>10.4f} {prefill['tokens_per_s'][variant]:>8.0f} {p['ratio_to_pruned']:>7.4f} "
            f"{p['median_round_ratio']:>7.4f}   {d['median']:>13.3f} {d['ratio_to_pruned']:>7.4f} "
            f"{d['median_round_ratio']:>7.4f} {t['median']:>12.3f}"
        )
    print("ratio: median over pruned median; round: median of per-round ratios. Above 1 is slower than pruned.")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    variants = check_arguments(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    machine = machine_facts()

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tokenizer = load_tokenizer(args.model)
    calibration, prefill_batch, prompt = build_inputs(args, tokenizer)
    dense = load_model(args.model, args.dtype)
    dense.requires_grad_(False)
    removed = sorted(args.layers)

    with torch.inference_mode():
        models, solutions, calibration_record = build_variant_models(dense, removed, calibration, args.ridge, variants)
        start = time.perf_counter()
        prefill_samples = measure_prefill(models, variants, prefill_batch, args)
        generation_samples = measure_generation(
            models, variants, prompt, args.new_tokens, tokenizer.pad_token_id, args
        )
        timing_s = time.perf_counter() - start
        hooked = [method for method in HOOKED_METHODS if method in variants]
        operator = None
        if hooked:
            hidden_size = text_config(dense).hidden_size
            shapes = {
                "prefill": (args.prefill_batch, args.prefill_tokens, hidden_size),
                "decode": (1, 1, hidden_size),
            }
            log.info("Timing the %s operator alone.", hooked[0])
            operator = time_operator(models, hooked[0], shapes, repeats=50)
        checks = check_variants(models, variants, prefill_batch, solutions)

    prefill_tokens = int(prefill_batch["attention_mask"].sum())
    prefill_seconds = summarize(prefill_samples, "wall_s")
    result = {
        "benchmark": "inference",
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else ["bench_inference.py", *argv],
        "config": {
            "model": args.model,
            "dtype": args.dtype,
            "removed_layers": removed,
            "boundaries": [boundary.name for boundary in boundaries_of(removed)],
            "layers_before": len(decoder_layers(dense)),
            "layers_after": len(decoder_layers(models.pruned)),
            "source": args.source,
            "seed": args.seed,
            "calibration_windows": args.calibration_windows,
            "calibration_seq_len": args.calibration_seq_len,
            "ridge": args.ridge,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "order": "every variant once per round, in the listed order in even rounds and reversed in odd rounds",
        },
        "machine": machine,
        "variants": variants,
        "calibration": calibration_record,
        "prefill": {
            "batch": args.prefill_batch,
            "tokens_per_prompt": args.prefill_tokens,
            "tokens_per_forward": prefill_tokens,
            "use_cache": args.prefill_use_cache,
            "logits": args.prefill_logits,
            "seconds": prefill_seconds,
            "tokens_per_s": {variant: prefill_tokens / entry["median"] for variant, entry in prefill_seconds.items()},
            "raw_samples": prefill_samples,
        },
        "generation": {
            "prompt_tokens": int(prompt["attention_mask"].sum()),
            "new_tokens": args.new_tokens,
            "decoding": "greedy, KV cache, min_new_tokens = max_new_tokens",
            "decode_ms_per_token_definition": "(generate - cached prompt prefill) / (new_tokens - 1)",
            "total_ms_per_token_definition": "generate / new_tokens",
            "decode_ms_per_token": summarize(generation_samples, "decode_ms_per_token"),
            "total_ms_per_token": summarize(generation_samples, "total_ms_per_token"),
            "prompt_prefill_s": summarize(generation_samples, "prompt_prefill_s"),
            "raw_samples": generation_samples,
        },
        "operator_alone": operator,
        "checks": checks,
        "timing_seconds": timing_s,
    }
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    write_json_atomically(args.output, result)
    print_table(result)
    print(f"Wrote {args.output}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
