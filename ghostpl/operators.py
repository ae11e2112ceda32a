"""Modules installed at pruning boundaries of a pruned model.

Each boundary gets one :class:`BoundaryAdapter`. It is attached as a child module of the first
surviving layer after the gap (or of the final norm when the gap reaches the last layer), and a
forward pre-hook passes that module's input through the active operator. The operators of several
recovery methods can sit side by side in one adapter, which lets one model evaluate all of them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

ADAPTER_ATTRIBUTE = "ghost_adapter"


class LinearOperator(nn.Module):
    """``x ↦ x (I + M)``, stored as ``M`` so that zero is an exact identity.

    The parameter keeps its own dtype (float32 by default) whatever the model dtype, and the
    product is computed in that dtype and cast back.
    """

    def __init__(self, hidden_size: int, delta: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        weight = torch.zeros(hidden_size, hidden_size, dtype=dtype)
        if delta is not None:
            weight.copy_(delta.to(dtype))
        self.delta = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(self.delta.dtype)
        return (x32 + x32 @ self.delta).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """The full operator ``W = I + M``."""
        eye = torch.eye(self.delta.shape[0], dtype=self.delta.dtype, device=self.delta.device)
        return eye + self.delta


class BoundaryAdapter(nn.Module):
    """Operators of one boundary, keyed by method, of which at most one is active."""

    def __init__(self, boundary_name: str):
        super().__init__()
        self.boundary_name = boundary_name
        self.operators = nn.ModuleDict()
        self.active: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            return x
        return self.operators[self.active](x)


def _apply_adapter(module: nn.Module, args: tuple, kwargs: dict):
    adapter = getattr(module, ADAPTER_ATTRIBUTE)
    if adapter.active is None:
        return None
    if args:
        return (adapter(args[0]), *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = adapter(kwargs["hidden_states"])
    return args, kwargs


def attach_adapter(host: nn.Module, adapter: BoundaryAdapter) -> RemovableHandle:
    """Make ``adapter`` a child of ``host`` and apply it to the host's first input."""
    if hasattr(host, ADAPTER_ATTRIBUTE):
        raise ValueError(f"{type(host).__name__} already carries a boundary adapter.")
    host.add_module(ADAPTER_ATTRIBUTE, adapter)
    return host.register_forward_pre_hook(_apply_adapter, with_kwargs=True)


def iter_adapters(model: nn.Module):
    for module in model.modules():
        if isinstance(module, BoundaryAdapter):
            yield module


def set_active_method(model: nn.Module, method: str | None) -> None:
    """Activate ``method`` in every adapter of ``model``; ``None`` gives the plain pruned model."""
    for adapter in iter_adapters(model):
        if method is not None and method not in adapter.operators:
            raise KeyError(f"Boundary {adapter.boundary_name} has no operator for method {method!r}.")
        adapter.active = method


def install_adapters(hosts: dict[str, nn.Module]) -> tuple[dict[str, BoundaryAdapter], list[RemovableHandle]]:
    """Attach an empty adapter to each host, keyed by boundary name."""
    adapters: dict[str, BoundaryAdapter] = {}
    handles: list[RemovableHandle] = []
    for name, host in hosts.items():
        adapter = BoundaryAdapter(name)
        handles.append(attach_adapter(host, adapter))
        adapters[name] = adapter
    return adapters, handles
