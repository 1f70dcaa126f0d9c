"""Losses shared by the methods (written once here, reused by every method file)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               scale_t2: bool = False) -> torch.Tensor:
    """-(1/B) sum_b sum_c softmax(t/T)_c log_softmax(s/T)_c: soft cross-entropy (KL up to a constant),
    as PyCIL's _KD_loss / FOSTER. `scale_t2` multiplies by T^2 (Hinton et al.)."""
    target = F.softmax(teacher_logits.float() / temperature, dim=1)
    loss = -(target * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(dim=1).mean()
    return loss * temperature ** 2 if scale_t2 else loss
