"""Modules installed at pruning boundaries of a pruned model.

Each boundary gets one input :class:`BoundaryAdapter`. It is attached as a child module of the
first surviving layer after the gap (or of the final norm when the gap reaches the last layer), and
a forward pre-hook passes that module's input through the active operator. A method whose operator
acts on a module's output instead (replaceme, on the MLP output of the last kept layer before the
gap) gets a second, output adapter per boundary, applied by a forward hook. The operators of several
recovery methods can sit side by side in one adapter, which lets one model evaluate all of them. An
adapter with no operator for the active method passes its tensor through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

ADAPTER_ATTRIBUTE = "ghost_adapter"

# Adapter positions: the host's first input (a forward pre-hook) or the host's output (a forward hook).
INPUT = "input"
OUTPUT = "output"
POSITIONS = (INPUT, OUTPUT)


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
        """Return the full operator ``W = I + M``."""
        eye = torch.eye(self.delta.shape[0], dtype=self.delta.dtype, device=self.delta.device)
        return eye + self.delta


class BoundaryAdapter(nn.Module):
    """Operators of one boundary, keyed by method, of which at most one is active.

    ``position`` records whether the adapter transforms its host's input or its output.
    """

    def __init__(self, boundary_name: str, position: str = INPUT):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"Invalid adapter position {position!r}: set one of {', '.join(POSITIONS)}.")
        self.boundary_name = boundary_name
        self.position = position
        self.operators = nn.ModuleDict()
        self.active: str | None = None

    @property
    def applies(self) -> bool:
        """True when the active method has an operator here. Otherwise the adapter is the identity."""
        return self.active is not None and self.active in self.operators

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.applies:
            return x
        return self.operators[self.active](x)


def _input_hook(adapter: BoundaryAdapter):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if not adapter.applies:
            return None
        if args:
            return (adapter(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = adapter(kwargs["hidden_states"])
        return args, kwargs

    return hook


def _output_hook(adapter: BoundaryAdapter):
    def hook(module: nn.Module, args: tuple, output):
        if not adapter.applies:
            return None
        if isinstance(output, torch.Tensor):
            return adapter(output)
        return (adapter(output[0]), *output[1:])

    return hook


def attach_adapter(host: nn.Module, adapter: BoundaryAdapter, attribute: str = ADAPTER_ATTRIBUTE) -> RemovableHandle:
    """Make ``adapter`` the child ``attribute`` of ``host`` and apply it to the host's first input or output.

    The adapter's ``position`` selects which. An output that is a tuple has its first element
    transformed. Several adapters can share a host under different attribute names.
    """
    if hasattr(host, attribute):
        raise ValueError(f"{type(host).__name__} already carries a boundary adapter named {attribute!r}.")
    host.add_module(attribute, adapter)
    if adapter.position == OUTPUT:
        return host.register_forward_hook(_output_hook(adapter))
    return host.register_forward_pre_hook(_input_hook(adapter), with_kwargs=True)


def iter_adapters(model: nn.Module):
    for module in model.modules():
        if isinstance(module, BoundaryAdapter):
            yield module


def set_active_method(model: nn.Module, method: str | None) -> None:
    """Activate ``method`` in every adapter of ``model``; ``None`` gives the plain pruned model.

    Raises ``KeyError`` if some boundary has no operator for ``method`` in any of its adapters.
    """
    activate(list(iter_adapters(model)), method)


def activate(adapters: list[BoundaryAdapter], method: str | None) -> None:
    """Activate ``method`` in ``adapters``, raising ``KeyError`` if a boundary lacks its operator."""
    if method is not None:
        boundaries = {adapter.boundary_name for adapter in adapters}
        covered = {adapter.boundary_name for adapter in adapters if method in adapter.operators}
        missing = sorted(boundaries - covered)
        if missing:
            raise KeyError(f"Boundary {missing[0]} has no operator for method {method!r}.")
    for adapter in adapters:
        adapter.active = method


def install_adapters(
    hosts: dict[str, nn.Module], position: str = INPUT, attribute: str = ADAPTER_ATTRIBUTE
) -> tuple[dict[str, BoundaryAdapter], list[RemovableHandle]]:
    """Attach an empty adapter at ``position`` to each host, keyed by boundary name."""
    adapters: dict[str, BoundaryAdapter] = {}
    handles: list[RemovableHandle] = []
    for name, host in hosts.items():
        adapter = BoundaryAdapter(name, position)
        handles.append(attach_adapter(host, adapter, attribute))
        adapters[name] = adapter
    return adapters, handles
