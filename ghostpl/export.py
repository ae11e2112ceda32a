"""Export a pruned and recovered model as a Hugging Face model directory, and load one back.

What the directory contains depends on the method:

* A method on the stream input (ghost, linearpatch_diag, linearpatch_rotate, lstsq_diag) keeps one
  matrix ``M`` per boundary. ``model.safetensors`` contains the pruned weights and the matrices
  (``ghost_operators.<key>.delta``), and ``modeling_ghost.py`` and ``configuration_ghost.py``
  subclass the base architecture and apply ``x ↦ x (I + M)`` at each host. ``config.json`` names
  them in ``auto_map``, so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``
  loads the model with transformers and torch alone. Its ``model_type`` (``ghost_llama`` and so
  on) is unknown to transformers, so loading without ``trust_remote_code`` fails instead of
  silently dropping the operators.
* ``replaceme`` is folded into the down projection of the last kept layer before each gap, and
  ``pruned`` has no operator. Both are saved as the standard architecture, with no remote code.

An operator's key is the index, in the pruned model, of the layer whose input it transforms, or
``final_norm`` when the gap reaches the last layer. Every export also records ``ghostpl_export``
in ``config.json``: the method, the removed layers (0-based, in the unpruned model) and the
boundaries. Tokenizer files, the generation config and a model card (``README.md``) complete it.

The directory is written under a hidden temporary name beside the target and renamed into place
when complete, so an interrupted export never leaves a directory under the target name.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ghostpl.models import base_model, decoder_layers, final_norm, parse_dtype
from ghostpl.operators import OUTPUT, BoundaryAdapter, LinearOperator, activate, install_adapters
from ghostpl.recovery import DENSE, PRUNED, RecoveredModel, method_spec
from ghostpl.remote_code import render_remote_code

log = logging.getLogger(__name__)

EXPORT_RECORD = "ghostpl_export"
OPERATORS_FIELD = "ghost_operators"
OPERATOR_DTYPE_FIELD = "ghost_operator_dtype"
BASE_MODEL_TYPE_FIELD = "ghost_base_model_type"
BASE_ARCHITECTURE_FIELD = "ghost_base_architecture"
OPERATOR_PREFIX = f"{OPERATORS_FIELD}."
FINAL_NORM_KEY = "final_norm"
MODEL_CARD = "README.md"
# Commands behind the stage names that results.json records.
STAGE_NAMES = {"val": "ghostpl validate", "test": "ghostpl test", "fit": "ghostpl fit"}
REPLACEME = "replaceme"


class ExportError(ValueError):
    """A model, method or target directory that cannot be exported as requested."""


# --------------------------------------------------------------------------------------------------
# The plain pruned model: config, weights, rebuild
# --------------------------------------------------------------------------------------------------


def plain_config(model: nn.Module):
    """Return a copy of ``model.config`` in its current layout, without a quantization record.

    A model loaded from GGUF carries ``quantization_config`` (``quant_method: gguf``), and
    transformers 5 refuses to save it, although the legacy GGUF loader has de-quantised every
    weight into a plain tensor. The copy is built from the config's dict, so it has no such field.
    """
    config = model.config
    fields = config.to_dict()
    fields.pop("quantization_config", None)
    fields.pop("model_type", None)
    return type(config)(**fields)


def _adapter_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, BoundaryAdapter))


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Return peft's LoRA layers in ``model`` by name; empty when peft is not installed."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _merged_lora_tensors(name: str, layer: nn.Module, merge: bool) -> dict[str, torch.Tensor]:
    """Return the weight and bias of a LoRA layer's base ``nn.Linear``, with its enabled adapters added when ``merge``.

    The sum is formed in float32, so a bfloat16 base weight is not rounded twice before export.
    """
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear):
        raise ExportError(f"Cannot merge the LoRA adapter of {name}: its base layer is {type(base).__name__}, not nn.Linear.")
    weight = base.weight.detach()
    if merge and not layer.merged and not layer.disable_adapters:
        weight = weight.float()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).detach().float()
    tensors = {f"{name}.weight": weight}
    if base.bias is not None:
        tensors[f"{name}.bias"] = base.bias.detach()
    return tensors


def plain_state_dict(model: nn.Module, merge_lora: bool = True) -> dict[str, torch.Tensor]:
    """Return the model's tensors in its current layout, without those of ghostpl's adapters.

    A layer wrapped by a peft LoRA adapter is saved under its plain name, with the enabled
    adapters added to its weight when ``merge_lora`` is set and the base weight alone otherwise.
    Tied weights keep one tensor under both names. Raises :class:`ExportError` for a tensor that
    is not floating point, such as the packed blocks of a GGUF model loaded without de-quantising.
    """
    lora = _lora_layers(model)
    prefixes = _adapter_prefixes(model) + tuple(f"{name}." for name in lora)
    state = {}
    for name, layer in lora.items():
        state.update(_merged_lora_tensors(name, layer, merge_lora))
    for name, tensor in model.state_dict().items():
        if prefixes and name.startswith(prefixes):
            continue
        if not tensor.is_floating_point():
            raise ExportError(
                f"Cannot export tensor {name} of dtype {tensor.dtype}: only floating-point weights can be saved. "
                "A GGUF model loaded with packed weights must be loaded de-quantised, e.g. with "
                "quantization_config=GgufConfig(dequantize=True)."
            )
        state[name] = tensor.detach()
    return state


def _cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast every tensor to ``dtype`` on the CPU, casting a tensor shared by several names once."""
    cast: dict[int, torch.Tensor] = {}
    result = {}
    for name, tensor in state.items():
        key = id(tensor)
        if key not in cast:
            cast[key] = tensor.to(device="cpu", dtype=dtype)
        result[name] = cast[key]
    return result


