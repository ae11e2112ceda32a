"""Tests of ghostpl.export on tiny seeded Llama and Qwen2 models built in the test process.

The main check reloads an export in a fresh interpreter where ghostpl cannot be imported, with
stock transformers and ``trust_remote_code=True``, and compares its logits and cached greedy
generation with the in-memory pruned and recovered model.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
import random
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import HIDDEN_SIZE, NUM_LAYERS, QWEN2_LAYER_TYPES, build_tiny_llama, build_tiny_qwen2, random_batch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.testing import assert_close
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.quantizers.auto import AutoHfQuantizer
from transformers.utils.quantization_config import GgufConfig

import ghostpl.export
from ghostpl.export import (
    EXPORT_RECORD,
    OPERATORS_FIELD,
    ExportError,
    card_from_results,
    export_recovered,
    export_run,
    load_exported,
    plain_config,
)
from ghostpl.models import decoder_layers
from ghostpl.operators import iter_adapters, set_active_method
from ghostpl.recovery import RecoveredModel
from ghostpl.solvers import Solution

# Removing 1, 2 and 5 of 6 layers gives one gap inside the stack (its operator acts on the input of
# pruned layer 1) and one that reaches the last layer (its operator acts on the final norm's input).
REMOVED = [1, 2, 5]
OPERATOR_SCALE = 0.3
WORDS = "the quick brown fox jumps over a lazy dog while birds sing in tall trees near the river".split()
SPECIAL_TOKENS = ["[UNK]", "[BOS]", "[EOS]", "[PAD]"]
NEW_TOKENS = 8

# Runs in a fresh interpreter started by run_without_ghostpl. It checks that ghostpl cannot be
# imported, loads the export with stock transformers and remote code, and saves the logits of a
# batch, a cached greedy generation and the tokenizer's ids of a sentence.
CHILD_SCRIPT = """
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

try:
    import ghostpl
except ModuleNotFoundError:
    pass
else:
    sys.exit(f"ghostpl is importable from {ghostpl.__file__}")

export_dir, inputs_path, outputs_path = sys.argv[1:4]
inputs = torch.load(inputs_path)
model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
    generated = model.generate(
        inputs["prompt"], max_new_tokens=inputs["new_tokens"], do_sample=False, use_cache=True
    )
tokenizer = AutoTokenizer.from_pretrained(export_dir)
torch.save(
    {
        "logits": logits,
        "generated": generated,
        "class_module": type(model).__module__,
        "class_name": type(model).__name__,
        "operator_dtypes": {key: op.delta.dtype for key, op in model.ghost_operators.items()},
        "token_ids": tokenizer("the lazy dog")["input_ids"],
    },
    outputs_path,
)
"""

# Puts the given directory on sys.path, shifts argv to the script's, and runs the script.
BOOTSTRAP = "import sys; sys.path.append(sys.argv[1]); sys.argv = sys.argv[2:]; exec(open(sys.argv[0]).read())"


def site_without_ghostpl(directory: Path) -> Path:
    """Link every entry of the site-packages directories into ``directory``, except ghostpl's.

    ghostpl's entries are its package (a regular install), its dist-info, and the finder and
    .pth file of an editable install, all of which have "ghostpl" in their names.
    """
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


def run_without_ghostpl(script: str, args: list[str], work_dir: Path) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter that sees the installed packages but not ghostpl.

    ``-I`` ignores PYTHONPATH and the working directory, and ``-S`` skips the site module, so the
    only package directory is a copy of site-packages, made of links, without ghostpl's entries.
    transformers caches the remote code under HF_MODULES_CACHE, here inside ``work_dir``.
    """
    script_path = work_dir / "child.py"
    script_path.write_text(script)
    packages = site_without_ghostpl(work_dir / "site-packages")
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(work_dir / "modules"),
        "TQDM_DISABLE": "1",
    }
    command = [sys.executable, "-I", "-S", "-c", BOOTSTRAP, str(packages), str(script_path), *args]
    return subprocess.run(command, cwd=work_dir, env=environment, capture_output=True, text=True, timeout=300)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer over WORDS that puts [BOS] before every text."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]"
    )


