"""Pure loss functions and metrics. Each one is unit-tested against hand-computed values."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from talkingmodels.states import TAILS, TopK  # noqa: F401 (TopK is part of the losses' vocabulary)


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
    """A named metric of (predictions, targets) and the direction in which it improves.

    ``totals``, where given, makes the metric streamable: it maps one batch's predictions and
    targets to a vector of sums, and ``fn`` of the whole split equals ``finish`` of the sums
    over its batches. Evaluation then never holds a split's predictions (a causal LM's logits
    are ``tokens x vocabulary`` floats: 12 GiB for 1,000 texts of 64 tokens and 49,152 words).
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    higher_is_better: bool
    totals: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


# ------------------------------------------------------------------ causal language models
IGNORE = -100  # a label no loss reads (padding, prompts), as in Hugging Face and PyTorch


def next_token(labels: torch.Tensor) -> torch.Tensor:
    """The causal shift, done here and nowhere else: the target of position ``i`` (batch,
    seq) is label ``i + 1``, as Hugging Face models compute their own loss; the last
    position predicts nothing (-100). The labels move, not the logits: a slice of a
    (batch, seq, vocabulary) tensor would cost its backward a full zero-filled copy."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) mask of the positions whose next token is a real target (not -100)."""
    return next_token(labels) != IGNORE


def loss_units(target: torch.Tensor, output: str | None) -> torch.Tensor:
    """What a batch's loss is a mean over: its real target tokens for a causal LM, else its
    examples (several processes weigh their shards of a batch by it, so that they train on
    the mean over the whole batch)."""
    if output == "causal-lm":
        return target_tokens(target).sum()
    return torch.tensor(len(target), device=target.device)


def _per_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token ``values`` over the real target tokens of ``mask`` (0 without any:
    a batch of padding alone contributes nothing, and its gradient stays finite)."""
    return values[mask].sum() / mask.sum().clamp(min=1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` (batch, seq, vocabulary) for ``labels`` (batch,
    seq), averaged over the real target tokens (labels -100 ignored)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), next_token(labels).flatten(), ignore_index=IGNORE)


def _lm_totals(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(summed next-token NLL, correct next tokens, real target tokens) of a batch."""
    targets = next_token(labels)
    mask = targets != IGNORE
    logits, targets = logits[mask].float(), targets[mask]
    nll = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return torch.stack([nll, correct.to(nll.dtype), mask.sum().to(nll.dtype)])


def perplexity(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """exp of the mean next-token NLL over the real target tokens (a metric)."""
    return _perplexity(_lm_totals(logits, labels))


def _perplexity(totals: torch.Tensor) -> torch.Tensor:
    return torch.exp(totals[0] / totals[2].clamp(min=1))


def next_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of real target tokens whose arg-max prediction is the next token (a metric)."""
    return _next_token_accuracy(_lm_totals(logits, labels))


def _next_token_accuracy(totals: torch.Tensor) -> torch.Tensor:
    return totals[1] / totals[2].clamp(min=1)


def _log1mexp(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable near 0 and near -inf (Maechler's two branches,
    each fed only inputs it is finite on, so that no NaN gradient leaks through the other).
    An empty tail (k = the vocabulary, or a mass that rounds to 1) is held at a mass of
    1e-30, not 0: its KL terms are then 0, not 0 * inf = NaN."""
    x = log_mass.clamp(max=-1e-30)
    near = x > -0.6931
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, x))))


def bucket_log_probs(student_logits: torch.Tensor, teacher: torch.Tensor | TopK,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' next-token log-distributions over the same buckets: (student, teacher),
    each (..., buckets). Full teacher logits: the vocabulary at ``temperature``. A
    :class:`TopK` teacher: its ``k`` tokens, with its ``tail`` either ``"renormalise"``-d away
    (both distributions restricted to the k tokens and renormalised; any temperature) or
    kept as one ``"other"`` bucket holding the rest of the mass (k + 1 buckets; exact at
    temperature 1 only, the temperature the cache's probabilities are stored at). Both
    equal the full-vocabulary distributions once k is the vocabulary."""
    student_logits = student_logits.float()
    if isinstance(teacher, torch.Tensor):
        return (F.log_softmax(student_logits / temperature, dim=-1),
                F.log_softmax(teacher.float() / temperature, dim=-1))
    indices = teacher.indices.long()
    teacher_log = teacher.log_probs.float()
    if teacher.tail == "renormalise":  # restricted, renormalised: softmax(log p / T) = softmax(z / T)
        return (F.log_softmax(student_logits.gather(-1, indices) / temperature, dim=-1),
                F.log_softmax(teacher_log / temperature, dim=-1))
    if temperature != 1:
        raise ValueError(f"a top-k cache's 'other' bucket is exact at temperature 1 only (its "
                         f"probabilities are stored at 1); got temperature {temperature}: use "
                         "tail 'renormalise' or temperature 1")
    student_log = F.log_softmax(student_logits, dim=-1).gather(-1, indices)

    def with_other(log_probs):
        return torch.cat([log_probs, _log1mexp(log_probs.logsumexp(-1, keepdim=True))], dim=-1)

    return with_other(student_log), with_other(teacher_log)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, per position; terms with p = 0 count 0."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def token_kd_kl(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, labels: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """Logit KD per token (Hinton et al. 2015 at every position of a causal LM):
    ``T^2 * KL(p_teacher || p_student)`` at temperature ``T``, averaged over the positions
    whose next token is a real target (the same positions the task's loss counts)."""
    log_q, log_p = bucket_log_probs(student_logits, teacher, temperature)
    return _per_token_mean(_kl(log_p, log_q), target_tokens(labels)) * temperature**2


def generalized_jsd(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, labels: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """The generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1) per
    token, averaged over the real target tokens: with the mixture ``m = beta p_T + (1 -
    beta) p_S``, ``beta KL(p_T || m) + (1 - beta) KL(p_S || m)``; ``beta = 0`` is the forward
    ``KL(p_T || p_S)``, ``beta = 1`` the reverse ``KL(p_S || p_T)`` (as TRL's GKDTrainer)."""
    log_q, log_p = bucket_log_probs(student_logits, teacher, temperature)
    if beta == 0:
        divergence = _kl(log_p, log_q)
    elif beta == 1:
        divergence = _kl(log_q, log_p)
    else:
        mixture = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
        divergence = beta * _kl(log_p, mixture) + (1 - beta) * _kl(log_q, mixture)
    return _per_token_mean(divergence, target_tokens(labels))


def _streamed(name: str, totals, finish, higher: bool) -> Metric:
    return Metric(name, lambda p, t: finish(totals(p, t)), higher, totals, finish)


ACCURACY = Metric("accuracy", accuracy, higher_is_better=True)
RMSE = Metric("rmse", rmse, higher_is_better=False)
PERPLEXITY = _streamed("perplexity", _lm_totals, _perplexity, higher=False)
NEXT_TOKEN_ACCURACY = _streamed("next_token_accuracy", _lm_totals, _next_token_accuracy, higher=True)
METRICS = {metric.name: metric for metric in (ACCURACY, RMSE, PERPLEXITY, NEXT_TOKEN_ACCURACY)}

# Each output kind's task loss and default metric (the task a student's output fits).
TASKS: dict[str, tuple[Callable, Metric]] = {
    "classification": (F.cross_entropy, ACCURACY),
    "regression": (mse, RMSE),
    "causal-lm": (causal_lm_loss, PERPLEXITY),
}


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
