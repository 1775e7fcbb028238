"""Linear CKA, pooling, per-class CKA, paired statistics over seeds and the CKA heatmap."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from talkingmodels.analysis import cka_heatmap, linear_cka, paired_comparison, per_class_cka, pooled
from talkingmodels.errors import UserError

pytest.importorskip("scipy")
from scipy import stats  # noqa: E402


@pytest.fixture(autouse=True)
def no_warnings():
    """None of these functions may warn, degenerate inputs included."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from its definition: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels
    and HSIC(K, L) = tr(K H L H) / (n - 1)^2, H the centring matrix."""
    n = x.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ H @ b @ H) / (n - 1) ** 2

    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


# -- linear_cka ---------------------------------------------------------------------------------

def test_cka_by_hand():
    # Columns already centred. X^T X = 2 I, ||.||_F = 2 sqrt(2); Y^T Y = [2]; Y^T X = [2, 0]:
    # CKA = 4 / (2 sqrt(2) * 2) = 1 / sqrt(2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    y = torch.tensor([[1.0], [0.0], [-1.0], [0.0]])
    assert linear_cka(x, y) == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert linear_cka(x + 3.0, 2.0 * y - 5.0) == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert numpy_cka(x.numpy().astype(float), y.numpy().astype(float)) == pytest.approx(1 / math.sqrt(2))


def test_cka_matches_hsic_definition():
    # a tiny uncentred example, against the HSIC definition in numpy
    x = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 2.0], [3.0, 0.5, -1.0], [2.0, 2.0, 2.0], [-1.0, 0.0, 1.0]])
    y = np.array([[0.3, 1.0], [2.0, -0.5], [1.0, 1.0], [-1.0, 0.2], [0.0, 3.0]])
    expected = numpy_cka(x, y)
    assert 0.0 < expected < 1.0
    for method in ("auto", "feature", "gram"):
        value = linear_cka(torch.tensor(x), torch.tensor(y), method=method)
        assert value == pytest.approx(expected, rel=1e-10)
    # float32 input is computed in float64 all the same
    assert linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)) == \
        pytest.approx(expected, rel=1e-6)


def test_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    shift = torch.randn(6, generator=g, dtype=torch.float64)
    y = x @ random_orthogonal(6, g) * 3.7 + shift
    for method in ("feature", "gram"):
        assert linear_cka(x, y, method=method) == pytest.approx(1.0, abs=1e-12)
    # not invariant to an arbitrary (non-isotropic) linear map
    assert linear_cka(x, x * torch.tensor([1.0, 1, 1, 1, 1, 20.0], dtype=torch.float64)) < 0.9


def test_cka_symmetric_in_unit_interval_and_forms_agree():
    g = torch.Generator().manual_seed(1)
    for n, p, q in [(50, 30, 70), (200, 5, 8), (6, 40, 3)]:
        x = torch.randn(n, p, generator=g)
        y = x[:, :1] * torch.randn(1, q, generator=g) + torch.randn(n, q, generator=g)
        feature, gram = linear_cka(x, y, method="feature"), linear_cka(x, y, method="gram")
        assert feature == pytest.approx(gram, rel=1e-10)
        assert linear_cka(x, y) == pytest.approx(feature, rel=1e-10)
        assert linear_cka(y, x) == pytest.approx(feature, rel=1e-10)
        assert 0.0 <= feature <= 1.0


def test_cka_independent_features_near_zero():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4000, 5, generator=g), torch.randn(4000, 5, generator=g)
    assert linear_cka(x, y) < 0.01  # expected about sqrt(p q) / n = 0.00125


def test_cka_undefined_and_bad_shapes():
    assert math.isnan(linear_cka(torch.ones(5, 3), torch.randn(5, 2)))  # constant representation
    assert math.isnan(linear_cka(torch.randn(1, 3), torch.randn(1, 2)))  # one example
    with pytest.raises(UserError, match="same examples"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(UserError, match="pooled"):
        linear_cka(torch.randn(5, 3, 2), torch.randn(5, 3))


# -- pooled -------------------------------------------------------------------------------------

def test_pooled_masked_mean_excludes_padding():
    tokens = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [100.0, 100.0]],    # last token is padding
                           [[2.0, 4.0], [-50.0, 7.0], [-50.0, 7.0]]])     # two padding tokens
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(pooled(tokens, mask), torch.tensor([[2.0, 20.0], [2.0, 4.0]], dtype=torch.float64))
    assert torch.equal(pooled(tokens, mask.bool()), pooled(tokens, mask))
    # without a mask every position counts
    assert torch.allclose(pooled(tokens)[0], torch.tensor([104 / 3, 140 / 3], dtype=torch.float64))
    with pytest.raises(UserError, match="no real token"):
        pooled(tokens, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_pooled_images_and_vectors():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    out = pooled(maps)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    assert out[0].tolist() == [1.5, 5.5, 9.5]
    vectors = torch.randn(4, 3)
    assert torch.equal(pooled(vectors), vectors.double())
    with pytest.raises(UserError, match="mask"):
        pooled(maps, torch.ones(2, 3))


# -- per_class_cka ------------------------------------------------------------------------------

def test_per_class_cka_identical_and_random_classes():
    g = torch.Generator().manual_seed(3)
    n0, n1 = 60, 400
    labels = torch.cat([torch.zeros(n0), torch.ones(n1), torch.full((2,), 7.0)]).long()
    x = torch.randn(n0 + n1 + 2, 4, generator=g)
    y = x.clone()
    y[labels == 1] = torch.randn(n1, 4, generator=g)  # class 1: unrelated in y
    result = per_class_cka(x, y, labels.numpy())
    assert list(result) == [0, 1, 7]
    assert result[0] == pytest.approx(1.0, abs=1e-12)
    assert result[1] < 0.1
    assert math.isnan(result[7])  # only two examples
    assert per_class_cka(x, y, labels.tolist()) == pytest.approx(result, nan_ok=True)


# -- paired_comparison --------------------------------------------------------------------------

A = {0: 0.912, 1: 0.925, 2: 0.918, 3: 0.930, 4: 0.921}
B = {0: 0.920, 1: 0.924, 2: 0.929, 3: 0.935, 4: 0.933}


def test_paired_against_scipy():
    a, b = pd.Series(A), pd.Series(B)
    r = paired_comparison(a, b, higher_is_better=True)
    diff = np.array([A[s] - B[s] for s in range(5)])
    assert r["n"] == 5 and r["seeds"] == [0, 1, 2, 3, 4]
    assert r["mean_diff"] == pytest.approx(diff.mean())
    assert r["std_diff"] == pytest.approx(diff.std(ddof=1))
    assert r["wins"] == 1  # seed 1 only
    assert r["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    half = stats.t.ppf(0.975, 4) * diff.std(ddof=1) / math.sqrt(5)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((diff.mean() - half, diff.mean() + half))
    assert r["significant"] == (r["p_ttest"] < 0.05)
    # the interval excludes 0 exactly when the t-test is significant at the same alpha
    for alpha in (0.01, 0.05, 0.2):
        s = paired_comparison(a, b, True, alpha=alpha)
        assert s["significant"] == (s["ci_high"] < 0 or s["ci_low"] > 0)


def test_paired_orientation_lower_is_better():
    # RMSE: a lower on every seed = a better, so the difference is positive
    rmse_a = {s: v - 0.01 * (s + 1) for s, v in B.items()}
    r = paired_comparison(rmse_a, B, higher_is_better=False)
    assert r["mean_diff"] == pytest.approx(0.03) and r["wins"] == 5
    assert r["ci_low"] > 0
    flipped = paired_comparison(B, rmse_a, higher_is_better=False)
    assert flipped["mean_diff"] == pytest.approx(-0.03) and flipped["wins"] == 0
    assert flipped["p_ttest"] == pytest.approx(r["p_ttest"])
    # the same values as accuracies (higher is better): a is then worse
    assert paired_comparison(rmse_a, B, higher_is_better=True)["mean_diff"] == pytest.approx(-0.03)


def test_paired_uses_seed_intersection():
    a = pd.Series({0: 1.0, 1: 2.0, 2: 3.5, 5: 100.0})
    b = {1: 1.5, 2: 3.0, 0: 0.2, 3: -7.0, 4: float("nan")}
    r = paired_comparison(a, b, higher_is_better=True)
    assert r["n"] == 3 and r["seeds"] == [0, 1, 2]
    assert r["mean_diff"] == pytest.approx((0.8 + 0.5 + 0.5) / 3)
    # a failed run (NaN) drops the seed
    a_failed = a.copy()
    a_failed[2] = float("nan")
    assert paired_comparison(a_failed, b, True)["seeds"] == [0, 1]


def test_paired_wilcoxon_floor_with_five_seeds():
    # a better on all 5 seeds by clearly consistent margins: the t-test is significant, the
    # exact two-sided Wilcoxon p is 2 / 2^5 = 0.0625 at best
    a = {s: 0.80 + 0.01 * s for s in range(5)}
    b = {s: 0.80 + 0.01 * s + 0.02 + 0.001 * s for s in range(5)}  # b's RMSE always higher
    r = paired_comparison(a, b, higher_is_better=False)
    assert r["wins"] == 5
    assert r["p_wilcoxon"] == pytest.approx(0.0625)
    assert r["p_ttest"] < 0.001 and r["significant"]
    six = paired_comparison({**a, 5: 0.9}, {**b, 5: 0.95}, higher_is_better=False)
    assert six["p_wilcoxon"] == pytest.approx(0.03125)


def test_paired_zero_variance_and_tiny_n():
    same = paired_comparison(A, A, higher_is_better=True)
    assert (same["mean_diff"], same["std_diff"], same["wins"]) == (0.0, 0.0, 0)
    assert same["p_ttest"] == 1.0 and same["p_wilcoxon"] == 1.0
    assert (same["ci_low"], same["ci_high"]) == (0.0, 0.0) and not same["significant"]
    # a constant nonzero difference (up to the rounding of the subtraction): no t-test
    shifted = {s: v + 0.1 for s, v in A.items()}
    const = paired_comparison(shifted, A, higher_is_better=True)
    assert const["std_diff"] == 0.0 and const["wins"] == 5
    assert math.isnan(const["p_ttest"]) and not const["significant"]
    assert const["p_wilcoxon"] == pytest.approx(0.0625)
    assert const["ci_low"] == const["ci_high"] == pytest.approx(0.1)
    one = paired_comparison({0: 1.0}, {0: 2.0}, higher_is_better=True)
    assert one["n"] == 1 and one["mean_diff"] == -1.0 and one["wins"] == 0
    assert all(math.isnan(one[k]) for k in ("std_diff", "p_ttest", "p_wilcoxon", "ci_low", "ci_high"))
    none = paired_comparison({0: 1.0}, {1: 2.0}, higher_is_better=True)
    assert none["n"] == 0 and math.isnan(none["mean_diff"]) and not none["significant"]


def test_paired_bad_inputs():
    with pytest.raises(UserError, match="Series"):
        paired_comparison([1.0, 2.0], [1.0, 2.0], higher_is_better=True)
    with pytest.raises(UserError, match="repeated"):
        paired_comparison(pd.Series([1.0, 2.0], index=[0, 0]), A, higher_is_better=True)
    with pytest.raises(UserError, match="alpha"):
        paired_comparison(A, B, higher_is_better=True, alpha=5)


# -- cka_heatmap --------------------------------------------------------------------------------

def test_cka_heatmap_writes_png(tmp_path):
    table = pd.DataFrame({"dense": [0.91, 0.42, float("nan")], "sparse": [0.88, 0.1, 0.5]},
                         index=["td", "fitnet", "scratch"])
    path = cka_heatmap(table, tmp_path / "plots" / "cka.png", title="student vs teacher")
    assert path == tmp_path / "plots" / "cka.png"
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_holm_by_hand():
    """p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03,
    0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> raised to the running maximum 0.06."""
    from talkingmodels.analysis import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.02, float("nan"), 0.01])  # NaN: untested, not counted in m
    assert math.isnan(adjusted[1])
    assert adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.02)
    assert holm([]) == []


def test_compare_family_verdicts_use_the_adjusted_p():
    """Two comparisons significant alone (p 0.013 and 0.035) are a family of three
    with a null third: Holm keeps only the first (3 x 0.013 = 0.039), not the second."""
    from talkingmodels.analysis import compare_family

    a = {0: 0.80, 1: 0.90, 2: 1.00}
    others = {"x": {0: 0.90, 1: 1.02, 2: 1.08}, "y": {0: 0.86, 1: 0.98, 2: 1.04},
              "z": {0: 0.70, 1: 1.00, 2: 1.00}}
    family = compare_family(a, others, higher_is_better=False)
    raw = {k: paired_comparison(a, v, False)["p_ttest"] for k, v in others.items()}
    assert raw["x"] < 0.05 and raw["y"] < 0.05
    assert family["x"]["p_holm"] == pytest.approx(3 * raw["x"])
    assert family["x"]["significant"] and not family["y"]["significant"]
    assert family["y"]["p_holm"] == pytest.approx(max(2 * raw["y"], 3 * raw["x"]))