def rebuild_plain_model(model: nn.Module, state: dict[str, torch.Tensor] | None = None, dtype: str | None = None):
    """Build a model of ``type(model)`` from :func:`plain_config` with the tensors ``state`` (default: the model's).

    The new model is built on the meta device and takes the tensors by assignment, so it shares
    their storage: only a cast to another ``dtype`` copies weights. Its non-persistent buffers
    (rotary frequencies) stay on the meta device, so the result serves ``save_pretrained`` and
    must not be run. Tied input and output embeddings are tied again.
    """
    config = plain_config(model)
    if state is None:
        state = plain_state_dict(model)
    torch_dtype = parse_dtype(dtype) if dtype is not None else next(iter(state.values())).dtype
    state = _cast_state(state, torch_dtype)
    config.dtype = torch_dtype
    with torch.device("meta"):
        fresh = type(model)(config)
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
        tied = set(getattr(fresh, "all_tied_weights_keys", {}) or {})
        missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise ExportError(
            f"The weights of {type(model).__name__} do not match a fresh model of its config: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}. Merge or remove modules that wrap the "
            "model's layers (LoRA adapters, for one) before exporting."
        )
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh


# --------------------------------------------------------------------------------------------------
# Operators and folding
# --------------------------------------------------------------------------------------------------


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _input_operators(recovered: RecoveredModel, method: str, dtype: torch.dtype) -> tuple[dict, dict]:
    """Return the config entries and the tensors of ``method``'s operators, in the pruned layout."""
    model, pruner = recovered.model, recovered.pruner
    names = _module_names(model)
    entries: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for boundary in recovered.boundaries:
        if boundary.end == pruner.num_layers:
            key, host = FINAL_NORM_KEY, final_norm(model)
        else:
            index = pruner.new_index(boundary.end)
            key, host = str(index), decoder_layers(model)[index]
        operator = recovered.adapters[boundary.name].operators[method]
        entries[key] = {"host": names[id(host)], "boundary": boundary.name, "removed_layers": boundary.removed}
        tensors[f"{OPERATOR_PREFIX}{key}.delta"] = operator.delta.detach().to(device="cpu", dtype=dtype).clone()
    return entries, tensors


