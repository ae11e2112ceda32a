"""Tests of text sources, token windows and TextDataModule, with a tokenizer built in the test."""

import json
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets.config
import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ghostpl import data
from ghostpl.data import (
    IGNORE_INDEX,
    TextDataModule,
    TextSourceError,
    UnpaddedDistributedSampler,
    build_token_stream,
    load_documents,
    select_calibration_windows,
    evenly_spaced,
    select_evaluation_windows,
    split_sotu_speeches,
    sotu_speech_files,
    window_layout,
)

PAD, BOS, EOS, UNK = 0, 1, 2, 3
WORDS = [f"w{i}" for i in range(200)]


def make_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": PAD, "[BOS]": BOS, "[EOS]": EOS, "[UNK]": UNK}
    vocab.update({word: 4 + i for i, word in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )


def make_documents(count: int, words_per_document: int) -> list[str]:
    """Documents whose words run through WORDS in order, so every position has a known token."""
    documents = []
    position = 0
    for _ in range(count):
        words = [WORDS[(position + j) % len(WORDS)] for j in range(words_per_document)]
        position += words_per_document
        documents.append(" ".join(words))
    return documents


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # An empty datasets cache per test, so no test reads data that another test wrote.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.fixture(params=[True, False], ids=["bos", "no-bos"])
def tokenizer(request):
    return make_tokenizer(add_bos=request.param)


def write_text_files(directory, documents):
    directory.mkdir(parents=True, exist_ok=True)
    for i, document in enumerate(documents):
        (directory / f"doc{i:03d}.txt").write_text(document)
    return directory


def make_module(tokenizer, calibration, evaluation=None, **kwargs) -> TextDataModule:
    kwargs.setdefault("num_evaluation", None)
    kwargs.setdefault("num_calibration", 2)
    module = TextDataModule(calibration=str(calibration), evaluation=str(evaluation or calibration), **kwargs)
    module.set_tokenizer(tokenizer)
    return module


# -- tokenization and windows ------------------------------------------------------------------------


def test_stream_joins_documents_with_eos():
    tok = make_tokenizer(add_bos=True)
    stream = build_token_stream(["w0 w1", "w2", "w3 w4"], tok)

    assert stream.tolist() == [4, 5, EOS, 6, EOS, 7, 8]


def test_layout_detects_bos(tokenizer):
    layout = window_layout(tokenizer, seq_len=8)
    adds_bos = tokenizer("w0").input_ids[0] == BOS

    assert (layout.bos_token_id == BOS) == adds_bos
    assert layout.stream_tokens == (7 if adds_bos else 8)


def test_windows_have_seq_len_and_bos(tokenizer):
    seq_len = 16
    stream = build_token_stream(make_documents(10, 23), tokenizer)
    layout = window_layout(tokenizer, seq_len)
    adds_bos = layout.bos_token_id is not None

    windows = select_evaluation_windows(stream, layout, None)

    assert len(windows) > 3
    for window in windows:
        for key in ("input_ids", "attention_mask", "labels"):
            assert window[key].shape == (seq_len,)
            assert window[key].dtype == torch.long
        assert (window["input_ids"][0].item() == BOS) == adds_bos
        assert BOS not in window["input_ids"][1:].tolist()


def test_windows_are_consecutive_cuts(tokenizer):
    stream = build_token_stream(make_documents(7, 31), tokenizer)
    layout = window_layout(tokenizer, seq_len=12)
    skip = 1 if layout.bos_token_id is not None else 0

    windows = select_evaluation_windows(stream, layout, None)
    pieces = [w["input_ids"][skip : int(w["attention_mask"].sum())] for w in windows]

    assert torch.equal(torch.cat(pieces), stream)


def test_evaluation_windows_evenly_spaced(tokenizer):
    stream = build_token_stream(make_documents(7, 31), tokenizer)
    layout = window_layout(tokenizer, seq_len=12)

    picked = select_evaluation_windows(stream, layout, 3)
    everything = select_evaluation_windows(stream, layout, -1)
    full = layout.count_full_windows(stream.numel())
    expected = [0, round((full - 1) / 2), full - 1]

    assert len(picked) == 3
    for window, index in zip(picked, expected):
        assert torch.equal(window["input_ids"], everything[index]["input_ids"])
        assert int(window["attention_mask"].sum()) == 12


def test_evenly_spaced_distinct():
    for total in (1, 2, 5, 17, 1000):
        for count in range(1, min(total, 40) + 1):
            indices = evenly_spaced(total, count)
            assert len(set(indices)) == count
            assert indices[0] == 0
            assert indices[-1] == (total - 1 if count > 1 else 0)


def test_padded_tail_is_masked(tokenizer):
    seq_len = 10
    layout = window_layout(tokenizer, seq_len)
    stream = torch.arange(4, 4 + 3 * layout.stream_tokens + 4)

    windows = select_evaluation_windows(stream, layout, None)
    tail = windows[-1]
    num_real = 4 + (1 if layout.bos_token_id is not None else 0)

    assert len(windows) == 4
    assert tail["attention_mask"].tolist() == [1] * num_real + [0] * (seq_len - num_real)
    assert tail["labels"][num_real:].tolist() == [IGNORE_INDEX] * (seq_len - num_real)
    assert torch.equal(tail["labels"][:num_real], tail["input_ids"][:num_real])
    assert tail["input_ids"][num_real:].tolist() == [PAD] * (seq_len - num_real)
    for window in windows[:-1]:
        assert window["attention_mask"].all()
        assert (window["labels"] != IGNORE_INDEX).all()


def test_tail_without_target_is_dropped():
    tok = make_tokenizer(add_bos=False)
    layout = window_layout(tok, seq_len=10)
    stream = torch.arange(4, 4 + 2 * 10 + 1)

    windows = select_evaluation_windows(stream, layout, None)

    assert len(windows) == 2


def test_calibration_picks_follow_seed():
    tok = make_tokenizer(add_bos=True)
    stream = build_token_stream(make_documents(40, 50), tok)
    layout = window_layout(tok, seq_len=16)

    _, first = select_calibration_windows(stream, layout, 8, seed=0)
    _, again = select_calibration_windows(stream, layout, 8, seed=0)
    _, other = select_calibration_windows(stream, layout, 8, seed=1)

    assert first == again
    assert first != other
    assert first == sorted(first)
    assert len(set(first)) == 8


def test_calibration_windows_are_full():
    tok = make_tokenizer(add_bos=False)
    stream = build_token_stream(make_documents(5, 33), tok)
    layout = window_layout(tok, seq_len=16)
    full = layout.count_full_windows(stream.numel())

    windows, indices = select_calibration_windows(stream, layout, full, seed=3)

    assert indices == list(range(full))
    for window, index in zip(windows, indices):
        assert torch.equal(window["input_ids"], stream[index * 16 : (index + 1) * 16])
        assert window["attention_mask"].all()


@pytest.mark.parametrize("role", ["calibration", "evaluation"])
def test_short_text_names_seq_len(role):
    tok = make_tokenizer(add_bos=True)
    stream = build_token_stream(["w1 w2 w3"], tok)
    layout = window_layout(tok, seq_len=64)

    with pytest.raises(TextSourceError) as caught:
        if role == "calibration":
            select_calibration_windows(stream, layout, 1, seed=0, source="tiny.txt")
        else:
            select_evaluation_windows(stream, layout, None, source="tiny.txt")

    message = str(caught.value)
    assert "seq_len=64" in message
    assert "tiny.txt" in message
    assert "3 tokens" in message


def test_too_few_windows_names_setting():
    tok = make_tokenizer(add_bos=False)
    stream = build_token_stream(make_documents(1, 40), tok)
    layout = window_layout(tok, seq_len=16)

    with pytest.raises(TextSourceError, match="num_calibration"):
        select_calibration_windows(stream, layout, 3, seed=0)
    with pytest.raises(TextSourceError, match="num_evaluation"):
        select_evaluation_windows(stream, layout, 3)


# -- text sources ----------------------------------------------------------------------------------


def test_sotu_split_disjoint_and_complete():
    names = sotu_speech_files()
    calibration, evaluation = split_sotu_speeches(split_seed=0, eval_fraction=0.2)

    assert len(names) == 249
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == names
    assert len(evaluation) == round(0.2 * 249)


def test_sotu_split_follows_seed():
    first = split_sotu_speeches(split_seed=0)
    again = split_sotu_speeches(split_seed=0)
    other = split_sotu_speeches(split_seed=1)

    assert first == again
    assert first[1] != other[1]


def test_sotu_documents_match_split():
    calibration, evaluation = split_sotu_speeches(split_seed=0, eval_fraction=0.1)

    documents = load_documents("sotu", "evaluation", split_seed=0, eval_fraction=0.1)

    assert len(documents) == len(evaluation)
    assert all(len(document) > 1000 for document in documents)


def test_local_txt_file_per_document(tmp_path):
    folder = write_text_files(tmp_path / "texts", ["w1 w2\n\nw3 w4\n", "w5\n", "   \n"])

    from_dir = load_documents(str(folder), "calibration")
    from_file = load_documents(str(folder / "doc000.txt"), "evaluation")
    from_glob = load_documents(str(folder / "doc00[01].txt"), "evaluation")

    assert from_dir == ["w1 w2\n\nw3 w4\n", "w5\n"]
    assert from_file == ["w1 w2\n\nw3 w4\n"]
    assert from_glob == from_dir


def test_local_jsonl_text_field(tmp_path):
    path = tmp_path / "records.jsonl"
    records = [{"body": "w1 w2", "id": 1}, {"body": "w3", "id": 2}, {"body": "", "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")

    documents = load_documents(str(path), "calibration", text_field="body")

    assert documents == ["w1 w2", "w3"]
    with pytest.raises(TextSourceError, match="no field 'text'"):
        load_documents(str(path), "calibration")


def test_missing_path_names_path(tmp_path):
    missing = tmp_path / "absent.jsonl"

    with pytest.raises(TextSourceError, match="absent.jsonl.*not found"):
        load_documents(str(missing), "calibration")


def test_unknown_source_lists_choices():
    with pytest.raises(TextSourceError) as caught:
        load_documents("wikitext3", "calibration")

    message = str(caught.value)
    assert "'wikitext3'" in message
    for name in ("sotu", "wikitext2", "c4", ".jsonl"):
        assert name in message


def test_unsupported_suffix_rejected(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n")

    with pytest.raises(TextSourceError, match="unsupported suffix"):
        load_documents(str(path), "calibration")


@pytest.mark.parametrize("name", ["wikitext2", "wikitext-2-raw-v1", "c4"])
def test_hub_offline_fails_fast(name):
    start = time.monotonic()

    with pytest.raises(TextSourceError) as caught:
        load_documents(name, "calibration")
    elapsed = time.monotonic() - start

    message = str(caught.value)
    assert elapsed < 10
    assert "cannot be reached" in message
    assert "sotu" in message
    assert ".jsonl" in message


def test_hub_offline_reads_cache(tmp_path):
    from datasets.packaged_modules.json.json import Json

    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    train.write_text(json.dumps({"text": " = A = \n"}) + "\n" + json.dumps({"text": " w1 w2 \n"}) + "\n")
    test.write_text(json.dumps({"text": " w3 \n"}) + "\n")
    cache = tmp_path / "hf-datasets"
    builder = Json(
        cache_dir=str(cache),
        dataset_name="wikitext",
        config_name="wikitext-2-raw-v1",
        data_files={"train": str(train), "test": str(test)},
        hash="0123abcd",
    )
    builder.download_and_prepare()
    # The cache lookup of datasets 5.2 (packaged_modules/cache/cache.py) expects a directory named
    # after the config with a matching config_name in dataset_info.json, so rename the local build.
    built = next((cache / "wikitext").iterdir())
    built.rename(cache / "wikitext" / "wikitext-2-raw-v1")
    info_path = cache / "wikitext" / "wikitext-2-raw-v1" / "0.0.0" / "0123abcd" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["config_name"] = "wikitext-2-raw-v1"
    info_path.write_text(json.dumps(info))

    calibration = load_documents("wikitext2", "calibration")
    evaluation = load_documents("wikitext-2-raw-v1", "evaluation")

    assert calibration == [" = A = \n\n\n w1 w2 \n"]
    assert evaluation == [" w3 \n"]


def test_hub_offline_flags_set_at_call(monkeypatch):
    # A process that set HF_DATASETS_OFFLINE after importing datasets: the libraries still see online mode.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    seen = []

    def fake_load_dataset(*args, **kwargs):
        seen.append((datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)

    with pytest.raises(TextSourceError, match="cannot be reached"):
        load_documents("c4", "evaluation")

    assert seen == [(True, True)]
    assert datasets.config.HF_HUB_OFFLINE is False
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_hub_offline_restores_flags():
    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE

    with pytest.raises(TextSourceError):
        load_documents("wikitext2", "evaluation")

    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before


# -- TextDataModule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seq_len": 0},
        {"seq_len": 1},
        {"num_calibration": 0},
        {"num_evaluation": 0},
        {"num_evaluation": -2},
        {"batch_size": 0},
        {"eval_fraction": 0.0},
        {"eval_fraction": 1.0},
        {"num_workers": -1},
    ],
    ids=lambda kwargs: next(iter(kwargs)) + "=" + str(next(iter(kwargs.values()))),
)
def test_module_rejects_invalid_argument(kwargs):
    name = next(iter(kwargs))

    with pytest.raises(ValueError, match=f"Invalid {name}"):
        TextDataModule(**kwargs)


def test_module_builds_windows_once(tmp_path, tokenizer):
    folder = write_text_files(tmp_path / "texts", make_documents(6, 40))
    module = make_module(tokenizer, folder, seq_len=16, num_calibration=5, num_evaluation=None)

    module.setup("fit")
    calibration = module.calibration_windows()
    evaluation = module.evaluation_windows()
    module.setup("validate")

    assert module.calibration_windows() is calibration
    assert module.evaluation_windows() is evaluation
    assert len(calibration) == 5
    summary = module.describe()
    assert summary["calibration"]["tokens"] == 6 * 40 + 5
    assert summary["calibration"]["documents"] == 6
    assert summary["evaluation"]["windows"] == len(evaluation)
    assert summary["evaluation"]["padded_windows"] == 1
    assert len(summary["evaluation"]["names"]) == 6


def test_module_tokenizer_fixed_after_setup(tmp_path):
    folder = write_text_files(tmp_path / "texts", make_documents(3, 40))
    module = make_module(make_tokenizer(add_bos=True), folder, seq_len=16, num_calibration=2)
    module.setup()

    with pytest.raises(RuntimeError, match="before setup"):
        module.set_tokenizer(make_tokenizer(add_bos=False))


def test_module_short_text_fails_setup(tmp_path):
    folder = write_text_files(tmp_path / "texts", ["w1 w2 w3"])
    module = make_module(make_tokenizer(add_bos=True), folder, seq_len=32, num_calibration=1)

    with pytest.raises(TextSourceError, match="seq_len=32"):
        module.setup()


def test_module_checks_calibration_first(tmp_path):
    folder = write_text_files(tmp_path / "texts", make_documents(1, 40))
    module = make_module(
        make_tokenizer(add_bos=False), folder, evaluation=tmp_path / "absent.txt", seq_len=16, num_calibration=4
    )

    with pytest.raises(TextSourceError, match="num_calibration"):
        module.setup()


@pytest.mark.parametrize("num_calibration", [5, 6, 2])
def test_calibration_shards_disjoint(tmp_path, num_calibration):
    folder = write_text_files(tmp_path / "texts", make_documents(8, 40))
    module = make_module(make_tokenizer(add_bos=False), folder, seq_len=16, num_calibration=num_calibration)
    module.setup()
    everything = [tuple(w["input_ids"].tolist()) for w in module.calibration_windows()]

    shards = []
    for rank in range(2):
        rows = [tuple(row.tolist()) for batch in module.calibration_dataloader(rank, 2) for row in batch["input_ids"]]
        shards.append(rows)

    assert len(set(everything)) == num_calibration
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(everything)
    assert len(shards[0]) - len(shards[1]) == num_calibration % 2


def test_calibration_dataloader_rejects_rank(tmp_path):
    folder = write_text_files(tmp_path / "texts", make_documents(4, 40))
    module = make_module(make_tokenizer(add_bos=False), folder, seq_len=16, num_calibration=2)
    module.setup()

    with pytest.raises(ValueError, match="Invalid rank 2"):
        module.calibration_dataloader(2, 2)


def test_val_dataloader_batches_in_order(tmp_path):
    folder = write_text_files(tmp_path / "texts", make_documents(5, 40))
    module = make_module(make_tokenizer(add_bos=True), folder, seq_len=16, num_evaluation=None, batch_size=4)
    module.setup()

    batches = list(module.val_dataloader())
    stacked = torch.cat([b["input_ids"] for b in batches])
    expected = torch.stack([w["input_ids"] for w in module.evaluation_windows()])

    assert batches[0]["input_ids"].shape == (4, 16)
    assert torch.equal(stacked, expected)
    assert isinstance(module.test_dataloader().sampler, torch.utils.data.SequentialSampler)


def test_unpadded_sampler_odd_length():
    dataset = list(range(7))

    shards = [list(UnpaddedDistributedSampler(dataset, num_replicas=2, rank=rank)) for rank in range(2)]
    lengths = [len(UnpaddedDistributedSampler(dataset, num_replicas=2, rank=rank)) for rank in range(2)]

    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    assert lengths == [4, 3]


def test_val_dataloader_shards_under_ddp(tmp_path, monkeypatch):
    folder = write_text_files(tmp_path / "texts", make_documents(5, 40))
    module = make_module(make_tokenizer(add_bos=False), folder, seq_len=16, num_evaluation=5)
    module.setup()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)

    loader = module.val_dataloader()

    assert isinstance(loader.sampler, UnpaddedDistributedSampler)
    assert list(loader.sampler) == [1, 3]


def test_module_arguments_parse_with_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TextDataModule, "data")
    config = parser.parse_args(["--data.num_evaluation", "null", "--data.calibration", "c4", "--data.seq_len", "64"])

    assert config.data.num_evaluation is None
    assert config.data.calibration == "c4"
    assert config.data.seq_len == 64
    assert "Tokens per window" in parser.format_help()


@pytest.mark.integration
def test_sotu_with_smollm2_tokenizer():
    from ghostpl.models import load_tokenizer

    module = TextDataModule(num_calibration=32, num_evaluation=40)
    module.set_tokenizer(load_tokenizer("smollm2-135m"))
    module.setup()
    summary = module.describe()
    calibration_names = set(summary["calibration"]["names"])
    evaluation_names = set(summary["evaluation"]["names"])

    assert not calibration_names & evaluation_names
    assert len(calibration_names | evaluation_names) == 249
    # Measured with split_seed 0: 1,848,536 calibration and 597,573 evaluation tokens, about 5 characters per token.
    assert 1_000_000 < summary["calibration"]["tokens"] < 4_000_000
    assert 200_000 < summary["evaluation"]["tokens"] < 1_500_000
    assert summary["calibration"]["windows"] == 32
    assert summary["evaluation"]["windows"] == 40
    assert all(w["input_ids"].shape == (512,) for w in module.calibration_windows())
