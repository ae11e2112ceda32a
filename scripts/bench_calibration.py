#!/usr/bin/env python
"""Benchmark the boundary calibration pass: its time against a bare forward pass, and its peak memory.

Measurements, each written to one JSON file:

* ``time``: wall-clock and process CPU time of ``collect_boundary_statistics`` over the calibration
  batches, against a bare forward pass over the same batches. The bare pass stops at the same
  module as calibration (the input of the last boundary's end layer), through a forward pre-hook
  that only raises ``StopForward``. The two passes alternate, and each pair of samples is taken
  back to back.
* ``memory``: peak resident set size of fresh processes that (a) load the model and run one bare
  forward batch, (b) calibrate over N windows and (c) calibrate over 4N windows. On CUDA the peak of
  ``torch.cuda.max_memory_allocated`` is recorded too.
* ``devices`` (with ``--devices K``, K at least 2): wall-clock time of ``recovery.calibrate`` over
  the same windows in one CPU process and in K CPU processes joined by a gloo process group on
  localhost. Rank r calibrates on ``windows[r::K]``, as ``TextDataModule.calibration_dataloader``
  shards them, and the time includes the all-reduce of the sums. The single process runs
  ``--threads`` intra-op threads and each of the K processes ``--threads // K``, so both runs use
  the same cores.

Example, the defaults on the embedded SmolLM2-135M model::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/bench_calibration.py

Calibration in two processes against one, alone::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/bench_calibration.py --measure devices --devices 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import datetime
import gc
import json
import multiprocessing
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The GGUF loader of transformers draws a tqdm progress bar that transformers' own switch does not turn off.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import torch.distributed as dist
from torch import nn

from ghostpl.boundaries import Boundary, boundaries_of, validate_removed_layers
from ghostpl.calibration import StopForward, collect_boundary_statistics, stream_input_module
from ghostpl.data import (
    build_token_stream,
    collate_windows,
    load_documents,
    select_calibration_windows,
    window_layout,
)
from ghostpl.models import DTYPES, decoder_layers, load_model, load_tokenizer, text_config
from ghostpl.recovery import calibrate
from ghostpl.solvers import solve_ghost
from ghostpl.statistics import BoundaryStatistics, all_reduce_statistics

Batch = dict[str, torch.Tensor]

MEASUREMENTS = ("time", "memory")
# Run only with --devices K of at least 2, so it is not among the defaults.
DEVICES = "devices"
# Stages of the memory measurement, each run in its own fresh process.
MODEL_AND_BATCH = "model_and_batch"
CALIBRATION_N = "calibration_n"
CALIBRATION_4N = "calibration_4n"
# A bare pass over the 4N windows, which shows how much of any growth the forward pass alone causes.
BARE_4N = "bare_4n"
BARE = "bare"
CALIBRATION = "calibration"


@dataclass(frozen=True)
class BenchConfig:
    """The settings a measurement needs; plain values, so that they pickle into a subprocess."""

    model: str
    dtype: str
    device: str
    removed: tuple[int, ...]
    threads: int


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Time the boundary calibration pass against a bare forward pass over the same tokens, "
            "measure its peak memory at two calibration sizes, and write the results as JSON."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2-135m", help="model spec, as ghostpl.models.load_model takes it")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the model weights")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device that runs the model, such as cpu or cuda:0",
    )
    parser.add_argument(
        "--layers",
        type=parse_layers,
        default="13..18",
        help="0-based decoder layers to remove, as inclusive ranges and commas (13..18 or 3,5,13..18)",
    )
    parser.add_argument("--source", default="sotu", help="calibration text source, as ghostpl.data.load_documents takes it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice of calibration windows")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per calibration window")
    parser.add_argument("--windows", type=positive_int, default=8, help="calibration windows in each timed pass")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward batch")
    parser.add_argument(
        "--repeats", type=positive_int, default=9, help="timed pairs of passes (bare and calibration, alternating order)"
    )
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed batches of each pass run before timing")
    parser.add_argument(
        "--memory-windows",
        type=positive_int,
        default=4,
        help="N: the memory measurement calibrates over N and over 4N windows, each in a fresh process",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=len(os.sched_getaffinity(0)),
        help="torch intra-op threads (torch.set_num_threads); the default is every CPU this process may use",
    )
    parser.add_argument(
        "--devices",
        type=positive_int,
        default=1,
        help=(
            "K: also time calibration in K CPU processes (gloo on localhost, --threads // K threads each) "
            "against one process with --threads threads, over the same windows; 1 skips it"
        ),
    )
    parser.add_argument(
        "--measure",
        nargs="+",
        choices=[*MEASUREMENTS, DEVICES],
        default=list(MEASUREMENTS),
        help=f"measurements to run; {DEVICES} is added whenever --devices is 2 or more",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bench_calibration.json"),
        help="JSON result file, written to a temporary file in the same folder and then renamed",
    )
    return parser


# --------------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------------


def build_windows(model_spec: str, source: str, seq_len: int, count: int, seed: int) -> dict[str, torch.Tensor]:
    """Return ``count`` calibration windows stacked as ``input_ids`` and ``attention_mask``, each ``(count, seq_len)``."""
    tokenizer = load_tokenizer(model_spec)
    stream = build_token_stream(load_documents(source, "calibration"), tokenizer)
    windows, _ = select_calibration_windows(stream, window_layout(tokenizer, seq_len), count, seed, source)
    return collate_windows(windows)


def split_batches(windows: dict[str, torch.Tensor], count: int, batch_size: int) -> list[Batch]:
    """Cut the first ``count`` windows into batches of ``batch_size``. The last batch may be smaller."""
    return [
        {key: value[start : min(start + batch_size, count)].clone() for key, value in windows.items()}
        for start in range(0, count, batch_size)
    ]


def load_bench_model(config: BenchConfig) -> nn.Module:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    torch.set_num_threads(config.threads)
    model = load_model(config.model, config.dtype).to(config.device)
    num_layers = len(decoder_layers(model))
    validate_removed_layers(list(config.removed), num_layers)
    return model


def bench_boundaries(config: BenchConfig) -> list[Boundary]:
    return boundaries_of(config.removed)


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# The two passes
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def run_bare(model: nn.Module, boundaries: Sequence[Boundary], batches: Sequence[Batch]) -> None:
    """Run the forward pass over ``batches`` up to the input of the last boundary's end module, taking no statistics.

    The stop hook sits where calibration stops, so both passes run the same layers. Batches are
    moved to the model's device here, as ``collect_boundary_statistics`` does.
    """
    last = max(boundary.end for boundary in boundaries)
    stops = 0

    def stop(module, args, kwargs):
        nonlocal stops
        stops += 1
        raise StopForward

    device = next(model.parameters()).device
    handle = stream_input_module(model, last).register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    if stops != len(batches):
        raise RuntimeError(f"The bare pass stopped {stops} times over {len(batches)} batches: the stop hook did not run.")


def run_calibration(model: nn.Module, boundaries: Sequence[Boundary], batches: Sequence[Batch]) -> list[BoundaryStatistics]:
    """Run the calibration pass that the benchmark measures."""
    return collect_boundary_statistics(model, boundaries, batches, progress=False)


def timed(function: Callable[[], object], device: str) -> tuple[dict[str, float], object]:
    """Run ``function`` once, and return its result with its wall-clock and process CPU seconds.

    The sample also records the 1-minute load average before the run, which shows how busy the machine was.
    """
    load_before = os.getloadavg()[0]
    synchronize(device)
    cpu_start = time.process_time()
    wall_start = time.perf_counter()
    value = function()
    synchronize(device)
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    return {"wall_s": wall, "cpu_s": cpu, "load_average_1min": load_before}, value


def describe_stop_module(model: nn.Module, boundaries: Sequence[Boundary]) -> str:
    last = max(boundary.end for boundary in boundaries)
    if last == len(decoder_layers(model)):
        return "input of the final norm"
    return f"input of decoder layer {last}"


# --------------------------------------------------------------------------------------------------
# Measurement: time
# --------------------------------------------------------------------------------------------------


def measure_time(
    config: BenchConfig, windows: dict[str, torch.Tensor], count: int, batch_size: int, repeats: int, warmup: int
) -> dict:
    """Time the calibration pass against the bare pass over the same batches, alternating which runs first."""
    model = load_bench_model(config)
    boundaries = bench_boundaries(config)
    batches = split_batches(windows, count, batch_size)
    tokens = int(sum(int(batch["attention_mask"].sum()) for batch in batches))

    warmup_batches = batches[:warmup]
    if warmup_batches:
        run_bare(model, boundaries, warmup_batches)
        run_calibration(model, boundaries, warmup_batches)

    bare_samples, calibration_samples = sample_passes(model, config, boundaries, batches, repeats, tokens)
    add_seconds = time_statistics_add(model, config, batches, repeats=max(10, 2 * repeats))

    def median_of(samples: list[dict[str, float]], key: str) -> float:
        return statistics.median(sample[key] for sample in samples)

    bare_wall = median_of(bare_samples, "wall_s")
    calibration_wall = median_of(calibration_samples, "wall_s")
    bare_min = min(sample["wall_s"] for sample in bare_samples)
    calibration_min = min(sample["wall_s"] for sample in calibration_samples)
    bare_cpu = median_of(bare_samples, "cpu_s")
    calibration_cpu = median_of(calibration_samples, "cpu_s")
    pair_ratios = [c["wall_s"] / b["wall_s"] for b, c in zip(bare_samples, calibration_samples)]
    # This process's own threads raise the load average to about --threads, so a load above the CPU
    # count means other processes competed for the CPUs during that sample.
    cpus = len(os.sched_getaffinity(0))
    busy = sum(sample["load_average_1min"] > cpus for sample in bare_samples + calibration_samples)
    return {
        "windows": count,
        "batch_size": batch_size,
        "batches": len(batches),
        "tokens_per_pass": tokens,
        "stop_module": describe_stop_module(model, boundaries),
        "repeats": repeats,
        "warmup_batches": len(warmup_batches),
        "bare": {"median_wall_s": bare_wall, "min_wall_s": bare_min, "median_cpu_s": bare_cpu, "samples": bare_samples},
        "calibration": {
            "median_wall_s": calibration_wall,
            "min_wall_s": calibration_min,
            "median_cpu_s": calibration_cpu,
            "samples": calibration_samples,
        },
        "ratio_of_median_wall": calibration_wall / bare_wall,
        "ratio_of_median_cpu": calibration_cpu / bare_cpu,
        # Other processes only ever add time, so the fastest sample of each pass is the least disturbed one.
        "ratio_of_min_wall": calibration_min / bare_min,
        "pair_wall_ratios": pair_ratios,
        "median_pair_wall_ratio": statistics.median(pair_ratios),
        "samples_with_load_above_cpu_count": busy,
        "statistics_add": {
            **add_seconds,
            # Estimate of the calibration overhead: every boundary adds one batch per batch of the pass.
            "estimated_ratio": 1 + add_seconds["median_s"] * len(batches) * len(boundaries) / bare_wall,
        },
        "target_ratio": 1.15,
    }


def sample_passes(
    model: nn.Module,
    config: BenchConfig,
    boundaries: Sequence[Boundary],
    batches: Sequence[Batch],
    repeats: int,
    tokens: int,
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Time ``repeats`` pairs of passes, bare and calibration back to back; return the samples of each."""
    bare_samples: list[dict[str, float]] = []
    calibration_samples: list[dict[str, float]] = []
    for repeat in range(repeats):
        # Alternating the order spreads any drift of the machine's speed over both passes.
        order = ("bare", "calibration") if repeat % 2 == 0 else ("calibration", "bare")
        for name in order:
            if name == "bare":
                sample, _ = timed(lambda: run_bare(model, boundaries, batches), config.device)
                bare_samples.append(sample)
                continue
            sample, stats = timed(lambda: run_calibration(model, boundaries, batches), config.device)
            counted = [int(boundary_stats.count) for boundary_stats in stats]
            if any(count != tokens for count in counted):
                raise RuntimeError(f"Calibration counted {counted} tokens per boundary, expected {tokens}.")
            calibration_samples.append(sample)
    return bare_samples, calibration_samples


