"""Knowledge-distillation loss of DeiT (Touvron et al., 2021, Sec. 4): a teacher supervises the distillation token.

``none`` trains with the base criterion only; ``soft`` adds the KL divergence between the student's distillation
head and the teacher's softened outputs (temperature ``tau``); ``hard`` adds cross-entropy against the teacher's
argmax. The two terms are mixed as ``(1 - alpha) * base + alpha * distillation``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

DistillationType = Literal["none", "soft", "hard"]
DISTILLATION_TYPES: tuple[str, ...] = get_args(DistillationType)


class DistillationLoss(nn.Module):
    """Wraps a base criterion and adds a distillation term from a frozen teacher.

    Args:
        base_criterion: Loss on the class-token head (e.g. soft-target cross-entropy under mixup).
        teacher_model: Frozen teacher; only called when ``distillation_type != 'none'``.
        distillation_type: ``'none'``, ``'soft'`` or ``'hard'``.
        alpha: Weight of the distillation term, in [0, 1] (``--distillation-alpha`` checks it).
        tau: Softmax temperature of soft distillation, > 0 (``--distillation-tau`` checks it).
    """

    def __init__(
        self,
        base_criterion: nn.Module,
        teacher_model: nn.Module | None,
        distillation_type: DistillationType,
        alpha: float,
        tau: float,
    ) -> None:
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"distillation_type must be one of {DISTILLATION_TYPES}, got {distillation_type!r}")
        if distillation_type != "none" and teacher_model is None:
            raise ValueError(f"distillation_type={distillation_type!r} needs a teacher model")
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(
        self, inputs: torch.Tensor, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor:
        """Computes the loss.

        Args:
            inputs: The (augmented) images the student saw; the teacher sees the same ones.
            outputs: Student logits, or ``(class_logits, dist_logits)`` for distilled models in train mode.
            labels: Targets of the base criterion (indices or soft targets).
        """
        outputs_kd = None
        if isinstance(outputs, (tuple, list)):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        if outputs_kd is None:
            raise ValueError("distillation needs a *_distilled_* model: (class_logits, dist_logits) in train mode")
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        if self.distillation_type == "soft":
            T = self.tau
            student = F.log_softmax(outputs_kd.float() / T, dim=1)
            teacher = F.log_softmax(teacher_outputs.float() / T, dim=1)
            # Summed over all elements and divided by the number of logits, as DeiT does (not a batch mean).
            kl = F.kl_div(student, teacher, reduction="sum", log_target=True)
            distillation_loss = kl * (T * T) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha
