"""Every loss and metric of talkingmodels.losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from talkingmodels import analysis, losses


def cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The report's linear CKA (talkingmodels.analysis) as a 0-d tensor."""
    return torch.tensor(analysis.linear_cka(x, y))


def close(value: torch.Tensor, expected: float, tol: float = 1e-6) -> bool:
    return value.dim() == 0 and abs(float(value) - expected) < tol


def test_scaled_is_weight_times_term_over_divisor_and_skips_exact_ones():
    term = torch.tensor(3.0)
    assert close(losses.scaled(term, 2.0, 4), 1.5)
    assert close(losses.scaled(term, 0.5), 1.5)
    assert close(losses.scaled(term, 1.0, 3), 1.0)
    # a factor of exactly 1 adds no operation: the very same tensor comes back
    assert losses.scaled(term, 1.0) is term and losses.scaled(term, 1, 1.0) is term


def test_total_adds_the_terms_without_a_leading_zero():
    a, b, c = (torch.tensor(v) for v in (1.5, 2.0, -0.25))
    assert close(losses.total([a, b, c]), 3.25)
    assert losses.total(iter([a])) is a  # one term: itself, no "0 + a"


def test_mse():
    # errors 0, 2, 3 -> (0 + 4 + 9) / 3
    prediction = torch.tensor([1.0, 2.0, 3.0])
    target = torch.tensor([1.0, 0.0, 0.0])
    assert close(losses.mse(prediction, target), 13 / 3)


def test_mse_averages_over_every_element():
    # a (2, 2) matrix with one error of 2: 4 / 4 elements = 1
    prediction = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert close(losses.mse(prediction, torch.zeros(2, 2)), 1.0)


def test_cosine_vectors():
    # row 1: (1,0).(0,1) = 0 -> 1 - 0 = 1;  row 2: (3,4).(4,3) = 24, |.||.| = 25 -> 1 - 0.96 = 0.04
    prediction = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 1.0], [4.0, 3.0]])
    assert close(losses.cosine(prediction, target), (1.0 + 0.04) / 2)


def test_cosine_sequences_use_the_last_dim():
    # (batch 1, tokens 2, dim 2): token 1 parallel (0), token 2 opposite (1 - (-1) = 2) -> mean 1
    prediction = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    target = torch.tensor([[[2.0, 2.0], [-3.0, 0.0]]])
    assert close(losses.cosine(prediction, target), 1.0)


def test_cosine_images_use_the_channel_dim():
    # (B=1, C=2, H=1, W=2). Feature vectors are the channel columns:
    #   pixel w=0: prediction (1,0), target (0,2) -> cos 0 -> 1
    #   pixel w=1: prediction (1,1), target (2,2) -> cos 1 -> 0          mean 0.5
    # (over the last dim, W, it would be ((1-2/(sqrt2*2)) + (1-2/sqrt5))/2 = 0.199)
    prediction = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])
    target = torch.tensor([[[[0.0, 2.0]], [[2.0, 2.0]]]])
    assert prediction.shape == (1, 2, 1, 2)
    assert close(losses.cosine(prediction, target), 0.5)


def test_cosine_is_scale_invariant_and_zero_for_equal_inputs():
    x = torch.tensor([[0.3, -1.2, 2.0]])
    assert close(losses.cosine(x, x), 0.0)
    assert close(losses.cosine(5 * x, x), 0.0)


def test_kd_kl_two_classes_by_hand():
    # T = 2. Row 1: student logits (0, 0) -> p_s = (1/2, 1/2); teacher logits (2, 0)/T = (1, 0)
    #   -> p_t = (e/(1+e), 1/(1+e)) = (0.731059, 0.268941).
    #   KL(p_t || p_s) = p ln(2p) + (1-p) ln(2(1-p)) = 0.731059*0.379885 - 0.268941*0.620115
    #                  = 0.110944
    # Row 2: equal logits -> KL 0.   batchmean: (0.110944 + 0) / 2;   times T^2 = 4 -> 0.221888
    p = math.exp(1) / (math.exp(1) + math.exp(0))
    kl_row1 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    expected = 2**2 * (kl_row1 + 0.0) / 2
    assert abs(expected - 0.2218881) < 1e-6
    student = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert close(losses.kd_kl(student, teacher, temperature=2.0), expected)


def test_kd_kl_direction_is_teacher_to_student():
    # Reverse KL(p_s || p_t) for row 1 above: 0.5 ln(0.5/0.731059) + 0.5 ln(0.5/0.268941)
    #   = 0.5*(-0.379885) + 0.5*0.620115 = 0.120115, not 0.110944.
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2.0, 0.0]])
    value = losses.kd_kl(student, teacher, temperature=2.0)
    assert close(value, 4 * 0.1109441, 1e-5)
    assert not close(value, 4 * 0.1201145, 1e-3)