def random_solutions(recovered: RecoveredModel, seed: int) -> dict[str, Solution]:
    """Return one random nonzero ``M`` per boundary, large enough to change the logits."""
    generator = torch.Generator().manual_seed(seed)
    solutions = {}
    for boundary in recovered.boundaries:
        delta = OPERATOR_SCALE * torch.randn(HIDDEN_SIZE, HIDDEN_SIZE, generator=generator, dtype=torch.float64)
        solutions[boundary.name] = Solution(delta=delta / HIDDEN_SIZE**0.5, ridge=0.0, solver="cholesky", residual=0.5)
    return solutions


def recover(model, removed=REMOVED, methods=("ghost",)) -> RecoveredModel:
    recovered = RecoveredModel.build(model, removed)
    for seed, method in enumerate(methods):
        recovered.add_method(method, random_solutions(recovered, seed=seed + 1))
    return recovered


def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def greedy_tokens(model, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)


def safetensors_dtypes(directory: Path) -> dict[str, torch.dtype]:
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        return {name: handle.get_tensor(name).dtype for name in handle.keys()}


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    # The second row is right-padded, so the export must also honour the attention mask.
    return random_batch(2, 12, seed=3, lengths=[12, 9])


@pytest.fixture
def prompt() -> torch.Tensor:
    return random_batch(1, 6, seed=4)["input_ids"]


@pytest.fixture
def ghost_export(tmp_path):
    """A tiny Llama with layers REMOVED and random ghost operators, its export, and its in-memory outputs."""
    model = build_tiny_llama()
    recovered = recover(model)
    path = export_recovered(model, recovered, "ghost", tmp_path / "tiny-ghost", tokenizer=build_tokenizer())
    return model, recovered, path


# ------------------------------------------------------------------------------- remote code


def test_export_reloads_without_ghostpl(ghost_export, batch, prompt, tmp_path):
    model, recovered, path = ghost_export
    with recovered.variant("pruned"):
        pruned_logits = logits_of(model, batch)
        pruned_tokens = greedy_tokens(model, prompt)
    with recovered.variant("ghost"):
        expected_logits = logits_of(model, batch)
        expected_tokens = greedy_tokens(model, prompt)
    # The operators must change both outputs by far more than the tolerance, or the comparisons below could not fail.
    assert (expected_logits - pruned_logits).abs().max() > 1e-2
    assert not torch.equal(expected_tokens, pruned_tokens)

    work_dir = tmp_path / "child"
    work_dir.mkdir()
    inputs = {**batch, "prompt": prompt, "new_tokens": NEW_TOKENS}
    torch.save(inputs, work_dir / "inputs.pt")
    result = run_without_ghostpl(
        CHILD_SCRIPT, [str(path), str(work_dir / "inputs.pt"), str(work_dir / "outputs.pt")], work_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(work_dir / "outputs.pt")

    assert outputs["class_name"] == "GhostLlamaForCausalLM"
    assert outputs["class_module"].startswith("transformers_modules.")
    assert outputs["operator_dtypes"] == {"1": torch.float32, "final_norm": torch.float32}
    mask = batch["attention_mask"].bool()
    assert_close(outputs["logits"][mask], expected_logits[mask], atol=1e-5, rtol=0)
    assert torch.equal(outputs["generated"], expected_tokens)
    assert outputs["token_ids"] == build_tokenizer()("the lazy dog")["input_ids"]


def test_export_config_records_operators(ghost_export):
    _, _, path = ghost_export
    config = json.loads((path / "config.json").read_text())

    assert config["model_type"] == "ghost_llama"
    assert config["num_hidden_layers"] == NUM_LAYERS - len(REMOVED)
    assert config["auto_map"] == {
        "AutoConfig": "configuration_ghost.GhostLlamaConfig",
        "AutoModelForCausalLM": "modeling_ghost.GhostLlamaForCausalLM",
    }
    assert config[OPERATORS_FIELD] == {
        "1": {"host": "model.layers.1", "boundary": "1-3", "removed_layers": [1, 2]},
        "final_norm": {"host": "model.norm", "boundary": "5-6", "removed_layers": [5]},
    }
    assert config[EXPORT_RECORD]["removed_layers"] == REMOVED
    assert config[EXPORT_RECORD]["num_hidden_layers_before"] == NUM_LAYERS
    assert "quantization_config" not in config


def test_export_file_permissions(ghost_export):
    _, _, path = ghost_export
    # transformers writes model.safetensors with mode 0600; the export gives it the mode of its other files.
    expected = (path / "README.md").stat().st_mode & 0o777

    assert (path / "model.safetensors").stat().st_mode & 0o777 == expected
    assert (path / "config.json").stat().st_mode & 0o777 == expected


def test_remote_code_imports_torch_and_transformers(ghost_export):
    _, _, path = ghost_export
    for name in ("modeling_ghost.py", "configuration_ghost.py"):
        lines = (path / name).read_text().splitlines()
        imports = [line for line in lines if line.startswith(("import ", "from "))]
        roots = {line.split()[1].split(".")[0] for line in imports}
        assert roots <= {"torch", "transformers", ""}, f"{name} imports {sorted(roots)}"


def test_export_without_remote_code_fails(ghost_export):
    _, _, path = ghost_export
    # A known model_type would make transformers load plain Llama and drop the operators.
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)


