"""Pure loss functions and metrics. Each one is unit-tested against hand-computed values."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def scaled(term: torch.Tensor, weight: float, over: float = 1) -> torch.Tensor:
    """``weight * term / over``, skipping a weight or divisor of exactly 1: the same value and
    gradient bit for bit, with an operation and a backward node fewer per skipped factor
    (a model of tiny layers feels every one)."""
    if weight != 1:
        term = weight * term
    return term if over == 1 else term / over


def total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of ``terms`` (at least one), without the ``0 +`` that ``sum()`` starts with
    (which changes no value but costs an operation and a backward node)."""
    return functools.reduce(operator.add, terms)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (batch, tokens, ...) over the real tokens of ``mask`` (batch,
    tokens); padding positions add exactly nothing, whatever they hold (NaN aside)."""
    weights = mask.to(values.dtype).reshape(*mask.shape, *(1,) * (values.dim() - 2))
    return (values * weights).sum() / (mask.sum() * values[0, 0].numel())


def mse(prediction: torch.Tensor, target: torch.Tensor,
        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over all elements; for token sequences with a ``mask`` of their
    real tokens (batch, tokens), over the real tokens' elements only."""
    if mask is None:
        return F.mse_loss(prediction, target)
    return _masked_mean((prediction - target).pow(2), mask)


def cosine(prediction: torch.Tensor, target: torch.Tensor,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``1 - cos`` between feature vectors (feature dim 1 for images, last else);
    with a ``mask`` of real tokens, over the real tokens only."""
    dim = 1 if prediction.dim() == 4 else -1
    distance = 1 - F.cosine_similarity(prediction, target, dim=dim, eps=1e-8)
    return distance.mean() if mask is None else _masked_mean(distance, mask)


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


@dataclass(frozen=True)
class Metric:
    """A named metric of (predictions, targets) and the direction in which it improves."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    higher_is_better: bool

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


ACCURACY = Metric("accuracy", accuracy, higher_is_better=True)
RMSE = Metric("rmse", rmse, higher_is_better=False)
METRICS = {metric.name: metric for metric in (ACCURACY, RMSE)}  # the metrics known by name


# ------------------------------------------------------------------ modern KD baselines
def dkd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
        temperature: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD (Zhao et al. 2022): ``(TCKD, NCKD)``, each ``T^2 * KL(teacher || student)``
    summed over classes and averaged over the batch (as mdistiller).

    TCKD compares the binary distributions (target class, all other classes); NCKD the
    distributions over the non-target classes alone (the softmax without the target's logit).
    Computed in log space: a binary probability near 0 must not become ``log 0``.
    """
    is_target = F.one_hot(target, student_logits.shape[-1]).bool()

    def binary(logits):  # log (p_target, 1 - p_target)
        log_p = F.log_softmax(logits / temperature, dim=-1)
        others = log_p.masked_fill(is_target, -math.inf).logsumexp(dim=-1)
        return torch.stack([log_p[is_target], others], dim=-1)

    def non_target(logits):  # log softmax over the other classes; rows keep their order
        rest = logits[~is_target].view(len(logits), -1)
        return F.log_softmax(rest / temperature, dim=-1)

    def kl(log_s, log_t):
        return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2

    return (kl(binary(student_logits), binary(teacher_logits)),
            kl(non_target(student_logits), non_target(teacher_logits)))


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: shape (rows,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
         tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST (Huang et al. 2022): ``(inter, intra)`` on ``softmax(logits / tau)``, each times
    ``tau^2``. Inter-class: ``1 -`` the mean Pearson correlation of each example's class
    probabilities; intra-class: the same for each class's probabilities across the batch."""
    y_s = F.softmax(student_logits / tau, dim=1)
    y_t = F.softmax(teacher_logits / tau, dim=1)
    inter = 1 - pearson(y_s, y_t).mean()
    intra = 1 - pearson(y_s.T, y_t.T).mean()
    return tau**2 * inter, tau**2 * intra


def _pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``x``; zero diagonal (eps keeps sqrt's
    gradient finite for coincident rows, as in the official RKD code)."""
    square = x.pow(2).sum(1)
    d = (square[:, None] + square[None, :] - 2 * x @ x.T).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(x), dtype=x.dtype, device=x.device))


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance-wise loss (Park et al. 2019): Huber (smooth L1, delta 1) between the
    pairwise distances of the rows, each set divided by its mean off-diagonal distance;
    mean over all pairs. A batch of one example gives 0."""

    def normalised(x):
        d = _pairwise_distances(x)
        pairs = max(len(x) * (len(x) - 1), 1)
        return d / (d.sum() / pairs).clamp(min=1e-12)

    return F.smooth_l1_loss(normalised(student), normalised(teacher))


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle-wise loss: Huber between ``cos`` of the angle at ``x_i`` of every triplet
    ``(x_j, x_i, x_k)``; mean over all n^3 triplets, those with j = i or k = i counting 0 on
    both sides (as the official code)."""

    def cosines(x):
        e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # e[i, j] = unit(x_j - x_i)
        return torch.bmm(e, e.transpose(1, 2))

    return F.smooth_l1_loss(cosines(student), cosines(teacher))


def pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic Knowledge Transfer (Passalis & Tefas 2018): the cosine kernel
    ``(cos + 1) / 2`` between rows, normalised per row into conditional probabilities,
    and ``KL(teacher || student)`` averaged over all entries (the authors' code)."""

    def conditional(x):
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        kernel = (x @ x.T + 1) / 2
        return kernel / kernel.sum(dim=1, keepdim=True)

    p_s, p_t = conditional(student), conditional(teacher)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def crd_nce(scores: torch.Tensor, temperature: float, log_z: torch.Tensor) -> torch.Tensor:
    """CRD's NCE loss (Tian et al. 2020, Eq. 18 in the official code) for one anchor side.

    ``scores`` (batch, 1 + K): the anchor's dot products with its positive (column 0) and K
    negatives from the memory bank; ``log_z``: log of the mean of ``exp(score / T)`` (the
    normalising constant, per bank row). With ``P = exp(s / T) / (Z n)`` and the noise
    probability ``K / n``, ``P / (P + K / n) = sigmoid(s / T - log(K Z))``: the bank size n
    cancels, and the loss is written with stable log-sigmoids.
    """
    k = scores.shape[1] - 1
    x = scores / temperature - log_z - math.log(k)
    return -(F.logsigmoid(x[:, 0]) + F.logsigmoid(-x[:, 1:]).sum(1)).mean()


Distance = Callable[..., torch.Tensor]  # (prediction, target, mask=None) -> scalar
DISTANCES: dict[str, Distance] = {"mse": mse, "cosine": cosine}
