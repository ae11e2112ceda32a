"""Calibration passes over the unpruned model: forward hooks feed the pure accumulators.

Hooks read the residual stream entering a decoder layer (the layer's first input) and, for the
last boundary, the input of the final norm. Methods that need the MLP branch output of the last
kept layer before a boundary add a forward hook on that branch. A pass stops by raising
:class:`StopForward` from the last hook it needs, so no work is spent on later layers or on the LM
head.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ghostpl.boundaries import Boundary
from ghostpl.hadamard import hadamard_matrix
from ghostpl.models import decoder_layers, final_norm, text_config
from ghostpl.selection import SimilarityStatistics
from ghostpl.statistics import MLP_OUTPUT, ROTATED_ABS, BoundaryStatistics, check_extra_kinds


class StopForward(Exception):
    """Raised by a hook once every statistic of the batch has been taken."""


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def stream_input_module(model: nn.Module, index: int) -> nn.Module:
    """Return the module whose first input is ``h_index``: layer ``index``, or the final norm for ``L``."""
    layers = decoder_layers(model)
    if index == len(layers):
        return final_norm(model)
    return layers[index]


def mlp_branch_module(model: nn.Module, index: int) -> nn.Module:
    """Return the module of layer ``index`` whose output is the MLP term added to the residual stream.

    That is the MLP itself in Llama, Mistral and Qwen2, and the norm after it
    (``post_feedforward_layernorm``) in Gemma 3.
    """
    layer = decoder_layers(model)[index]
    post_norm = getattr(layer, "post_feedforward_layernorm", None)
    if isinstance(post_norm, nn.Module):
        return post_norm
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise ValueError(f"Cannot find the MLP of decoder layer {index} ({type(layer).__name__}): expected an attribute 'mlp'.")
    return mlp


def check_kept_layer_before(boundaries: Sequence[Boundary], method: str) -> None:
    """Raise if a boundary starts at layer 0, where no kept layer's MLP output precedes the gap."""
    for boundary in boundaries:
        if boundary.start == 0:
            raise ValueError(
                f"{method} needs a kept layer before the first removed one, but boundary {boundary.name} "
                "starts at layer 0: keep layer 0, or use ghost, whose operator acts on the stream itself."
            )


def rotation_for(hidden_size: int, method: str = "linearpatch_rotate") -> torch.Tensor:
    """Return the normalised Hadamard matrix of ``hidden_size``, or raise a ``ValueError`` that names ``method``."""
    try:
        return hadamard_matrix(hidden_size)
    except ValueError as error:
        raise ValueError(
            f"{method} cannot rotate hidden size {hidden_size}. {error} Use linearpatch_diag for this model."
        ) from error


@contextmanager
def capture_inputs(hosts: dict[str, nn.Module]):
    """Record the first input of each host module during the block, as ``{name: (B, T, D)}``.

    The hooks are registered last, so on a host that also carries an adapter they see the input
    after the adapter's operator. Gradients flow through the recorded tensors.
    """
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module, args, kwargs):
            captured[name] = _first_input(args, kwargs)

        return hook

    handles = [host.register_forward_pre_hook(capture(name), with_kwargs=True) for name, host in hosts.items()]
    with _hooks(handles):
        yield captured


@contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _run(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except StopForward:
        pass


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def collect_boundary_statistics(
    model: nn.Module,
    boundaries: Sequence[Boundary],
    batches: Iterable[dict[str, torch.Tensor]],
    progress: bool = True,
    description: str = "Calibrating boundaries",
    extras: Collection[str] = (),
) -> list[BoundaryStatistics]:
    """Accumulate each boundary's float64 sums over ``batches`` in one pass of the dense model.

    Each batch contains ``input_ids`` and ``attention_mask`` of shape ``(B, T)``. Positions with
    mask 0 never enter a sum. The pass stops after the input of the last boundary's end layer.

    ``extras`` names the optional sums to collect in the same pass (see
    :data:`ghostpl.statistics.EXTRA_KINDS`): ``rotated_abs`` rotates both streams by the normalised
    Hadamard matrix of the hidden size, and ``mlp_output`` hooks the MLP branch of layer
    ``start - 1`` of every boundary that does not start at layer 0.
    """
    if not boundaries:
        raise ValueError("No boundaries to calibrate: remove at least one layer.")
    extras = check_extra_kinds(extras)
    device = _device_of(model)
    rotation = None
    if ROTATED_ABS in extras:
        rotation = rotation_for(int(text_config(model).hidden_size)).to(device)
    with_mlp = MLP_OUTPUT in extras
    # A boundary at layer 0 has no kept MLP before it, so its statistics go without the MLP sums.
    boundary_extras = [
        [kind for kind in extras if kind != MLP_OUTPUT or boundary.start > 0] for boundary in boundaries
    ]
    stats: list[BoundaryStatistics | None] = [None] * len(boundaries)
    pending: dict[int, torch.Tensor] = {}
    pending_mlp: dict[int, torch.Tensor] = {}
    token_mask: list[torch.Tensor] = []
    last = max(b.end for b in boundaries)

    def capture_pre(position: int):
        def hook(module, args, kwargs):
            pending[position] = _first_input(args, kwargs)[token_mask[0]]  # (N, D)

        return hook

    def capture_mlp(position: int):
        def hook(module, args, output):
            branch = output if isinstance(output, torch.Tensor) else output[0]
            pending_mlp[position] = branch[token_mask[0]]  # (N, D)

        return hook

    def capture_post(positions: list[int], stop: bool):
        def hook(module, args, kwargs):
            x_post = _first_input(args, kwargs)[token_mask[0]]  # (N, D)
            for position in positions:
                x_pre = pending.pop(position)
                if stats[position] is None:
                    stats[position] = BoundaryStatistics.zeros(
                        x_pre.shape[-1], device=x_pre.device, extras=boundary_extras[position]
                    )
                mlp_output = pending_mlp.pop(position, None)
                stats[position].add(x_pre, x_post, rotation=rotation, mlp_output=mlp_output)
            if stop:
                raise StopForward

        return hook

    handles = []
    for position, boundary in enumerate(boundaries):
        module = stream_input_module(model, boundary.start)
        handles.append(module.register_forward_pre_hook(capture_pre(position), with_kwargs=True))
        if MLP_OUTPUT in boundary_extras[position]:
            branch = mlp_branch_module(model, boundary.start - 1)
            handles.append(branch.register_forward_hook(capture_mlp(position)))
    # Boundaries of different plans can end at the same layer: one hook serves them all, so the
    # hook that stops the pass runs after every boundary that ends there has its sums.
    ends: dict[int, list[int]] = {}
    for position, boundary in enumerate(boundaries):
        ends.setdefault(boundary.end, []).append(position)
    for end, positions in ends.items():
        hook = capture_post(positions, stop=end == last)
        handles.append(stream_input_module(model, end).register_forward_pre_hook(hook, with_kwargs=True))

    with _hooks(handles):
        for batch in tqdm(batches, desc=description, disable=not progress, leave=False):
            batch = _to_device(batch, device)
            token_mask[:] = [batch["attention_mask"].bool()]
            _run(model, batch)
            pending.clear()
            pending_mlp.clear()

    if any(s is None for s in stats):
        raise ValueError("The calibration data had no batches: give at least one calibration window.")
    return stats  # type: ignore[return-value]


@torch.no_grad()
def collect_similarity_statistics(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    progress: bool = True,
    description: str = "Calibrating selection",
) -> SimilarityStatistics:
    """Accumulate the cosine and angular distance between every pair of residual-stream states.

    ``h_0 … h_L`` are the inputs of the ``L`` decoder layers and of the final norm. The pass stops
    at the final norm, so the LM head never runs.
    """
    layers = decoder_layers(model)
    num_states = len(layers) + 1
    device = _device_of(model)
    states: list[torch.Tensor] = []
    token_mask: list[torch.Tensor] = []
    result: SimilarityStatistics | None = None

    def capture(stop: bool):
        def hook(module, args, kwargs):
            states.append(_first_input(args, kwargs)[token_mask[0]])  # (N, D)
            if stop:
                raise StopForward

        return hook

    handles = [layer.register_forward_pre_hook(capture(False), with_kwargs=True) for layer in layers]
    handles.append(final_norm(model).register_forward_pre_hook(capture(True), with_kwargs=True))
    with _hooks(handles):
        for batch in tqdm(batches, desc=description, disable=not progress, leave=False):
            batch = _to_device(batch, device)
            token_mask[:] = [batch["attention_mask"].bool()]
            states.clear()
            _run(model, batch)
            if len(states) != num_states:
                raise RuntimeError(f"Captured {len(states)} residual-stream states, expected {num_states}.")
            if result is None:
                result = SimilarityStatistics.zeros(num_states, device=device)
            result.add(torch.stack(states))  # (L + 1, N, D)
            states.clear()
    if result is None:
        raise ValueError("The calibration data had no batches: give at least one calibration window.")
    return result