def test_export_keeps_layout(tmp_path):
    model = build_tiny_llama()
    recovered = recover(model)
    kept = NUM_LAYERS - len(REMOVED)

    recovered.pruner.restore()
    export_recovered(model, recovered, "ghost", tmp_path / "from-dense")
    assert not recovered.pruner.is_pruned
    assert len(decoder_layers(model)) == NUM_LAYERS
    assert model.config.num_hidden_layers == NUM_LAYERS

    recovered.pruner.prune()
    set_active_method(model, "ghost")
    export_recovered(model, recovered, "pruned", tmp_path / "from-pruned")
    assert recovered.pruner.is_pruned
    assert len(decoder_layers(model)) == kept
    assert model.config.num_hidden_layers == kept
    assert {adapter.active for adapter in recovered.all_adapters()} == {"ghost"}


# ----------------------------------------------------------------------------- ghostpl loader


def test_ghostpl_loader_matches(ghost_export, batch):
    model, recovered, path = ghost_export
    with recovered.variant("ghost"):
        expected = logits_of(model, batch)
    with recovered.variant("pruned"):
        expected_pruned = logits_of(model, batch)

    loaded = load_exported(path)

    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert isinstance(loaded, LlamaForCausalLM)
    assert len(list(iter_adapters(loaded))) == 2
    mask = batch["attention_mask"].bool()
    assert_close(logits_of(loaded, batch)[mask], expected[mask], atol=1e-5, rtol=0)
    set_active_method(loaded, None)
    assert_close(logits_of(loaded, batch)[mask], expected_pruned[mask], atol=1e-5, rtol=0)


def test_ghostpl_loader_plain_config(ghost_export):
    _, _, path = ghost_export
    loaded = load_exported(path)

    assert loaded.config.model_type == "llama"
    assert not hasattr(loaded.config, "auto_map") or not loaded.config.auto_map
    assert loaded.config.num_hidden_layers == NUM_LAYERS - len(REMOVED)


# ------------------------------------------------------------------------- folded and plain


