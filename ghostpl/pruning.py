"""Remove decoder layers from a Hugging Face causal LM, reversibly.

Removing a layer touches three places besides the ``nn.ModuleList``: ``num_hidden_layers``, the
per-layer lists of the config (``layer_types`` selects each layer's attention mask in
transformers 5), and the ``layer_idx`` of each kept attention module, which indexes the KV cache.
A :class:`LayerPruner` switches a model between its dense and pruned layouts, so the dense model
can be evaluated beside the pruned one without a second copy of the weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ghostpl.boundaries import kept_layers, validate_removed_layers
from ghostpl.models import base_model, text_config


def _configs(model: nn.Module) -> list[Any]:
    """Return the configs that record the layer count: the model's, and its text config if separate."""
    configs = [model.config]
    inner = text_config(model)
    if inner is not model.config:
        configs.append(inner)
    base_config = getattr(base_model(model), "config", None)
    if base_config is not None and all(base_config is not c for c in configs):
        configs.append(base_config)
    return configs


def _per_layer_fields(config: Any, num_layers: int) -> list[str]:
    """Names of config attributes that hold one entry per decoder layer."""
    names = []
    for name, value in vars(config).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and len(value) == num_layers:
            names.append(name)
    return names


def _layer_indices(layer: nn.Module) -> list[tuple[nn.Module, int]]:
    """Return every submodule of ``layer`` that has an integer ``layer_idx``, with that index."""
    return [
        (module, module.layer_idx)
        for module in layer.modules()
        if isinstance(getattr(module, "layer_idx", None), int)
    ]


class LayerPruner:
    """Switches a model between its dense layout and one with ``removed`` layers taken out."""

    def __init__(self, model: nn.Module, removed: list[int]):
        self.model = model
        self.base = base_model(model)
        self.full_layers = self.base.layers
        self.num_layers = len(self.full_layers)
        self.removed = validate_removed_layers(removed, self.num_layers)
        self.kept = kept_layers(self.removed, self.num_layers)
        self._dense_config: list[dict[str, Any]] = []
        for config in _configs(model):
            values = {"num_hidden_layers": config.num_hidden_layers}
            for name in _per_layer_fields(config, self.num_layers):
                values[name] = getattr(config, name)
            if isinstance(getattr(config, "max_window_layers", None), int):
                values["max_window_layers"] = config.max_window_layers
            self._dense_config.append(values)
        self._dense_indices = [_layer_indices(layer) for layer in self.full_layers]
        self.is_pruned = False

    def prune(self) -> nn.Module:
        """Switch to the pruned layout; returns the model."""
        if self.is_pruned:
            return self.model
        self.base.layers = nn.ModuleList([self.full_layers[i] for i in self.kept])
        for config, dense in zip(_configs(self.model), self._dense_config):
            for name, value in dense.items():
                if name == "num_hidden_layers":
                    config.num_hidden_layers = len(self.kept)
                elif name == "max_window_layers":
                    config.max_window_layers = sum(1 for i in self.kept if i < value)
                else:
                    pruned = [value[i] for i in self.kept]
                    setattr(config, name, type(value)(pruned) if isinstance(value, tuple) else pruned)
        for new_index, old_index in enumerate(self.kept):
            for module, _ in self._dense_indices[old_index]:
                module.layer_idx = new_index
        self.is_pruned = True
        return self.model

    def restore(self) -> nn.Module:
        """Switch back to the dense layout; returns the model."""
        if not self.is_pruned:
            return self.model
        self.base.layers = self.full_layers
        for config, dense in zip(_configs(self.model), self._dense_config):
            for name, value in dense.items():
                setattr(config, name, value)
        for indices in self._dense_indices:
            for module, index in indices:
                module.layer_idx = index
        self.is_pruned = False
        return self.model

    @contextmanager
    def dense(self) -> Iterator[nn.Module]:
        """Run a block on the dense model, returning to the current layout afterwards."""
        was_pruned = self.is_pruned
        self.restore()
        try:
            yield self.model
        finally:
            if was_pruned:
                self.prune()

    @contextmanager
    def pruned(self) -> Iterator[nn.Module]:
        """Run a block on the pruned model, returning to the current layout afterwards."""
        was_pruned = self.is_pruned
        self.prune()
        try:
            yield self.model
        finally:
            if not was_pruned:
                self.restore()

    def new_index(self, old_index: int) -> int:
        """Index in the pruned model of kept layer ``old_index``."""
        return self.kept.index(old_index)


def prune_model(model: nn.Module, removed: list[int]) -> nn.Module:
    """Remove ``removed`` layers for good, dropping their weights."""
    LayerPruner(model, removed).prune()
    return model