def test_kd_kl_zero_when_equal_and_shift_invariant():
    logits = torch.tensor([[1.0, -2.0, 0.5]])
    assert close(losses.kd_kl(logits, logits + 7.0, temperature=3.0), 0.0, 1e-6)


def test_kd_kl_temperature_one():
    # T = 1, student (0, 0), teacher (ln 3, 0) -> p_t = (3/4, 1/4):
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    value = losses.kd_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), 1.0)
    assert close(value, expected, 1e-6)
    assert abs(expected - 0.130812) < 1e-6


def test_rmse():
    # errors 0, 0, 0, 4 -> mse 16/4 = 4 -> rmse 2
    prediction = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert close(losses.rmse(prediction, target), 2.0)


def test_accuracy():
    # arg-max per row: 1, 0, 1; targets 1, 1, 1 -> 2 of 3 right
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 5.0]])
    assert close(losses.accuracy(logits, torch.tensor([1, 1, 1])), 2 / 3)


def test_linear_cka_identical_inputs_is_one():
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    assert close(cka(x, x), 1.0, 1e-5)


def test_linear_cka_one_feature_is_squared_correlation():
    # x = (1, 2, 3) -> centred (-1, 0, 1); y = (1, 0, 2) -> mean 1 -> centred (0, -1, 1)
    # ||yc^T xc||^2 = (0 + 0 + 1)^2 = 1;  ||xc^T xc|| = 2;  ||yc^T yc|| = 2  -> 1 / 4
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [0.0], [2.0]])
    assert close(cka(x, y), 0.25)


def test_linear_cka_hand_computed_two_by_one():
    # x rows (1,0), (0,1), (-1,-1): columns already centred; x^T x = [[2,1],[1,2]], ||.||_F = sqrt(10)
    # y rows 1, 1, -2: centred;  y^T y = 6;  y^T x = (1+0+2, 0+1+2) = (3, 3), squared sum 18
    # CKA = 18 / (sqrt(10) * 6) = 3 / sqrt(10) = 0.948683
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    y = torch.tensor([[1.0], [1.0], [-2.0]])
    assert close(cka(x, y), 3 / math.sqrt(10))
    # centring is done inside: shifting every column changes nothing
    assert close(cka(x + 4.0, y - 1.5), 3 / math.sqrt(10))


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 6, generator=g)
    y = torch.randn(30, 4, generator=g) + x[:, :4]
    reference = float(cka(x, y))
    assert 0.05 < reference < 0.99
    # isotropic scaling of either side
    assert close(cka(3.7 * x, y), reference, 1e-5)
    assert close(cka(x, 0.01 * y), reference, 1e-5)
    # orthogonal rotation of the features
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert torch.allclose(q.T @ q, torch.eye(6), atol=1e-5)
    assert close(cka(x @ q, y), reference, 1e-5)
    # but not invariant to an anisotropic scaling
    assert not close(cka(x * torch.tensor([10.0, 1, 1, 1, 1, 1]), y), reference, 1e-3)


@pytest.mark.parametrize("name", ["mse", "cosine"])
def test_distances_registry(name):
    assert losses.DISTANCES[name] is getattr(losses, name)


def test_masked_mse_and_cosine_by_hand():
    """Two sentences of 3 positions, features of width 2; real tokens: 2 and 1.
    Squared errors of the real tokens: (1, 0), (0, 4) and (1, 1) -> 7 / (3 tokens x 2) = 7/6;
    the padding positions (huge errors) add nothing. Cosine: real tokens' vectors at 0,
    90 and 180 degrees from their targets -> (0 + 1 + 2) / 3 = 1."""
    from talkingmodels.losses import cosine, mse

    prediction = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]],
                               [[1.0, 1.0], [9.0, 9.0], [9.0, 9.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [-9.0, 0.0]],
                           [[0.0, 0.0], [-9.0, -9.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(mse(prediction, target, mask)) == pytest.approx(7 / 6)
    assert float(mse(prediction, target)) == pytest.approx(float(((prediction - target) ** 2).mean()))
    unit = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [5.0, 5.0]], [[1.0, 0.0], [5.0, 5.0], [5.0, 5.0]]])
    aim = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 1.0]], [[-1.0, 0.0], [1.0, -7.0], [0.0, 1.0]]])
    assert float(cosine(unit, aim, mask)) == pytest.approx(1.0)
    # every position real: the same value as without a mask
    full = torch.ones(2, 3, dtype=torch.bool)
    assert float(mse(prediction, target, full)) == pytest.approx(float(mse(prediction, target)))
    assert float(cosine(unit, aim, full)) == pytest.approx(float(cosine(unit, aim)))