def _check_foldable(layer: nn.Module, index: int) -> nn.Linear:
    if isinstance(getattr(layer, "post_feedforward_layernorm", None), nn.Module):
        raise ExportError(
            f"Cannot fold {REPLACEME} into layer {index} ({type(layer).__name__}): a norm follows its MLP, so the "
            "operator does not act on the down projection's output. Export a method on the stream input instead."
        )
    down_proj = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if not isinstance(down_proj, nn.Linear):
        raise ExportError(
            f"Cannot fold {REPLACEME} into layer {index} ({type(layer).__name__}): expected an nn.Linear at mlp.down_proj."
        )
    return down_proj


def _folded_weights(recovered: RecoveredModel, method: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Fold each boundary's output operator into a float64 copy of the down projection before the gap.

    Returns the new tensors by state-dict name, in the pruned layout, and the folded module of each
    boundary. The model's own weights are left unchanged.
    """
    from ghostpl.baselines import fold_replaceme

    model, pruner = recovered.model, recovered.pruner
    names = _module_names(model)
    tensors: dict[str, torch.Tensor] = {}
    hosts: dict[str, str] = {}
    for boundary in recovered.boundaries:
        index = pruner.new_index(boundary.start - 1)
        down_proj = _check_foldable(decoder_layers(model)[index], boundary.start - 1)
        copy_proj = nn.Linear(
            down_proj.in_features, down_proj.out_features, bias=down_proj.bias is not None, dtype=torch.float64
        )
        with torch.no_grad():
            copy_proj.weight.copy_(down_proj.weight)
            if down_proj.bias is not None:
                copy_proj.bias.copy_(down_proj.bias)
        operator = recovered.output_adapters[boundary.name].operators[method]
        fold_replaceme(copy_proj, operator.matrix().detach().to("cpu", torch.float64))
        name = names[id(down_proj)]
        tensors[f"{name}.weight"] = copy_proj.weight.detach()
        if down_proj.bias is not None:
            tensors[f"{name}.bias"] = copy_proj.bias.detach()
        hosts[boundary.name] = name
    return tensors, hosts


# --------------------------------------------------------------------------------------------------
# Writing the directory
# --------------------------------------------------------------------------------------------------


def _check_target(target: Path, overwrite: bool) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ExportError(f"Export target {target} exists and is not a directory: give a directory path.")
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"Export target {target} already exists: remove it, choose another path, or pass overwrite=True to replace it."
        )


def _publish(partial: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished ``partial`` directory to ``target``, swapping out an existing one with ``overwrite``."""
    _check_target(target, overwrite)
    if not target.exists():
        os.rename(partial, target)
        return
    previous = target.parent / f".{target.name}.previous-{os.getpid()}"
    if previous.exists():
        shutil.rmtree(previous)
    os.rename(target, previous)
    try:
        os.rename(partial, target)
    except BaseException:
        os.rename(previous, target)
        raise
    shutil.rmtree(previous)


def _write_weights(directory: Path, plain, state: dict[str, torch.Tensor]) -> None:
    plain.save_pretrained(directory, state_dict=state)


def _write_remote_code(directory: Path, files: dict[str, str], config_updates: dict[str, Any]) -> None:
    """Write the modeling files and point ``config.json`` at them."""
    for name, text in files.items():
        (directory / name).write_text(text)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config.update(config_updates)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(directory: Path, tokenizer) -> None:
    tokenizer.save_pretrained(directory)


def _write_model_card(directory: Path, text: str) -> None:
    (directory / MODEL_CARD).write_text(text)


def _match_permissions(directory: Path, reference: Path) -> None:
    """Give every file in ``directory`` the permission bits of ``reference``.

    The safetensors writer of transformers 5.25 leaves ``model.safetensors`` readable by its owner
    alone (mode 0600), while files written with ``open`` follow the umask.
    """
    mode = reference.stat().st_mode & 0o777
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(mode)


def _base_names(model: nn.Module) -> dict[str, str]:
    """Module paths and class names of the model's transformers architecture, for the remote code."""
    model_class, config_class = type(model), type(model.config)
    for cls in (model_class, config_class):
        if not cls.__module__.startswith("transformers.models."):
            raise ExportError(
                f"Cannot export {cls.__name__} from {cls.__module__} with remote code: the base architecture must be "
                "one that transformers ships, such as Llama, SmolLM2, Mistral or Qwen2."
            )
    if base_model(model) is not getattr(model, "model", None):
        raise ExportError(f"Cannot export {model_class.__name__}: expected its decoder stack at the attribute 'model'.")
    return {
        "model_module": model_class.__module__,
        "base_class": model_class.__name__,
        "config_module": config_class.__module__,
        "base_config": config_class.__name__,
        "base_model_type": model.config.model_type,
    }


def check_export_settings(path: str | os.PathLike | None, dtype: str, overwrite: bool, num_plans: int) -> None:
    """Raise before a run starts on export settings that would fail at its end.

    ``path`` may be ``None``, which exports nothing and skips the other checks.
    """
    if path is None:
        return
    parse_dtype(dtype)
    if num_plans != 1:
        raise ExportError(
            f"export_dir needs a single plan, but the config compares {num_plans}: set one criterion and num_layers, "
            "or export one plan of the finished run with python -m ghostpl.export --run-dir RUN --plan LABEL."
        )
    target = Path(path).expanduser()
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"Export directory {target} already exists: remove it, choose another export_dir, or set export_overwrite."
        )


