"""The causal-LM losses and metrics of talkingmodels.losses against values worked out by hand:
the shift, the masking of -100 labels, token-level KD, GKD's generalized JSD (and TRL's own
implementation as an oracle where TRL is installed), and KD from a top-k teacher."""

from __future__ import annotations

import math

import pytest
import torch

from talkingmodels import losses

LN3 = math.log(3.0)


def close(value: torch.Tensor, expected: float, tol: float = 1e-6) -> bool:
    return value.dim() == 0 and abs(float(value) - expected) < tol


def test_the_shift_pairs_position_i_with_label_i_plus_1():
    labels = torch.tensor([[7, 8, 9], [4, 5, -100]])
    assert losses.next_token(labels).tolist() == [[8, 9, -100], [5, -100, -100]]
    assert losses.target_tokens(labels).tolist() == [[True, True, False], [True, False, False]]


def sequence():
    """(1, 3, 2) logits and labels: position 0 predicts label 1 (= 1) from logits (0, 0),
    position 1 predicts label 2 (= 0) from (ln 3, 0); position 2 predicts nothing."""
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [5.0, -5.0]]])
    return logits, torch.tensor([[-100, 1, 0]])


def test_causal_lm_loss_by_hand_and_ignoring_minus_100():
    logits, labels = sequence()
    # -ln(1/2) and -ln(3/4), averaged over the two real targets (label 0 is never a target)
    assert close(losses.causal_lm_loss(logits, labels), (math.log(2) + math.log(4 / 3)) / 2)
    labels[0, 2] = -100  # only position 0's target is left
    assert close(losses.causal_lm_loss(logits, labels), math.log(2))


def test_perplexity_and_next_token_accuracy_by_hand():
    logits, labels = sequence()
    mean = (math.log(2) + math.log(4 / 3)) / 2
    assert close(losses.perplexity(logits, labels), math.exp(mean), 1e-5)
    # position 0: arg-max of (0, 0) is token 0, the target is 1 (wrong); position 1: 0 = 0
    assert close(losses.next_token_accuracy(logits, labels), 0.5)
    for metric in (losses.PERPLEXITY, losses.NEXT_TOKEN_ACCURACY):
        assert not metric.higher_is_better if metric is losses.PERPLEXITY else metric.higher_is_better
        assert losses.METRICS[metric.name] is metric


def test_streamed_metrics_sum_tokens_over_batches_not_batch_means():
    # batch A: one real target (NLL ln 2); batch B: three (NLL ln 2, ln 4/3, ln 4/3)
    a_logits, a_labels = torch.zeros(1, 2, 2), torch.tensor([[0, 1]])
    b_logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [LN3, 0.0], [0.0, 0.0]]])
    b_labels = torch.tensor([[0, 1, 0, 0]])
    metric = losses.PERPLEXITY
    sums = metric.totals(a_logits, a_labels) + metric.totals(b_logits, b_labels)
    expected = math.exp((2 * math.log(2) + 2 * math.log(4 / 3)) / 4)
    assert close(metric.finish(sums), expected, 1e-5)
    # (the mean of the two batches' own perplexities would be another number)
    assert abs((2 + math.exp((math.log(2) + 2 * math.log(4 / 3)) / 3)) / 2 - expected) > 0.01


def test_token_kd_by_hand_at_temperature_2_masked():
    # position 0: student (0, 0), teacher (2, 0) -> T^2 KL = 4 * 0.110944 (see test_losses);
    # position 1: equal logits -> 0; position 2 predicts nothing; position 1's label is -100
    # in the second case, so only position 0 counts there.
    p = math.exp(1) / (math.exp(1) + 1)
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    student = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [9.0, -9.0]]])
    labels = torch.tensor([[0, 1, 1]])
    assert close(losses.token_kd_kl(student, teacher, labels, 2.0), 4 * (kl + 0) / 2)
    teacher[0, 1] = torch.tensor([-9.0, 9.0])  # a large difference at a masked position
    assert close(losses.token_kd_kl(student, teacher, torch.tensor([[0, 1, -100]]), 2.0), 4 * kl)
    # nothing to predict at all: 0, not NaN
    assert close(losses.token_kd_kl(student, teacher, torch.full((1, 3), -100), 2.0), 0.0)


