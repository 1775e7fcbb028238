"""Pure loss functions. Each one is unit-tested against hand-computed values."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements."""
    return F.mse_loss(prediction, target)


def cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos`` between feature vectors (feature dim 1 for images, last else)."""
    dim = 1 if prediction.dim() == 4 else -1
    return (1 - F.cosine_similarity(prediction, target, dim=dim, eps=1e-8)).mean()


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
          temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. (2015): ``T^2 * KL(softmax(t/T) || softmax(s/T))``, mean over the batch.

    The ``T^2`` keeps the gradient scale independent of the temperature.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def rmse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root mean squared error (a metric, not a training loss)."""
    return torch.sqrt(F.mse_loss(prediction, target))


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max equals the integer target (a metric)."""
    return (logits.argmax(dim=-1) == target).float().mean()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA (Kornblith et al. 2019) between representations ``x`` (n, p) and ``y`` (n, q):
    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc``."""
    x = x.flatten(1).double()
    y = y.flatten(1).double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    return (cross / ((x.T @ x).norm() * (y.T @ y).norm())).float()


Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DISTANCES: dict[str, Distance] = {"mse": mse, "cosine": cosine}