def export_recovered(
    model: nn.Module,
    recovered: RecoveredModel,
    method: str | None,
    path: str | os.PathLike,
    dtype: str = "float32",
    operator_dtype: str = "float32",
    tokenizer=None,
    card: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the pruned model with ``method``'s repair to the directory ``path``, and return it.

    Args:
        model: The model that ``recovered`` prunes. It may be in its dense or pruned layout, and
            is left as it was.
        recovered: The pruning and the installed operators.
        method: A method installed in ``recovered``, or ``"pruned"`` (or ``None``) for no repair.
        path: The directory to create. Its parent is created when missing.
        dtype: Dtype of the exported weights: float32, bfloat16 or float16.
        operator_dtype: Dtype of the operators of a method on the stream input: float32, or the
            same as ``dtype``. A folded method (replaceme) is folded in float64 and cast to ``dtype``.
        tokenizer: A tokenizer whose files are saved beside the weights, or ``None``.
        card: Facts for the model card, all optional: ``model`` (the base model's name), ``data``
            (the data module's summary), ``perplexity`` (``{"dense": .., "pruned": .., method: ..}``),
            ``evaluation_tokens``, ``calibration_tokens``, ``ridge``, ``stage`` and ``fine_tune``.
            A single-plan ``results.json`` payload has this shape, and :func:`card_from_results`
            selects one plan of several.
        overwrite: Replace an existing directory at ``path``. Without it, an existing path raises
            ``FileExistsError`` before anything is written.

    Raises:
        ExportError: for a method that is not installed or cannot be exported, an invalid dtype
            pair, or weights that cannot be saved.
    """
    target = Path(path).expanduser().absolute()
    method = PRUNED if method is None else method
    parse_dtype(dtype)
    operator_torch_dtype = parse_dtype(operator_dtype)
    if operator_dtype not in ("float32", dtype):
        raise ExportError(
            f"Invalid operator_dtype {operator_dtype!r} for dtype {dtype!r}: set float32 or the export dtype."
        )
    if method == DENSE:
        raise ExportError("The dense model has no pruning to export: save it with save_pretrained instead.")
    if method != PRUNED and method not in recovered.methods:
        raise ExportError(
            f"Method {method!r} is not installed in this model: export one of {', '.join([PRUNED, *recovered.methods])}."
        )
    if recovered.model is not model:
        raise ExportError("recovered does not prune this model: pass the model that RecoveredModel.build was given.")
    _check_target(target, overwrite)

    with recovered.pruner.pruned():
        plan = _plan_export(recovered, method, operator_torch_dtype)
        plain = rebuild_plain_model(model, plan.state, dtype)
    plain.config.update({EXPORT_RECORD: plan.record})
    state = {**plain.state_dict(), **plan.operators}
    text = model_card(target.name, plan.record, card, dtype, remote=bool(plan.operators))

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        _write_weights(partial, plain, state)
        if plan.operators:
            _write_remote_code(partial, plan.files, plan.config_updates)
        if tokenizer is not None:
            _write_tokenizer(partial, tokenizer)
        _write_model_card(partial, text)
        _match_permissions(partial, partial / MODEL_CARD)
        _publish(partial, target, overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("Exported %s with method %s (%s weights) to %s", type(model).__name__, method, dtype, target)
    return target


@dataclass
class _ExportPlan:
    """The contents of one export.

    Attributes:
        state: Weights of the plain pruned model, by state-dict name, folded operators included.
        operators: Operator tensors saved beside them (``ghost_operators.<key>.delta``).
        record: The ``ghostpl_export`` entry of ``config.json``.
        files: Remote-code file texts by file name, for an export with operators.
        config_updates: Fields that replace those of the saved ``config.json``.
    """

    state: dict[str, torch.Tensor]
    operators: dict[str, torch.Tensor]
    record: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    config_updates: dict[str, Any] = field(default_factory=dict)


def _plan_export(recovered: RecoveredModel, method: str, operator_dtype: torch.dtype) -> _ExportPlan:
    """Collect the weights, operators and config fields of ``method``; the model must be in its pruned layout."""
    model, pruner = recovered.model, recovered.pruner
    # LoRA adapters belong to the repaired model, so the plain pruned model leaves them out.
    state = plain_state_dict(model, merge_lora=method != PRUNED)
    boundaries = [{"name": b.name, "removed_layers": b.removed} for b in recovered.boundaries]
    record: dict[str, Any] = {
        "method": method,
        "removed_layers": list(pruner.removed),
        "num_hidden_layers_before": pruner.num_layers,
        "num_hidden_layers": len(pruner.kept),
        "boundaries": boundaries,
    }
    if method == PRUNED:
        return _ExportPlan(state, {}, record)
    if method_spec(method).position == OUTPUT:
        folded, hosts = _folded_weights(recovered, method)
        state.update(folded)
        for entry in boundaries:
            entry["folded_into"] = hosts[entry["name"]]
        return _ExportPlan(state, {}, record)

    names = _base_names(model)
    entries, operators = _input_operators(recovered, method, operator_dtype)
    operator_dtype_name = str(operator_dtype).removeprefix("torch.")
    record["operator_dtype"] = operator_dtype_name
    for entry in boundaries:
        entry["operator"] = next(key for key, value in entries.items() if value["boundary"] == entry["name"])
    files, auto_map, model_type = render_remote_code(**names)
    config_updates = {
        "model_type": model_type,
        "architectures": [f"Ghost{names['base_class']}"],
        "auto_map": auto_map,
        OPERATORS_FIELD: entries,
        OPERATOR_DTYPE_FIELD: operator_dtype_name,
        BASE_MODEL_TYPE_FIELD: names["base_model_type"],
        BASE_ARCHITECTURE_FIELD: names["base_class"],
    }
    return _ExportPlan(state, operators, record, files, config_updates)


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------


def _format_layers(layers: Sequence[int]) -> str:
    """Write sorted indices as ranges: ``[3, 13, 14, 15]`` becomes ``3, 13–15``."""
    runs: list[list[int]] = []
    for index in layers:
        if runs and runs[-1][-1] + 1 == index:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}–{run[-1]}" for run in runs)


def _data_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    seq_len = data.get("seq_len")
    calibration = data.get("calibration") or {}
    evaluation = data.get("evaluation") or {}
    if calibration:
        lines.append(
            f"- Calibration: {calibration.get('windows')} windows of {seq_len} tokens drawn with seed "
            f"{calibration.get('seed')} from `{calibration.get('source')}` (a stream of {calibration.get('tokens')} "
            f"tokens in {calibration.get('documents')} documents)."
        )
    if evaluation:
        lines.append(
            f"- Evaluation: {evaluation.get('windows')} windows of {seq_len} tokens from `{evaluation.get('source')}` "
            f"({evaluation.get('target_tokens')} predicted tokens, {evaluation.get('documents')} documents)."
        )
    if data.get("tokenizer"):
        lines.append(f"- Tokenizer: `{data['tokenizer']}`.")
    return lines


def model_card(name: str, record: dict[str, Any], card: dict[str, Any] | None, dtype: str, remote: bool) -> str:
    """Write the ``README.md`` of an export from its ``ghostpl_export`` record and the facts in ``card``."""
    card = card or {}
    method = record["method"]
    base = card.get("model") or "the base model"
    removed = record["removed_layers"]
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- ghostpl",
        "- pruned",
        "---",
        "",
        f"# {name}",
        "",
        f"`{base}` with {len(removed)} of its {record['num_hidden_layers_before']} decoder layers removed by ghostpl "
        f"(layers {_format_layers(removed)}, 0-based), leaving {record['num_hidden_layers']}.",
        "",
    ]
    if remote:
        lines += [
            f"Each gap is repaired by a `{method}` operator `x ↦ x (I + M)` applied to the residual stream entering "
            f"the first layer after it (or the final norm). `modeling_ghost.py` applies them, so loading needs "
            "`trust_remote_code=True`; the file imports only torch and transformers.",
        ]
    elif method == PRUNED:
        lines += ["The gaps are not repaired: this is the plain pruned model, in the standard architecture."]
    else:
        lines += [
            f"Each gap is repaired by a `{method}` operator folded into the MLP down projection of the last kept layer "
            "before it, so the model has the standard architecture and needs no remote code.",
        ]
    load = "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" if remote else (
        "AutoModelForCausalLM.from_pretrained(path)"
    )
    lines += [
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = "{name}"',
        f"model = {load}",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
        "",
        "## Pruning",
        "",
        f"- Base model: `{base}`",
        f"- Removed layers (0-based): {removed}",
        f"- Method: `{method}`",
        f"- Weights: {dtype}" + (f", operators: {record['operator_dtype']}" if "operator_dtype" in record else ""),
    ]
    for boundary in record["boundaries"]:
        if "operator" in boundary:
            where = f"operator `{boundary['operator']}`"
        elif "folded_into" in boundary:
            where = f"folded into `{boundary['folded_into']}`"
        else:
            where = "no operator"
        lines.append(f"- Boundary {boundary['name']} (removed layers {boundary['removed_layers']}): {where}")
    if card.get("ridge") is not None:
        lines.append(f"- Relative ridge: {card['ridge']}")

    data = card.get("data") or {}
    lines += ["", "## Calibration data", ""]
    lines += _data_lines(data) or ["Not recorded for this export."]
    if card.get("calibration_tokens") is not None:
        lines.append(f"- Calibration tokens seen by the solver: {card['calibration_tokens']}.")

    perplexity = card.get("perplexity") or {}
    lines += ["", "## Held-out perplexity", ""]
    variants = [variant for variant in dict.fromkeys((DENSE, PRUNED, method)) if variant in perplexity]
    rows = [(variant, perplexity[variant]) for variant in variants]
    if rows:
        lines += ["| variant | perplexity |", "|---|---:|"]
        for variant, value in rows:
            lines.append(f"| {variant} | {value:.3f} |" if value is not None else f"| {variant} | n/a |")
        tokens = card.get("evaluation_tokens")
        stage = card.get("stage")
        note = f"Measured by `{STAGE_NAMES.get(stage, stage)}`" if stage else "Measured by ghostpl"
        if tokens is not None:
            note += f" over {tokens} predicted tokens"
        lines += ["", note + ", in the dtype the run used, before export."]
        fine_tune = card.get("fine_tune") or {}
        training_free = (fine_tune.get("perplexity") or {}).get("training_free")
        if training_free is not None:
            lines.append(
                f"The `{method}` row is after fine-tuning ({fine_tune.get('trainable')}, {fine_tune.get('steps')} steps). "
                f"The training-free operator gave {training_free:.3f}."
            )
    else:
        lines.append("Not measured for this export.")
    return "\n".join(lines) + "\n"


def card_from_results(results: dict[str, Any], label: str = "") -> dict[str, Any]:
    """Select the model-card facts of one plan from a ``results.json`` payload."""
    prefix = f"{label}/" if label else ""
    perplexity = {}
    for name, value in (results.get("perplexity") or {}).items():
        if name == DENSE:
            perplexity[DENSE] = value
        elif name.startswith(prefix) and "/" not in name[len(prefix):]:
            perplexity[name[len(prefix):]] = value
    keys = ("model", "data", "evaluation_tokens", "calibration_tokens", "ridge", "stage", "fine_tune")
    return {**{key: results.get(key) for key in keys}, "perplexity": perplexity}


# --------------------------------------------------------------------------------------------------
# Loading an export with ghostpl, without remote code
# --------------------------------------------------------------------------------------------------


@functools.cache
def _ignoring_operators(base_class: type) -> type:
    """Return a subclass of ``base_class`` whose ``from_pretrained`` skips the operator tensors without a warning.

    ghostpl reads those tensors itself and installs them as adapters.
    """
    return type(base_class.__name__, (base_class,), {"_keys_to_ignore_on_load_unexpected": [rf"^{OPERATORS_FIELD}\."]})


def _read_operator_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors = {}
    for file in files:
        with safe_open(directory / file, framework="pt") as handle:
            for name in handle.keys():
                if name.startswith(OPERATOR_PREFIX):
                    tensors[name] = handle.get_tensor(name)
    return tensors


def load_exported(path: str | os.PathLike, dtype: str | None = None, **kwargs):
    """Load an export with ghostpl's adapters, without running its remote code.

    A standard export (replaceme, pruned) loads with ``AutoModelForCausalLM``. For an export with
    operators, the base architecture is built from ``config.json`` and each operator is installed
    as a :class:`~ghostpl.operators.BoundaryAdapter` at its host, with the exported method
    active. The model's class is a subclass of the base class, of the same name, that skips the
    operator tensors when loading. ``dtype`` (float32, bfloat16, float16) sets the weights' dtype,
    and ``None`` keeps the saved one. Operators keep their saved dtype. ``kwargs`` go to
    ``from_pretrained``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    directory = Path(path)
    fields = json.loads((directory / "config.json").read_text())
    load_dtype = parse_dtype(dtype) if dtype is not None else "auto"
    if OPERATORS_FIELD not in fields:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=load_dtype, **kwargs).eval()

    entries = fields[OPERATORS_FIELD]
    base_type = fields[BASE_MODEL_TYPE_FIELD]
    method = fields.get(EXPORT_RECORD, {}).get("method", "ghost")
    dropped = (
        "model_type",
        "auto_map",
        "architectures",
        OPERATORS_FIELD,
        OPERATOR_DTYPE_FIELD,
        BASE_MODEL_TYPE_FIELD,
        BASE_ARCHITECTURE_FIELD,
    )
    config = AutoConfig.for_model(base_type, **{k: v for k, v in fields.items() if k not in dropped})
    config.architectures = [fields[BASE_ARCHITECTURE_FIELD]]
    model_class = _ignoring_operators(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
    model = model_class.from_pretrained(directory, config=config, dtype=load_dtype, **kwargs).eval()

    tensors = _read_operator_tensors(directory)
    hosts = {entry["boundary"]: model.get_submodule(entry["host"]) for entry in entries.values()}
    adapters, _ = install_adapters(hosts)
    for key, entry in entries.items():
        delta = tensors[f"{OPERATOR_PREFIX}{key}.delta"]
        device = next(hosts[entry["boundary"]].parameters()).device
        operator = LinearOperator(delta.shape[0], delta, dtype=delta.dtype)
        adapters[entry["boundary"]].operators[method] = operator.to(device)
    activate(list(adapters.values()), method)
    return model


# --------------------------------------------------------------------------------------------------
# Exporting a finished run
# --------------------------------------------------------------------------------------------------


def _select_plan(results: dict[str, Any], label: str | None) -> dict[str, Any]:
    plans = results.get("plans") or []
    labels = [plan["label"] for plan in plans]
    if label is None:
        if len(plans) != 1:
            raise ExportError(f"The run compares {len(plans)} plans: choose one with --plan, one of {labels}.")
        return plans[0]
    for plan in plans:
        if plan["label"] == label:
            return plan
    raise ExportError(f"Plan {label!r} not found in the run: choose one of {labels}.")


def export_run(
    run_dir: str | os.PathLike,
    output: str | os.PathLike,
    plan: str | None = None,
    method: str | None = None,
    dtype: str = "float32",
    operator_dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Export one plan of a finished run from its ``results.json`` and ``operators.safetensors``.

    The model is loaded again from the spec in ``results.json`` and pruned as recorded, and the
    solved operators are installed from ``operators.safetensors``, so no calibration runs. Weights
    trained after the solve are not in these files: export such a model from the module instead
    (``model.export_dir``).
    """
    from safetensors.torch import load_file

    from ghostpl.models import load_model, load_tokenizer
    from ghostpl.solvers import Solution

    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    selected = _select_plan(results, plan)
    label = selected["label"]
    methods = [m for m in results["methods"] if m not in selected.get("skipped_methods", {})]
    method = method or (methods[0] if methods else PRUNED)
    if method != PRUNED and method not in methods:
        raise ExportError(f"Method {method!r} was not solved for this plan: choose one of {', '.join([PRUNED, *methods])}.")

    model = load_model(results["model"], results["dtype"])
    recovered = RecoveredModel.build(model, selected["removed_layers"])
    if method != PRUNED:
        stored = load_file(run_dir / "operators.safetensors")
        prefix = f"{label}/" if label else ""
        solutions = {}
        for boundary in selected["boundaries"]:
            facts = boundary["methods"][method]
            solutions[boundary["name"]] = Solution(
                delta=stored[f"{prefix}{method}/{boundary['name']}"],
                ridge=facts["ridge"],
                solver=facts["solver"],
                residual=facts["relative_residual"],
                guarded_channels=facts.get("guarded_channels", 0),
            )
        recovered.add_method(method, solutions)
    return export_recovered(
        model,
        recovered,
        method,
        output,
        dtype=dtype,
        operator_dtype=operator_dtype,
        tokenizer=load_tokenizer(results["model"]),
        card=card_from_results(results, label),
        overwrite=overwrite,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ghostpl.export",
        description=(
            "Export one plan of a finished ghostpl validate or test run as a Hugging Face model directory. "
            "The run directory must contain results.json and operators.safetensors."
        ),
    )
    parser.add_argument("--run-dir", required=True, help="log directory of the run (contains results.json)")
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument("--plan", default=None, help="plan label, required when the run compares several plans")
    parser.add_argument("--method", default=None, help="method to export, or 'pruned'; default: the run's first method")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    parser.add_argument(
        "--operator-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="operator dtype"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ghostpl").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    export_run(
        args.run_dir,
        args.output,
        plan=args.plan,
        method=args.method,
        dtype=args.dtype,
        operator_dtype=args.operator_dtype,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    main()