def jsd_by_hand(p: list[float], q: list[float], beta: float) -> float:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q."""
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]

    def kl(x, y):
        return sum(a * math.log(a / b) for a, b in zip(x, y, strict=True) if a > 0)

    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("beta, expected", [(0.0, 0.130812), (1.0, 0.143841), (0.5, 0.033822)])
def test_generalized_jsd_by_hand(beta, expected):
    # teacher (ln 3, 0) -> p = (3/4, 1/4); student (0, 0) -> q = (1/2, 1/2):
    # forward KL(p || q) = 0.130812, reverse KL(q || p) = 0.143841, and at beta 0.5
    # (m = (5/8, 3/8)): 0.5 (0.035375 + 0.032269) = 0.033822
    assert abs(jsd_by_hand([0.75, 0.25], [0.5, 0.5], beta) - expected) < 1e-6
    student = torch.zeros(1, 2, 2)
    teacher = torch.tensor([[[LN3, 0.0], [0.0, 0.0]]])
    value = losses.generalized_jsd(student, teacher, torch.tensor([[0, 1]]), beta)
    assert close(value, expected, 1e-6)


def test_generalized_jsd_masks_padding_and_is_zero_for_equal_models():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    assert close(losses.generalized_jsd(logits, logits.clone(), labels, 0.5), 0.0, 1e-6)
    other = logits.clone()
    other[0, 2:] += 3 * torch.randn(3, 7)  # differs only where labels are -100 (positions 2..)
    labels[0, 3:] = -100  # position 2 predicts label 3 (-100), positions 3, 4 too / nothing
    assert close(losses.generalized_jsd(logits, other, labels, 0.3), 0.0, 1e-6)


def test_top_k_other_bucket_by_hand():
    # V = 3, teacher (ln 2, 0, 0) -> p = (1/2, 1/4, 1/4); student (0, 1, 0) -> q = (1, e, 1)/(2 + e).
    # k = 1, tail "other": p' = (1/2, 1/2), q' = (1/(2+e), (1+e)/(2+e)); KL(p' || q').
    e = math.e
    q0 = 1 / (2 + e)
    expected = 0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / (1 - q0))
    student = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    full = torch.tensor([[[math.log(2), 0.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 0]])
    top = losses.TopK.of(full, 1, "other")
    assert top.indices[0, 0].tolist() == [0]
    assert close(losses.token_kd_kl(student, top, labels), expected, 1e-6)
    # renormalised, one token is a point mass on both sides: KL 0
    assert close(losses.token_kd_kl(student, losses.TopK.of(full, 1), labels), 0.0, 1e-7)


@pytest.mark.parametrize("tail", losses.TAILS)
def test_top_k_kd_tends_to_full_vocabulary_kd_as_k_grows(tail):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 50, generator=g), 3 * torch.randn(2, 6, 50, generator=g)
    labels = torch.randint(0, 50, (2, 6), generator=g)
    labels[1, 4:] = -100
    full = float(losses.token_kd_kl(student, teacher, labels))
    gaps = [abs(float(losses.token_kd_kl(student, losses.TopK.of(teacher, k, tail), labels)) - full)
            for k in (1, 5, 20, 40, 50)]
    assert gaps[-1] < 1e-5  # k = the vocabulary: the same loss
    assert gaps[3] < gaps[0] and gaps[3] < 0.1 * full
    if tail == "other":  # a coarser partition never has more KL (the data processing inequality)
        values = [full - g for g in gaps]
        assert all(a <= b + 1e-6 for a, b in zip(values, values[1:], strict=False))
    for k in (5, 50):  # the generalized JSD reads a top-k teacher the same way
        top = losses.TopK.of(teacher, k, tail)
        assert torch.isfinite(losses.generalized_jsd(student, top, labels, 0.5))


def test_the_other_bucket_refuses_a_temperature_it_cannot_be_exact_at():
    logits = torch.randn(1, 3, 5)
    top = losses.TopK.of(logits, 2, "other")
    with pytest.raises(ValueError, match="temperature 1 only"):
        losses.token_kd_kl(logits, top, torch.zeros(1, 3, dtype=torch.long), 2.0)
    with pytest.raises(ValueError, match="unknown tail"):
        losses.TopK.of(logits, 2, "drop")


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_equals_trls_gkd_loss(beta, temperature):
    """The oracle: TRL's GKDTrainer.generalized_jsd_loss on the same (shifted) logits, value
    and gradient. Skipped without TRL (pip install talkingmodels[peer-lm])."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    g = torch.Generator().manual_seed(int(beta * 10) + int(temperature))
    student = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    teacher = 2 * torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, 5:] = -100
    labels[2, :3] = -100
    ours = losses.generalized_jsd(student, teacher, labels, beta, temperature)
    (ours_grad,) = torch.autograd.grad(ours, student)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:],
                                                 beta=beta, temperature=temperature)
    (theirs_grad,) = torch.autograd.grad(theirs, student)
    assert abs(float(ours.detach()) - float(theirs.detach())) < 1e-6
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-7)


def test_top_k_gradients_stay_finite_when_the_top_k_hold_all_the_mass():
    student = torch.randn(1, 4, 6, requires_grad=True)
    teacher = torch.full((1, 4, 6), -1e4)
    teacher[..., 2] = 0.0  # all of the teacher's mass on one token
    for k, tail in ((1, "other"), (6, "other"), (3, "renormalise")):
        labels = torch.zeros(1, 4, dtype=torch.long)
        loss = losses.token_kd_kl(student, losses.TopK.of(teacher, k, tail), labels)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
