"""Fine-tuning after the closed-form initialisation: what trains, and the losses.

The student is the pruned model with its operators and optional LoRA adapters. The teacher is
the same weights in the dense layout with every adapter off, so no second copy of the model is
kept. Losses work on one batch of ``(B, T)`` windows whose padded positions carry label -100.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
LOSSES = ("kd", "mse", "ce")
TRAINABLE = ("ghost", "lora", "both")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class FinetuneSettings:
    """Settings of ``ghostpl fit``: the parameters it trains and the terms of its loss.

    Attributes:
        trainable: ``ghost`` (only the operators of the active method), ``lora`` (LoRA adapters on
            the surviving layers, operators frozen) or ``both``.
        losses: Weight of each loss term, summed: ``kd`` (KL divergence to the unpruned model's
            next-token distribution), ``mse`` (relative squared error of the hidden state after
            each boundary against the unpruned model's), ``ce`` (language-model cross-entropy).
        temperature: Softmax temperature of the ``kd`` term; the term is scaled by its square.
        top_k: With a value, ``kd`` compares both distributions renormalised over the teacher's
            ``top_k`` most likely tokens.
        lora_rank: Rank of each LoRA adapter.
        lora_alpha: LoRA scaling numerator; the update is scaled by ``lora_alpha / lora_rank``.
        lora_dropout: Dropout on the LoRA input during training.
        lora_targets: Names of the linear modules in each surviving layer that get an adapter.
        learning_rate: Learning rate of the default AdamW, used when no ``--optimizer`` is given.
        weight_decay: Decoupled weight decay of the default AdamW. Operators are stored as
            ``M = W - I``, so decay pulls them toward the identity, not toward zero.
    """

    trainable: str = "ghost"
    losses: dict[str, float] = field(default_factory=lambda: {"kd": 1.0})
    temperature: float = 1.0
    top_k: int | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    learning_rate: float = 1e-4
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"Invalid trainable {self.trainable!r}: set one of {', '.join(TRAINABLE)}.")
        unknown = sorted(set(self.losses) - set(LOSSES))
        if unknown:
            raise ValueError(f"Invalid loss terms {unknown}: set weights for {', '.join(LOSSES)}, e.g. {{kd: 1.0}}.")
        if not any(weight > 0 for weight in self.losses.values()):
            raise ValueError(f"No positive loss weight in {self.losses}: give at least one, e.g. {{kd: 1.0}}.")
        if any(weight < 0 for weight in self.losses.values()):
            raise ValueError(f"Negative loss weight in {self.losses}: weights must be >= 0.")
        if self.temperature <= 0:
            raise ValueError(f"Invalid temperature {self.temperature}: set a positive value such as 1.0.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"Invalid top_k {self.top_k}: set a positive number of tokens, or null for all.")
        if self.lora_rank < 1:
            raise ValueError(f"Invalid lora_rank {self.lora_rank}: set a positive rank such as 8.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"Invalid lora_dropout {self.lora_dropout}: set a value in [0, 1).")

    @property
    def uses_lora(self) -> bool:
        return self.trainable in ("lora", "both")

    @property
    def trains_operators(self) -> bool:
        return self.trainable in ("ghost", "both")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Mean over unpadded positions of ``KL(teacher ‖ student)`` at ``temperature``, times its square.

    Logits are ``(B, T, V)`` for next-token prediction at each position; ``labels`` is ``(B, T)``
    and marks padded positions with -100. With ``top_k``, both distributions are renormalised over
    the teacher's ``top_k`` most likely tokens, so the term is zero when the two models agree.
    """
    mask = labels != IGNORE_INDEX  # (B, T)
    student = student_logits[mask].float() / temperature  # (N, V)
    teacher = teacher_logits[mask].float() / temperature  # (N, V)
    if top_k is not None:
        teacher, indices = teacher.topk(min(top_k, teacher.shape[-1]), dim=-1)  # (N, k)
        student = student.gather(-1, indices)  # (N, k)
    student_log_probs = F.log_softmax(student, dim=-1)
    teacher_log_probs = F.log_softmax(teacher, dim=-1)
    per_token = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)  # (N,)
    if per_token.numel() == 0:
        return student_logits.sum() * 0.0
    return per_token.mean() * temperature**2


def relative_hidden_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``‖student - teacher‖² / ‖teacher‖²`` over unpadded positions of ``(B, T, D)`` states.

    Relative, because the first position's activations are orders of magnitude larger than the
    rest and a plain mean squared error would be set by that position alone in absolute terms.
    """
    student = student[mask].float()  # (N, D)
    teacher = teacher[mask].float()  # (N, D)
    return (student - teacher).square().sum() / teacher.square().sum().clamp_min(torch.finfo(torch.float32).tiny)


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position ``t`` predicts ``labels[t + 1]``; -100 is skipped."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def apply_lora(model: nn.Module, settings: FinetuneSettings) -> list[nn.Module]:
    """Inject LoRA adapters (peft) into the modules named ``settings.lora_targets``; returns them.

    Call it on the pruned layout, so that only surviving layers receive adapters. peft keeps the
    adapter weights in float32 when the base layer is in half precision.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_targets),
        bias="none",
    )
    try:
        inject_adapter_in_model(config, model)
    except ValueError as error:
        raise ValueError(
            f"LoRA found no target module among {settings.lora_targets} in {type(model).__name__}: "
            "set finetune.lora_targets to names of linear layers inside the decoder layers."
        ) from error
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def set_lora_enabled(layers: Iterable[nn.Module], enabled: bool) -> None:
    for layer in layers:
        layer.enable_adapters(enabled)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total