@torch.no_grad()
def time_statistics_add(model: nn.Module, config: BenchConfig, batches: Sequence[Batch], repeats: int) -> dict:
    """Time ``BoundaryStatistics.add`` alone on random activations of one batch's shape, in the model's dtype.

    This is the arithmetic that the calibration hooks add to the bare pass, measured apart from it.
    """
    hidden_size = text_config(model).hidden_size
    tokens = int(batches[0]["attention_mask"].sum())
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    x_pre = torch.randn(tokens, hidden_size, generator=generator).to(device=config.device, dtype=dtype)
    x_post = torch.randn(tokens, hidden_size, generator=generator).to(device=config.device, dtype=dtype)
    stats = BoundaryStatistics.zeros(hidden_size, device=config.device)
    stats.add(x_pre, x_post)  # warm-up
    samples = [timed(lambda: stats.add(x_pre, x_post), config.device)[0]["wall_s"] for _ in range(repeats)]
    return {"tokens": tokens, "hidden_size": hidden_size, "median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


# --------------------------------------------------------------------------------------------------
# Measurement: memory
# --------------------------------------------------------------------------------------------------


def read_status_kib(field: str) -> int | None:
    """Read one ``kB`` field of /proc/self/status, such as VmHWM or VmRSS, or return None where the file is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS, and return whether the kernel accepted the reset.

    Writing 5 to /proc/self/clear_refs does this on Linux 4.0 and later. It keeps the peak of
    loading the model (the GGUF de-quantisation) out of the peak of the stage that follows.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def release_free_heap() -> None:
    """Collect garbage and return free glibc heap pages to the kernel, so every stage starts from a similar RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_stage(
    config: BenchConfig, stage: str, pass_name: str, windows: dict[str, torch.Tensor], count: int, batch_size: int
) -> dict:
    """Run one memory stage and return its RSS figures.

    Each stage runs in a fresh process, so that no heap left over from an earlier stage hides or adds growth.
    """
    model = load_bench_model(config)
    boundaries = bench_boundaries(config)
    batches = split_batches(windows, count, batch_size)
    del windows
    cuda = torch.device(config.device).type == "cuda"

    release_free_heap()
    load_peak = read_status_kib("VmHWM")
    peak_reset = reset_peak_rss()
    rss_start = read_status_kib("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats(config.device)
        cuda_start = torch.cuda.memory_allocated(config.device)

    if pass_name == BARE:
        run_bare(model, boundaries, batches)
    else:
        run_calibration(model, boundaries, batches)
    synchronize(config.device)

    result = {
        "stage": stage,
        "pass": pass_name,
        "windows": count,
        "peak_rss_through_load_kib": load_peak,
        "peak_reset_after_load": peak_reset,
        "rss_after_load_kib": rss_start,
        # VmHWM counts from the reset above when peak_reset_after_load is true, else from process start.
        "peak_rss_kib": read_status_kib("VmHWM"),
        "rss_end_kib": read_status_kib("VmRSS"),
        # The reset lowers ru_maxrss too, because Linux reads it from the same high-water mark.
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    if cuda:
        # NOTE: this CUDA branch has never run on a GPU.
        result["cuda_memory_allocated_after_load_bytes"] = cuda_start
        result["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(config.device)
    return result


def run_in_fresh_process(function: Callable, *args) -> dict:
    """Run ``function(*args)`` in a new spawned interpreter and return its result."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as executor:
        return executor.submit(function, *args).result()


def measure_memory(config: BenchConfig, windows: dict[str, torch.Tensor], count: int, batch_size: int) -> dict:
    """Measure peak RSS for the model and one batch, calibration over N and over 4N windows, and a bare pass over 4N."""
    stages = {
        MODEL_AND_BATCH: (BARE, batch_size),
        CALIBRATION_N: (CALIBRATION, count),
        CALIBRATION_4N: (CALIBRATION, 4 * count),
        BARE_4N: (BARE, 4 * count),
    }
    results = {}
    for stage, (pass_name, stage_count) in stages.items():
        stage_windows = {key: value[:stage_count] for key, value in windows.items()}
        results[stage] = run_in_fresh_process(
            memory_stage, config, stage, pass_name, stage_windows, stage_count, batch_size
        )

    def growth(key: str, new: str, old: str) -> float | None:
        before, after = results[old][key], results[new][key]
        if before is None or after is None:
            return None
        return (after - before) / before

    summary = {
        "n_windows": count,
        "batch_size": batch_size,
        "stages": results,
        "peak_rss_source": "VmHWM after a reset past model loading"
        if all(r["peak_reset_after_load"] for r in results.values())
        else "VmHWM since process start (the reset failed), so loading the model is included",
        "growth_4n_over_n": growth("peak_rss_kib", CALIBRATION_4N, CALIBRATION_N),
        "growth_n_over_model_and_batch": growth("peak_rss_kib", CALIBRATION_N, MODEL_AND_BATCH),
        "bare_growth_4n_over_model_and_batch": growth("peak_rss_kib", BARE_4N, MODEL_AND_BATCH),
        "peak_rss_increase_over_load_kib": {
            stage: result["peak_rss_kib"] - result["rss_after_load_kib"]
            for stage, result in results.items()
            if result["peak_rss_kib"] is not None and result["rss_after_load_kib"] is not None
        },
        "target_growth": 0.05,
    }
    if "cuda_max_memory_allocated_bytes" in results[CALIBRATION_N]:
        summary["cuda_growth_4n_over_n"] = growth("cuda_max_memory_allocated_bytes", CALIBRATION_4N, CALIBRATION_N)
        summary["cuda_growth_n_over_model_and_batch"] = growth(
            "cuda_max_memory_allocated_bytes", CALIBRATION_N, MODEL_AND_BATCH
        )
    return summary


# --------------------------------------------------------------------------------------------------
# Measurement: devices
# --------------------------------------------------------------------------------------------------


def free_local_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now, for the gloo rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def calibration_rank(
    rank: int,
    world_size: int,
    port: int,
    config: BenchConfig,
    windows: dict[str, torch.Tensor],
    batch_size: int,
    repeats: int,
    warmup: int,
    output: str,
) -> None:
    """Time ``calibrate`` on rank ``rank``'s shard ``windows[rank::world_size]`` and save the figures to ``output``.

    Every sample starts at a barrier, so that all ranks start together, and its time is the maximum
    over the ranks. With ``world_size`` 1 no process group is created. The statistics of the last
    sample, already summed over the ranks, are saved beside the figures.
    """
    if world_size > 1:
        init_method = f"tcp://127.0.0.1:{port}"
        timeout = datetime.timedelta(minutes=10)
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    try:
        model = load_bench_model(config)
        boundaries = bench_boundaries(config)
        shard = {key: value[rank::world_size] for key, value in windows.items()}
        shard_count = int(shard["input_ids"].shape[0])
        batches = split_batches(shard, shard_count, batch_size)
        tokens = int(shard["attention_mask"].sum())

        def synchronized_seconds(function: Callable[[], object]) -> tuple[float, object]:
            if world_size > 1:
                dist.barrier()
            start = time.perf_counter()
            value = function()
            seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            if world_size > 1:
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            return float(seconds), value

        if warmup:
            calibrate(model, boundaries, lambda: batches[:warmup], progress=False)
        samples = []
        stats: list[BoundaryStatistics] = []
        for _ in range(repeats):
            seconds, stats = synchronized_seconds(lambda: calibrate(model, boundaries, lambda: batches, progress=False))
            samples.append(seconds)
        summed = [{name: tensor.clone() for name, tensor in boundary_stats.tensors().items()} for boundary_stats in stats]
        # The all-reduce alone, timed on the sums of the last sample, which it overwrites.
        reduce_seconds = [synchronized_seconds(lambda: all_reduce_statistics(stats))[0] for _ in range(repeats)]
        figures = {
            "rank": rank,
            "threads": torch.get_num_threads(),
            "windows": shard_count,
            "tokens": tokens,
            "wall_s": samples,
            "all_reduce_wall_s": reduce_seconds,
        }
        torch.save({"figures": figures, "stats": summed}, output)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def run_ranks(config: BenchConfig, world_size: int, args: tuple, directory: Path) -> list[dict]:
    """Run ``calibration_rank`` in ``world_size`` spawned processes and return each rank's saved output."""
    port = free_local_port()
    outputs = [str(directory / f"world{world_size}_rank{rank}.pt") for rank in range(world_size)]
    context = multiprocessing.get_context("spawn")
    processes = []
    for rank in range(world_size):
        process = context.Process(target=calibration_rank, args=(rank, world_size, port, config, *args, outputs[rank]))
        process.start()
        processes.append(process)
    for process in processes:
        process.join()
    failed = [rank for rank, process in enumerate(processes) if process.exitcode != 0]
    if failed:
        raise RuntimeError(f"Calibration ranks {failed} of {world_size} failed. Their tracebacks are printed above.")
    return [torch.load(output, weights_only=True) for output in outputs]


def statistics_from(tensors: dict[str, torch.Tensor]) -> BoundaryStatistics:
    """Rebuild the statistics that ``BoundaryStatistics.tensors`` returned, optional sums included."""
    extra = {name.removeprefix("extra/"): value for name, value in tensors.items() if name.startswith("extra/")}
    base = {name: value for name, value in tensors.items() if not name.startswith("extra/")}
    return BoundaryStatistics(**base, extra=extra)


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Return ``‖value − reference‖ / ‖reference‖`` (Frobenius), or the absolute norm where the reference is 0."""
    scale = float(torch.linalg.norm(reference))
    difference = float(torch.linalg.norm(value - reference))
    return difference / scale if scale > 0 else difference


def measure_devices(
    config: BenchConfig,
    windows: dict[str, torch.Tensor],
    count: int,
    batch_size: int,
    repeats: int,
    warmup: int,
    processes: int,
) -> dict:
    """Time ``calibrate`` over ``count`` windows in one process and in ``processes`` processes."""
    windows = {key: value[:count] for key, value in windows.items()}
    per_process = BenchConfig(
        model=config.model,
        dtype=config.dtype,
        device=config.device,
        removed=config.removed,
        threads=max(1, config.threads // processes),
    )
    with tempfile.TemporaryDirectory(prefix="bench_devices_") as directory:
        single_load = os.getloadavg()[0]
        single = run_ranks(config, 1, (windows, batch_size, repeats, warmup), Path(directory))[0]
        multi_load = os.getloadavg()[0]
        ranks = run_ranks(per_process, processes, (windows, batch_size, repeats, warmup), Path(directory))

    single_wall = single["figures"]["wall_s"]
    # Every rank recorded the same maximum over the ranks, so rank 0's samples stand for the run.
    multi_wall = ranks[0]["figures"]["wall_s"]
    reference = single["stats"]
    summed = ranks[0]["stats"]
    difference = max(
        relative_difference(boundary[name], reference_boundary[name])
        for boundary, reference_boundary in zip(summed, reference)
        for name in reference_boundary
    )
    operator_difference = max(
        relative_difference(solve_ghost(statistics_from(boundary)).delta, solve_ghost(statistics_from(reference_boundary)).delta)
        for boundary, reference_boundary in zip(summed, reference)
    )
    single_median = statistics.median(single_wall)
    multi_median = statistics.median(multi_wall)
    return {
        "processes": processes,
        "backend": "gloo",
        "windows": count,
        "batch_size": batch_size,
        "repeats": repeats,
        "warmup_batches": warmup,
        "single": {
            "threads": single["figures"]["threads"],
            "tokens": single["figures"]["tokens"],
            "median_wall_s": single_median,
            "min_wall_s": min(single_wall),
            "samples_s": single_wall,
            "load_average_1min_before": single_load,
        },
        "multi": {
            "threads_per_process": ranks[0]["figures"]["threads"],
            "windows_per_rank": [rank["figures"]["windows"] for rank in ranks],
            "tokens_per_rank": [rank["figures"]["tokens"] for rank in ranks],
            "median_wall_s": multi_median,
            "min_wall_s": min(multi_wall),
            "samples_s": multi_wall,
            "all_reduce_median_wall_s": statistics.median(ranks[0]["figures"]["all_reduce_wall_s"]),
            "load_average_1min_before": multi_load,
        },
        "speedup_of_median_wall": single_median / multi_median,
        "speedup_of_min_wall": min(single_wall) / min(multi_wall),
        # Both runs sum every window once, so the sums differ only by float rounding: the order of the
        # additions, and float32 forward passes that round differently with different thread counts.
        "max_relative_difference_of_sums": difference,
        "max_relative_difference_of_ghost_operators": operator_difference,
    }


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


def machine_facts(config: BenchConfig) -> dict:
    """Record the software and hardware behind the figures."""
    import transformers

    facts = {
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
        "device": config.device,
        "load_average_at_start": list(os.getloadavg()),
    }
    if torch.device(config.device).type == "cuda":
        facts["cuda_device_name"] = torch.cuda.get_device_name(config.device)
    return facts


def write_json_atomically(path: Path, data: dict) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(set(args.layers)) != len(args.layers):
        parser.error(f"Invalid --layers: {args.layers} lists a layer more than once. List each layer once.")
    measurements = list(args.measure)
    if args.devices > 1 and DEVICES not in measurements:
        measurements.append(DEVICES)
    if DEVICES in measurements and args.devices < 2:
        parser.error(f"--measure {DEVICES} needs --devices K with K of at least 2.")
    if DEVICES in measurements and torch.device(args.device).type != "cpu":
        parser.error(f"--devices runs CPU processes joined by gloo; set --device cpu (got {args.device!r}).")
    if DEVICES in measurements and args.windows < args.devices:
        parser.error(f"--windows {args.windows} cannot give each of {args.devices} processes a window; set at least {args.devices}.")
    torch.set_num_threads(args.threads)
    config = BenchConfig(
        model=args.model, dtype=args.dtype, device=args.device, removed=tuple(sorted(args.layers)), threads=args.threads
    )

    needed = max(
        args.windows if "time" in measurements or DEVICES in measurements else 0,
        4 * args.memory_windows if "memory" in measurements else 0,
    )
    windows = build_windows(args.model, args.source, args.seq_len, needed, args.seed)

    result = {
        "benchmark": "calibration",
        "config": {
            "model": args.model,
            "dtype": args.dtype,
            "device": args.device,
            "removed_layers": list(config.removed),
            "boundaries": [boundary.name for boundary in bench_boundaries(config)],
            "source": args.source,
            "seed": args.seed,
            "seq_len": args.seq_len,
            "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        },
        "machine": machine_facts(config),
    }
    # Memory runs first, before this process loads a model, so that its subprocesses do not compete with it for RAM.
    if "memory" in measurements:
        result["memory"] = measure_memory(config, windows, args.memory_windows, args.batch_size)
        print_memory(result["memory"])
    if DEVICES in measurements:
        result[DEVICES] = measure_devices(
            config, windows, args.windows, args.batch_size, args.repeats, args.warmup, args.devices
        )
        print_devices(result[DEVICES])
    if "time" in measurements:
        result["time"] = measure_time(config, windows, args.windows, args.batch_size, args.repeats, args.warmup)
        result["machine"]["tokens_per_pass"] = result["time"]["tokens_per_pass"]
        print_time(result["time"])
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    write_json_atomically(args.output, result)
    print(f"Wrote {args.output}")
    return 0


def print_time(timing: dict) -> None:
    busy = timing["samples_with_load_above_cpu_count"]
    if busy:
        total = len(timing["bare"]["samples"]) + len(timing["calibration"]["samples"])
        print(
            f"time: warning: {busy} of {total} samples started with a 1-minute load average above the CPU count, "
            "so other processes slowed them. Rerun on an idle machine for a trustworthy ratio."
        )
    print(
        f"time: {timing['tokens_per_pass']} tokens per pass; bare median {timing['bare']['median_wall_s']:.2f} s, "
        f"calibration median {timing['calibration']['median_wall_s']:.2f} s, "
        f"ratio of medians {timing['ratio_of_median_wall']:.3f} (wall) {timing['ratio_of_median_cpu']:.3f} (CPU), "
        f"ratio of minimums {timing['ratio_of_min_wall']:.3f}, "
        f"estimate from BoundaryStatistics.add alone {timing['statistics_add']['estimated_ratio']:.3f}, "
        f"target <= {timing['target_ratio']}"
    )


def print_devices(devices: dict) -> None:
    single, multi = devices["single"], devices["multi"]
    print(
        f"devices: {devices['windows']} windows; 1 process x {single['threads']} threads median "
        f"{single['median_wall_s']:.2f} s, {devices['processes']} processes x {multi['threads_per_process']} "
        f"threads median {multi['median_wall_s']:.2f} s (all-reduce {multi['all_reduce_median_wall_s'] * 1000:.1f} ms), "
        f"speedup {devices['speedup_of_median_wall']:.2f} (medians) {devices['speedup_of_min_wall']:.2f} (minimums), "
        f"sums differ by {devices['max_relative_difference_of_sums']:.1e} relative"
    )


def print_memory(memory: dict) -> None:
    def mebibytes(kib: int | None) -> str:
        return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"

    def percent(fraction: float | None) -> str:
        return "n/a" if fraction is None else f"{fraction:+.2%}"

    for stage, values in memory["stages"].items():
        increase = memory["peak_rss_increase_over_load_kib"].get(stage)
        print(
            f"memory: {stage} ({values['windows']} windows): peak RSS {mebibytes(values['peak_rss_kib'])}, "
            f"{mebibytes(increase)} above the RSS after loading"
        )
    print(
        f"memory: growth 4N over N {percent(memory['growth_4n_over_n'])}, "
        f"N over model and batch {percent(memory['growth_n_over_model_and_batch'])}, "
        f"bare 4N over model and batch {percent(memory['bare_growth_4n_over_model_and_batch'])}, "
        f"target < {memory['target_growth']:.0%}"
    )


if __name__ == "__main__":
    sys.exit(main())
