"""Knowledge-distillation loss (Hinton et al., 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels, student)``.

    The T^2 factor keeps the soft term's gradient scale independent of T. Logits are
    (..., V) with labels (...): a sequence model's (B, T, V) logits give a loss per token.
    With ``reduction='none'`` one loss per label is returned (shape of ``labels``), with
    'mean' their mean. ``alpha = 0`` needs no teacher.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"kd_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(f"kd_loss: logits {tuple(student_logits.shape)} do not fit labels {tuple(labels.shape)}")
    shape, vocab = labels.shape, student_logits.shape[-1]
    student_logits, labels = student_logits.reshape(-1, vocab), labels.reshape(-1)
    if teacher_logits is not None:
        teacher_logits = teacher_logits.reshape(-1, vocab)
    ce = F.cross_entropy(student_logits, labels, reduction="none")
    if alpha == 0.0:
        per_sample = ce
    else:
        if teacher_logits is None:
            raise ValueError("kd_loss: alpha > 0 needs teacher logits")
        log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
        per_sample = alpha * temperature**2 * kl + (1.0 - alpha) * ce
    return per_sample.reshape(shape) if reduction == "none" else per_sample.mean()


def feature_distance(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """``‖s/‖s‖ − t/‖t‖‖²`` per sample (rows of (N, D)): 2 − 2·cos, in [0, 4] whatever the two
    models' feature scales, so one weight suits any teacher. ``s`` is the student's features
    already mapped to the teacher's width."""
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"feature_distance: student features {tuple(student_features.shape)} do not fit "
                         f"teacher features {tuple(teacher_features.shape)}")
    diff = F.normalize(student_features, dim=-1) - F.normalize(teacher_features, dim=-1)
    return diff.pow(2).sum(dim=-1)