def test_replaceme_export_standard(tmp_path, batch):
    model = build_tiny_llama()
    recovered = recover(model, removed=[2, 3], methods=("replaceme",))
    original_down_proj = decoder_layers(model)[1].mlp.down_proj.weight.clone()
    with recovered.variant("pruned"):
        pruned = logits_of(model, batch)
    with recovered.variant("replaceme"):
        expected = logits_of(model, batch)
    assert (expected - pruned).abs().max() > 1e-2

    path = export_recovered(model, recovered, "replaceme", tmp_path / "tiny-replaceme")
    config = json.loads((path / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()

    assert config["model_type"] == "llama"
    assert "auto_map" not in config
    assert OPERATORS_FIELD not in config
    assert not list(path.glob("*.py"))
    assert type(loaded) is LlamaForCausalLM
    assert config[EXPORT_RECORD]["boundaries"][0]["folded_into"] == "model.layers.1.mlp.down_proj"
    mask = batch["attention_mask"].bool()
    assert_close(logits_of(loaded, batch)[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(decoder_layers(model)[1].mlp.down_proj.weight, original_down_proj)


def test_pruned_export_standard(tmp_path, batch):
    model = build_tiny_llama()
    recovered = recover(model)
    with recovered.variant("pruned"):
        expected = logits_of(model, batch)

    path = export_recovered(model, recovered, "pruned", tmp_path / "tiny-pruned")
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()

    assert type(loaded) is LlamaForCausalLM
    assert "auto_map" not in json.loads((path / "config.json").read_text())
    mask = batch["attention_mask"].bool()
    assert_close(logits_of(loaded, batch)[mask], expected[mask], atol=1e-5, rtol=0)


def test_qwen2_layer_types_sliced(tmp_path, batch):
    model = build_tiny_qwen2()
    recovered = recover(model)
    with recovered.variant("ghost"):
        expected = logits_of(model, batch)

    path = export_recovered(model, recovered, "ghost", tmp_path / "tiny-qwen2")
    config = json.loads((path / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()

    kept = [i for i in range(NUM_LAYERS) if i not in REMOVED]
    assert config["layer_types"] == [QWEN2_LAYER_TYPES[i] for i in kept]
    assert config["max_window_layers"] == 1
    assert type(loaded).__name__ == "GhostQwen2ForCausalLM"
    mask = batch["attention_mask"].bool()
    assert_close(logits_of(loaded, batch)[mask], expected[mask], atol=1e-5, rtol=0)


def build_tiny_mistral() -> MistralForCausalLM:
    config = MistralConfig(
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=128,
        sliding_window=4,
        pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = MistralForCausalLM(config)
    return model.eval()


def test_mistral_export_reloads(tmp_path, batch):
    model = build_tiny_mistral()
    recovered = recover(model)
    with recovered.variant("ghost"):
        expected = logits_of(model, batch)

    path = export_recovered(model, recovered, "ghost", tmp_path / "tiny-mistral")
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()

    assert type(loaded).__name__ == "GhostMistralForCausalLM"
    assert json.loads((path / "config.json").read_text())["model_type"] == "ghost_mistral"
    mask = batch["attention_mask"].bool()
    assert_close(logits_of(loaded, batch)[mask], expected[mask], atol=1e-5, rtol=0)


def test_lora_merged_into_export(tmp_path, batch):
    from peft import LoraConfig, inject_adapter_in_model

    model = build_tiny_llama()
    recovered = recover(model)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]), model)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    with recovered.variant("ghost"):
        expected = logits_of(model, batch)

    path = export_recovered(model, recovered, "ghost", tmp_path / "tiny-lora")
    names = set(safetensors_dtypes(path))
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()

    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not [name for name in names if "lora" in name or "base_layer" in name]
    mask = batch["attention_mask"].bool()
    assert_close(logits_of(loaded, batch)[mask], expected[mask], atol=1e-5, rtol=0)


# -------------------------------------------------------------------------- dtypes and ties


def build_tied_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = LlamaForCausalLM(config)
    return model.eval()


def test_tied_embeddings_stored_once(tmp_path, batch):
    model = build_tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    recovered = recover(model)
    with recovered.variant("ghost"):
        expected = logits_of(model, batch)

    path = export_recovered(model, recovered, "ghost", tmp_path / "tiny-tied")
    names = set(safetensors_dtypes(path))
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()

    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    mask = batch["attention_mask"].bool()
    assert_close(logits_of(loaded, batch)[mask], expected[mask], atol=1e-5, rtol=0)


def test_bfloat16_export_float32_operators(tmp_path, batch):
    model = build_tiny_llama()
    recovered = recover(model)
    with recovered.variant("ghost"):
        expected = logits_of(model, batch)

    path = export_recovered(model, recovered, "ghost", tmp_path / "tiny-bf16", dtype="bfloat16")
    stored = safetensors_dtypes(path)
    remote = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ghostpl_loaded = load_exported(path)

    assert stored["ghost_operators.1.delta"] == torch.float32
    assert stored["ghost_operators.final_norm.delta"] == torch.float32
    assert stored["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert remote.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert remote.ghost_operators["1"].delta.dtype == torch.float32
    adapters = list(iter_adapters(ghostpl_loaded))
    assert {adapter.operators["ghost"].delta.dtype for adapter in adapters} == {torch.float32}
    remote_logits = logits_of(remote, batch)
    assert remote_logits.dtype == torch.bfloat16
    mask = batch["attention_mask"].bool()
    assert_close(remote_logits[mask], logits_of(ghostpl_loaded, batch)[mask], atol=1e-6, rtol=0)
    # bfloat16 keeps 8 significant bits, so the logits agree with float32 to about 1%.
    assert_close(remote_logits[mask].float(), expected[mask], atol=0.05, rtol=0.05)


def test_operator_dtype_follows_export_dtype(tmp_path):
    model = build_tiny_llama()
    recovered = recover(model)

    path = export_recovered(
        model, recovered, "ghost", tmp_path / "tiny-bf16-ops", dtype="bfloat16", operator_dtype="bfloat16"
    )
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

    assert safetensors_dtypes(path)["ghost_operators.1.delta"] == torch.bfloat16
    assert loaded.ghost_operators["1"].delta.dtype == torch.bfloat16


def test_operator_dtype_mismatch_raises(tmp_path):
    model = build_tiny_llama()
    recovered = recover(model)

    with pytest.raises(ExportError, match="operator_dtype"):
        export_recovered(model, recovered, "ghost", tmp_path / "out", dtype="float32", operator_dtype="bfloat16")
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------- GGUF


def mark_as_gguf(model) -> None:
    """Mark ``model`` as from_pretrained(..., gguf_file=...) does in transformers 5: a GgufConfig and its quantizer."""
    quantization_config = GgufConfig(gguf_file="tiny.gguf")
    model.config.quantization_config = quantization_config
    model.hf_quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=True)


def test_gguf_model_exports_plain(tmp_path, batch):
    model = build_tiny_llama()
    mark_as_gguf(model)
    # The marks reproduce transformers' refusal to save a model loaded from GGUF.
    with pytest.raises(ValueError, match="gguf"):
        model.save_pretrained(tmp_path / "refused")
    recovered = recover(model)
    with recovered.variant("ghost"):
        expected = logits_of(model, batch)

    path = export_recovered(model, recovered, "ghost", tmp_path / "tiny-gguf")
    config = json.loads((path / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()

    assert "quantization_config" not in config
    assert getattr(loaded, "hf_quantizer", None) is None
    mask = batch["attention_mask"].bool()
    assert_close(logits_of(loaded, batch)[mask], expected[mask], atol=1e-5, rtol=0)


def test_plain_config_drops_quantization(tmp_path):
    model = build_tiny_llama()
    mark_as_gguf(model)

    config = plain_config(model)

    assert getattr(config, "quantization_config", None) is None
    assert config.num_hidden_layers == NUM_LAYERS
    assert model.config.quantization_config is not None


# --------------------------------------------------------------------- atomic directory writes


def fail_after_weights(directory: Path, text: str) -> None:
    """Stand in for the model-card writer: check that earlier files exist, then fail."""
    assert (directory / "model.safetensors").is_file()
    assert (directory / "config.json").is_file()
    raise RuntimeError("simulated failure while writing the model card")


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    model = build_tiny_llama()
    recovered = recover(model)
    parent = tmp_path / "exports"
    parent.mkdir()
    monkeypatch.setattr(ghostpl.export, "_write_model_card", fail_after_weights)

    with pytest.raises(RuntimeError, match="simulated failure"):
        export_recovered(model, recovered, "ghost", parent / "tiny")

    assert not (parent / "tiny").exists()
    assert list(parent.iterdir()) == []


def test_interrupted_overwrite_keeps_previous(tmp_path, monkeypatch, batch):
    model = build_tiny_llama()
    recovered = recover(model)
    target = tmp_path / "tiny"
    export_recovered(model, recovered, "pruned", target)
    before = {path.name: path.read_bytes() for path in target.iterdir()}
    monkeypatch.setattr(ghostpl.export, "_write_model_card", fail_after_weights)

    with pytest.raises(RuntimeError, match="simulated failure"):
        export_recovered(model, recovered, "ghost", target, overwrite=True)

    assert {path.name: path.read_bytes() for path in target.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny"]


def test_existing_target_raises(tmp_path):
    model = build_tiny_llama()
    recovered = recover(model)
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "keep.txt").write_text("user data")

    with pytest.raises(FileExistsError, match="overwrite"):
        export_recovered(model, recovered, "ghost", target)

    assert sorted(path.name for path in target.iterdir()) == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny"]


def test_overwrite_replaces_export(tmp_path):
    model = build_tiny_llama()
    recovered = recover(model)
    target = tmp_path / "tiny"
    export_recovered(model, recovered, "pruned", target)

    export_recovered(model, recovered, "ghost", target, overwrite=True)

    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "ghost_llama"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny"]


# ------------------------------------------------------------------------------ requests


def test_method_not_installed_raises(tmp_path):
    model = build_tiny_llama()
    recovered = recover(model)

    with pytest.raises(ExportError, match="lstsq_diag"):
        export_recovered(model, recovered, "lstsq_diag", tmp_path / "out")


def test_dense_export_raises(tmp_path):
    model = build_tiny_llama()
    recovered = recover(model)

    with pytest.raises(ExportError, match="dense"):
        export_recovered(model, recovered, "dense", tmp_path / "out")


# ---------------------------------------------------------------------------------- model card


RESULTS = {
    "stage": "val",
    "model": "tiny-llama",
    "ridge": 1e-4,
    "calibration_tokens": 248,
    "evaluation_tokens": 124,
    "data": {
        "tokenizer": "tiny-llama",
        "seq_len": 32,
        "calibration": {"source": "calibration.txt", "windows": 8, "seed": 0, "tokens": 601, "documents": 1},
        "evaluation": {"source": "evaluation.txt", "windows": 4, "target_tokens": 124, "documents": 1},
    },
    "perplexity": {"dense": 120.5, "pruned": 180.25, "ghost": 130.125},
}


def test_model_card_records_run(tmp_path):
    model = build_tiny_llama()
    recovered = recover(model)

    path = export_recovered(model, recovered, "ghost", tmp_path / "tiny", card=RESULTS)
    card = (path / "README.md").read_text()

    assert "`tiny-llama`" in card
    assert "Removed layers (0-based): [1, 2, 5]" in card
    assert "Method: `ghost`" in card
    assert "8 windows of 32 tokens drawn with seed 0 from `calibration.txt`" in card
    assert "| dense | 120.500 |" in card
    assert "| pruned | 180.250 |" in card
    assert "| ghost | 130.125 |" in card
    assert "trust_remote_code=True" in card


def test_card_from_results_selects_plan():
    results = {
        **RESULTS,
        "perplexity": {"dense": 10.0, "cosine-2/pruned": 20.0, "cosine-2/ghost": 12.0, "cosine-3/ghost": 15.0},
    }

    card = card_from_results(results, "cosine-2")

    assert card["perplexity"] == {"dense": 10.0, "pruned": 20.0, "ghost": 12.0}
    assert card["data"] == RESULTS["data"]


# ------------------------------------------------------------------------- the ghostpl command

SEQ_LEN = 32


def random_text(num_words: int, seed: int) -> str:
    generator = random.Random(seed)
    return " ".join(generator.choice(WORDS) for _ in range(num_words))


def command_args(subcommand: str, root: Path, export_dir: Path, *extra: str) -> list[str]:
    """Arguments of a CPU run on the tiny workspace that removes layers 2 and 3 and exports to ``export_dir``."""
    return [
        subcommand,
        "--seed_everything=0",
        f"--model.model={root / 'tiny-llama'}",
        "--model.criterion=indices",
        "--model.num_layers=null",
        "--model.layers=[2, 3]",
        "--model.progress=false",
        f"--model.export_dir={export_dir}",
        f"--data.calibration={root / 'calibration.txt'}",
        f"--data.evaluation={root / 'evaluation.txt'}",
        f"--data.seq_len={SEQ_LEN}",
        "--data.num_calibration=8",
        "--data.num_evaluation=4",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root / 'run'}",
        *extra,
    ]


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A tiny Llama saved with its word-level tokenizer, and calibration and evaluation text."""
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        hidden_size=HIDDEN_SIZE,
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
        LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny-llama")
    tokenizer.save_pretrained(tmp_path / "tiny-llama")
    (tmp_path / "calibration.txt").write_text(random_text(600, seed=1))
    (tmp_path / "evaluation.txt").write_text(random_text(300, seed=2))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ghostpl"])
    return tmp_path


@pytest.fixture
def word_batch(batch) -> dict[str, torch.Tensor]:
    """The random batch with token ids inside the word-level tokenizer's vocabulary."""
    return {**batch, "input_ids": batch["input_ids"] % len(build_tokenizer())}


@pytest.fixture
def cli_run(workspace):
    """Run ``ghostpl validate`` with ``model.export_dir``; return the CLI, the export and the run directory."""
    from ghostpl.cli import build_cli

    export_dir = workspace / "exported"
    cli = build_cli(args=command_args("validate", workspace, export_dir), run=True)
    return cli, export_dir, workspace / "run"


def test_validate_exports_model(cli_run, workspace, word_batch):
    cli, export_dir, run_dir = cli_run
    batch = word_batch
    results = json.loads((run_dir / "results.json").read_text())
    module = cli.model
    with module.recovered.variant("ghost"):
        expected = logits_of(module.model, batch)

    loaded = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()
    card = (export_dir / "README.md").read_text()

    mask = batch["attention_mask"].bool()
    assert_close(logits_of(loaded, batch)[mask], expected[mask], atol=1e-5, rtol=0)
    assert (export_dir / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(export_dir)("the lazy dog")["input_ids"][0] == 1
    assert "Removed layers (0-based): [2, 3]" in card
    assert f"| ghost | {results['perplexity']['ghost']:.3f} |" in card
    assert f"`{workspace / 'calibration.txt'}`" in card
    assert "Measured by `ghostpl validate` over 124 predicted tokens" in card


def test_export_run_matches_module_export(cli_run, tmp_path, word_batch):
    _, export_dir, run_dir = cli_run
    batch = word_batch

    path = export_run(run_dir, tmp_path / "from-run")

    module_export = load_exported(export_dir)
    run_export = load_exported(path)
    assert_close(logits_of(run_export, batch), logits_of(module_export, batch), atol=0, rtol=0)
    assert json.loads((path / "config.json").read_text())[OPERATORS_FIELD] == json.loads(
        (export_dir / "config.json").read_text()
    )[OPERATORS_FIELD]


def test_fit_exports_merged_lora(workspace, word_batch):
    from ghostpl.cli import build_cli
    from ghostpl.finetune import set_lora_enabled

    export_dir = workspace / "fine-tuned"
    fit_args = [
        "--data.num_train=4",
        "--trainer.max_steps=2",
        "--model.finetune.trainable=both",
        "--model.finetune.learning_rate=0.01",
    ]
    cli = build_cli(args=command_args("fit", workspace, export_dir, *fit_args), run=True)
    module = cli.model
    plan = module.plans[0]
    with module._variant(plan, "ghost"):
        expected = logits_of(module.model, word_batch)
    set_lora_enabled(module.lora_layers, False)
    with plan.recovered.variant("ghost"):
        without_lora = logits_of(module.model, word_batch)
    set_lora_enabled(module.lora_layers, True)
    # Training must have moved the LoRA weights, or the comparison below could not fail.
    assert (expected - without_lora).abs().max() > 1e-4

    loaded = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()

    mask = word_batch["attention_mask"].bool()
    assert_close(logits_of(loaded, word_batch)[mask], expected[mask], atol=1e-5, rtol=0)
    card = (export_dir / "README.md").read_text()
    assert "Method: `ghost`" in card
    assert "The `ghost` row is after fine-tuning (both, 2 steps)." in card


def test_export_dir_needs_single_plan(tmp_path):
    from ghostpl.module import GhostRecoveryModule

    with pytest.raises(ExportError, match="single plan"):
        GhostRecoveryModule(model="unused", num_layers=[1, 2], export_dir=str(tmp_path / "exported"))


def test_export_dir_existing_raises(tmp_path):
    from ghostpl.module import GhostRecoveryModule

    (tmp_path / "exported").mkdir()

    with pytest.raises(FileExistsError, match="export_overwrite"):
        GhostRecoveryModule(model="unused", export_dir=str(tmp_path / "exported"))
