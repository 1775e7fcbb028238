"""Representation similarity (linear CKA) and paired statistics over seeds: pure functions.

* :func:`linear_cka` compares two representations of the same examples (a student's and a
  teacher's hidden states, or one method's and another's); :func:`pooled` turns a state
  tensor into one vector per example first, and :func:`per_class_cka` does it per class.
* :func:`paired_comparison` compares two methods' metric values on the same seeds.
* :func:`cka_heatmap` draws a methods x settings (or classes) table of CKA values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from talkingmodels.errors import UserError
from talkingmodels.io import save_figure
from talkingmodels.states import pooled as mean_per_example
from talkingmodels.states import token_mask

__all__ = ["cka_heatmap", "linear_cka", "paired_comparison", "per_class_cka", "pooled"]


def _as_matrix(name: str, value) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach().to("cpu", torch.float64)
    if tensor.dim() != 2:
        raise UserError(f"linear_cka: {name} must be (n, features), got shape {tuple(tensor.shape)}; "
                        "use pooled() to turn image maps or token sequences into one vector per example")
    return tensor


def linear_cka(x, y, method: str = "auto") -> float:
    """Linear CKA (Kornblith et al., ICML 2019) between two representations of the same n
    examples: ``x`` (n, p) and ``y`` (n, q), torch tensors (or anything ``torch.as_tensor``
    takes), computed in float64 after centring each column.

    ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, in [0, 1]; invariant to orthogonal
    transforms and isotropic scaling of either representation (and, by the centring, to
    shifts), not to arbitrary invertible linear maps.

    ``method``: ``"feature"`` uses the (p, p), (q, q), (q, p) cross-products (cheap when the
    widths are small next to n), ``"gram"`` the equivalent (n, n) Gram matrices
    (``<K, L>_F / (||K||_F ||L||_F)`` with ``K = X X^T``, ``L = Y Y^T``; cheap when n is small
    next to the widths); ``"auto"`` (default) picks the one with fewer multiply-adds. Both
    give the same value up to rounding.

    Returns NaN when CKA is undefined: fewer than 2 examples, or a representation that is
    constant over the examples (zero after centring).
    """
    X, Y = _as_matrix("x", x), _as_matrix("y", y)
    n, p = X.shape
    q = Y.shape[1]
    if Y.shape[0] != n:
        raise UserError(f"linear_cka: x and y must hold the same examples, got {n} and {Y.shape[0]} rows")
    if method == "auto":
        # feature form: n (pq + p^2 + q^2); Gram form: n^2 (p + q) plus the n^2 inner products
        method = "gram" if n * (p + q + 1) < p * q + p * p + q * q else "feature"
    if method not in ("feature", "gram"):
        raise UserError(f"linear_cka: method must be 'auto', 'feature' or 'gram', got {method!r}")
    if n < 2:
        return math.nan
    X = X - X.mean(dim=0, keepdim=True)
    Y = Y - Y.mean(dim=0, keepdim=True)
    if method == "feature":
        cross = torch.linalg.matrix_norm(Y.T @ X) ** 2
        norm_x = torch.linalg.matrix_norm(X.T @ X)
        norm_y = torch.linalg.matrix_norm(Y.T @ Y)
    else:
        K, L = X @ X.T, Y @ Y.T
        cross = (K * L).sum()
        norm_x, norm_y = torch.linalg.matrix_norm(K), torch.linalg.matrix_norm(L)
    denominator = float(norm_x * norm_y)
    if denominator == 0.0 or not math.isfinite(denominator):
        return math.nan
    return min(1.0, max(0.0, float(cross) / denominator))  # clip rounding just outside [0, 1]


def pooled(state, mask=None) -> torch.Tensor:
    """One vector per example for CKA, as float64 on the CPU (detached):

    * (n, d): returned as is;
    * (n, C, H, W) image feature maps: mean over H and W -> (n, C);
    * (n, T, d) token sequences: mean over the real tokens -> (n, d); ``mask`` (n, T), true /
      nonzero for real tokens, excludes padding (without it every position counts).

    Why the spatial / token mean rather than flattening: it is what a global-average-pooling
    head or a mean-pooled sentence embedding sees, it makes states of different resolutions
    and sequence lengths comparable, and it keeps the width at C (or d) instead of C*H*W, so
    CKA stays cheap and is not dominated by where in the image (or sentence) a feature fires.
    The price: two maps with the same channel means but different spatial layouts look alike.

    A 3-D tensor is always read as (n, T, d) tokens. An example whose mask has no real token
    is an error (its mean is undefined).
    """
    tensor = torch.as_tensor(state).detach().to("cpu", torch.float64)
    if mask is not None and tensor.dim() != 3:
        raise UserError(f"pooled: a mask only applies to (n, T, d) token sequences, "
                        f"got a state of shape {tuple(tensor.shape)}")
    if tensor.dim() not in (2, 3, 4):
        raise UserError("pooled: expected (n, d), (n, C, H, W) or (n, T, d), "
                        f"got shape {tuple(tensor.shape)}")
    if mask is not None:
        mask = torch.as_tensor(mask).detach().to("cpu") != 0
        if tuple(mask.shape) != tuple(tensor.shape[:2]):
            raise UserError(f"pooled: mask must be (n, T) = {tuple(tensor.shape[:2])}, "
                            f"got {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            empty = torch.nonzero(~mask.any(dim=1))[:, 0].tolist()
            raise UserError(f"pooled: examples {empty[:10]} have no real token in the mask")
    return mean_per_example(tensor, mask)


def per_class_cka(x, y, labels, min_examples: int = 3) -> dict[int, float]:
    """Linear CKA of ``x`` (n, p) and ``y`` (n, q) (see :func:`pooled`) on the examples of
    each class separately (``labels``: n integer class ids, tensor, array or list). Keys are
    the classes present, sorted; a class with fewer than ``min_examples`` (default 3) examples gets NaN rather
    than a value computed from one or two points (CKA of two centred points is always 1).
    Within a class CKA only sees the within-class variation, so it is usually lower than
    the CKA over all examples, and noisy for classes with few examples next to the widths.
    """
    X, Y = _as_matrix("x", x), _as_matrix("y", y)
    classes = torch.as_tensor(np.asarray(labels)).reshape(-1)
    if classes.numel() != X.shape[0] or Y.shape[0] != X.shape[0]:
        raise UserError(f"per_class_cka: x, y and labels must have the same length, got "
                        f"{X.shape[0]}, {Y.shape[0]} and {classes.numel()}")
    result: dict[int, float] = {}
    for label in sorted({int(c) for c in classes.tolist()}):
        rows = classes == label
        result[label] = linear_cka(X[rows], Y[rows]) if int(rows.sum()) >= min_examples else math.nan
    return result


def _as_series(name: str, values) -> pd.Series:
    if isinstance(values, pd.Series):
        series = values
    elif isinstance(values, Mapping):
        series = pd.Series(dict(values), dtype="float64")
    else:
        raise UserError(f"paired_comparison: {name} must be a pandas Series indexed by seed or a "
                        f"dict seed -> value, got {type(values).__name__}")
    if not series.index.is_unique:
        raise UserError(f"paired_comparison: {name} has repeated seeds")
    return series.astype("float64").dropna()


def paired_comparison(a, b, higher_is_better: bool, alpha: float = 0.05) -> dict:
    """Compare two methods' metric values on the same seeds (same split and initialisation).

    ``a`` and ``b``: pandas Series indexed by seed, or dicts seed -> value. Only seeds with a
    (non-NaN) value in both count. The differences are oriented so that positive = ``a``
    better: ``a - b`` if ``higher_is_better`` else ``b - a`` (e.g. RMSE).

    Returns a dict:

    * ``n``: number of paired seeds; ``seeds``: them, sorted;
    * ``mean_diff``, ``std_diff`` (ddof=1): of the oriented differences;
    * ``wins``: seeds on which ``a`` is strictly better; ``ties``: seeds of equal values;
    * ``p_ttest``: two-sided paired t-test (``scipy.stats.ttest_rel``);
    * ``p_wilcoxon``: two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, default
      ``method="auto"``): the exact null distribution when there are no zero or tied
      differences (up to 50 seeds), else for up to 13 seeds an exhaustive sign-flip
      permutation test (also exact, conditional on the observed magnitudes), beyond that
      the normal approximation; zero differences are dropped (``zero_method="wilcox"``).
      **With 5 seeds the smallest possible two-sided p is 2 / 2^5 = 0.0625, so Wilcoxon can
      never reach 0.05**, even when ``a`` wins on every seed; with 6 seeds it is 0.03125;
    * ``ci_low``, ``ci_high``: the ``1 - alpha`` (95% by default) confidence interval of the
      mean difference from the t distribution with n - 1 degrees of freedom; it excludes 0
      exactly when ``p_ttest < alpha``;
    * ``significant``: ``p_ttest < alpha`` (False when ``p_ttest`` is NaN); ``alpha``.

    Degenerate cases, without warnings:

    * n < 2: ``std_diff``, both p-values and the interval are NaN (nothing to test);
    * all differences zero: ``std_diff`` 0, both p-values 1.0, interval (0, 0);
    * differences all equal but nonzero (zero variance; a spread below 1e-12 times the
      largest |value| counts as zero): the t statistic is infinite, so ``p_ttest`` is NaN
      rather than a p of 0 from a degenerate test, and ``significant`` is False; the
      interval collapses to (mean, mean); Wilcoxon is computed as usual (signs and ranks).
    """
    from scipy import stats

    if not 0.0 < alpha < 1.0:
        raise UserError(f"paired_comparison: alpha must be in (0, 1), got {alpha}")
    sa, sb = _as_series("a", a), _as_series("b", b)
    seeds = sorted(sa.index.intersection(sb.index).tolist())
    va, vb = sa[seeds].to_numpy(), sb[seeds].to_numpy()
    diff = (va - vb) if higher_is_better else (vb - va)
    n = len(diff)
    result = {"n": n, "seeds": seeds, "mean_diff": float(diff.mean()) if n else math.nan,
              "std_diff": math.nan, "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()),
              "p_ttest": math.nan,
              "p_wilcoxon": math.nan, "ci_low": math.nan, "ci_high": math.nan,
              "significant": False, "alpha": alpha}
    if n < 2:
        return result
    mean, std = float(diff.mean()), float(diff.std(ddof=1))
    # zero variance, up to the rounding of the subtraction (relative to the values' size)
    if std <= 1e-12 * float(max(np.abs(va).max(), np.abs(vb).max())):
        std = 0.0
    result["std_diff"] = std
    if not diff.any():  # identical on every seed
        result.update(p_ttest=1.0, p_wilcoxon=1.0, ci_low=0.0, ci_high=0.0)
        return result
    result["p_wilcoxon"] = float(stats.wilcoxon(va, vb, alternative="two-sided").pvalue)
    if std == 0.0:
        result.update(ci_low=mean, ci_high=mean)
        return result
    p_ttest = float(stats.ttest_rel(va, vb, alternative="two-sided").pvalue)
    half = float(stats.t.ppf(1.0 - alpha / 2.0, n - 1)) * std / math.sqrt(n)
    result.update(p_ttest=p_ttest, ci_low=mean - half, ci_high=mean + half,
                  significant=bool(p_ttest < alpha))
    return result


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error
    rate): the k-th smallest of m is multiplied by m - k + 1, then each adjusted value is
    raised to the largest before it in that order (monotone), and capped at 1. NaN values
    (comparisons that could not be tested) are left NaN and do not count in m."""
    values = [float(p) for p in pvalues]
    tested = sorted((p, i) for i, p in enumerate(values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(values), 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - k) * p))
        adjusted[i] = running
    return adjusted


def compare_family(a, others: Mapping, higher_is_better: bool, alpha: float = 0.05) -> dict[str, dict]:
    """:func:`paired_comparison` of ``a`` against each of ``others`` (name -> values), as one
    family: each result gains ``p_holm`` (Holm-adjusted paired-t p over the family) and its
    ``significant`` is ``p_holm < alpha``."""
    results = {name: paired_comparison(a, b, higher_is_better, alpha) for name, b in others.items()}
    return holm_family(results, alpha)


def holm_family(results: dict, alpha: float = 0.05) -> dict:
    """Comparisons (name -> :func:`paired_comparison` result) as one family: each gains
    ``p_holm`` (Holm-adjusted paired-t p) and its ``significant`` becomes ``p_holm < alpha``."""
    for result, adjusted in zip(results.values(), holm([r["p_ttest"] for r in results.values()]),
                                strict=True):
        result.update(p_holm=adjusted, significant=bool(adjusted < alpha))
    return results


def cka_heatmap(table: pd.DataFrame, path, title: str = "linear CKA") -> Path:
    """Write a PNG heatmap of a table of CKA values in [0, 1] (rows: methods; columns:
    settings or classes), each cell annotated with its value, NaN cells blank with "n/a".
    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). Creates the
    parent folder; returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    values = np.asarray(table.to_numpy(dtype="float64", na_value=np.nan), dtype="float64")
    if values.ndim != 2 or values.size == 0:
        raise UserError(f"cka_heatmap: the table is empty (shape {table.shape})")
    rows, cols = values.shape
    fig = Figure(figsize=(1.6 + 0.9 * cols, 1.2 + 0.45 * rows))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = _colormap()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(rows):
        for j in range(cols):
            value = values[i, j]
            if np.isnan(value):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="0.45")
            else:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > 0.6 else "white")
    ax.set_xticks(range(cols), [str(c) for c in table.columns], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(rows), [str(r) for r in table.index], fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


def _colormap():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="white")  # NaN cells: blank


# ------------------------------------------------------------------------------ per run
@torch.no_grad()
def pooled_states(model, layer: str, split, side: str = "student", batch_size: int = 1024) -> torch.Tensor:
    """``model``'s state at ``layer`` for every example of ``split`` (a :class:`Split`, in
    order, eval mode), pooled to (n, d) float64 (:func:`pooled`). ``side`` picks the
    batch's inputs (``"student"`` or ``"teacher"``). Sequence splits (``split.lengths``)
    pool over each example's real tokens only."""
    from talkingmodels import taps

    was_training = model.training
    model.eval()
    parts = []
    parameter = next(model.parameters(), None)
    device, dtype = (parameter.device, parameter.dtype) if parameter is not None else ("cpu", None)
    try:
        for batch in split.batches(batch_size):
            batch = batch.to(device)
            inputs, kwargs = ((batch.student_inputs, batch.student_kwargs) if side == "student"
                              else (batch.teacher_inputs, batch.teacher_kwargs))
            if dtype == torch.bfloat16:  # a teacher held in bf16 reads bf16 images
                inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
            # (the forward stops at the layer: a large teacher's later layers cost nothing)
            state = taps.state_at(model, layer, *inputs, **kwargs).float()
            parts.append(pooled(state, token_mask(batch, state)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(parts)


def class_accuracy(prediction: torch.Tensor, target: torch.Tensor) -> dict[int, float]:
    """Accuracy of class logits on the examples of each true class."""
    hits = prediction.argmax(dim=1) == target
    return {int(c): float(hits[target == c].float().mean()) for c in target.unique().tolist()}
