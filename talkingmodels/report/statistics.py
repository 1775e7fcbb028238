"""Numbers from a runs store: per-setting summaries, gains over the reference, paired
comparisons, and which rows are methods and which are TD's ablation variants."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Study:
    """Whom a report is about: the method under study (``focus``, its ablation variants are
    the ablation suite's other labels), the ``reference`` every gain is measured against, and
    the ``baseline`` whose per-class losses against the reference define the "undistillable"
    classes. Parameters of the report, so that another method can be studied."""

    focus: str = "td"
    reference: str = "scratch"
    baseline: str = "logit-kd"

    @property
    def name(self) -> str:
        """How the prose names the focus (TD is the project's own method's name)."""
        return "TD" if self.focus == "td" else self.focus


STUDY = Study()
REFERENCE = STUDY.reference  # (the default reference, for callers that name it)


def relative_gain(value: float, reference: float, higher_is_better: bool) -> float:
    """Improvement over the reference in percent (positive = better, either direction)."""
    change = (value - reference) if higher_is_better else (reference - value)
    return 100.0 * change / reference


def _higher(frame: pd.DataFrame) -> bool:
    """Whether the metric of these rows (one task's) improves upwards, as the store recorded
    it per run (``higher_is_better``; a summary's ``higher``)."""
    column = frame["higher" if "higher" in frame else "higher_is_better"]
    return str(column.iloc[0]) == "True"  # (a CSV cell reads as a bool or as text)


def _na_runs(results: pd.DataFrame) -> pd.Series:
    """Which rows of a store are n/a (a method with no meaning for the task), not runs."""
    return results.status.astype(str).str.startswith("n/a")


def summarise(results: pd.DataFrame, study: Study = STUDY) -> pd.DataFrame:
    """One row per (task, setting, method): mean, std, n, gain over the reference, paired
    wins against it."""
    rows = []
    for (task, setting), group in results.groupby(["task", "setting"], sort=False):
        higher = _higher(group)
        reference = group[group.method == study.reference].set_index("seed")["value"].dropna()
        for method, runs in group.groupby("method", sort=False):
            na = _na_runs(runs)
            if na.all():  # the method has no meaning for this task (e.g. class logits on ratings)
                rows.append({"task": task, "setting": setting, "method": method, "na": True,
                             "higher": higher, "reason": str(runs.status.iloc[0])[len("n/a: "):],
                             "metric": runs.metric.iloc[0], "n": 0, "failed": 0,
                             "teacher": runs.teacher_value.iloc[0], "extra_params": 0})
                continue
            runs = runs[~na]
            failed = runs[runs.value.isna()]  # kept in the store, shown, not averaged
            values = runs.set_index("seed")["value"].dropna()
            row = {"task": task, "setting": setting, "method": method, "higher": higher,
                   "metric": runs.metric.iloc[0], "mean": values.mean(),
                   "std": values.std(ddof=1) if len(values) > 1 else 0.0, "n": len(values),
                   "val_mean": runs.val_value.mean(),
                   "teacher": runs.teacher_value.iloc[0], "extra_params": runs.extra_params.iloc[0],
                   "epochs": runs.best_epoch.mean(), "seconds": runs.seconds.mean(),
                   "failed": len(failed), "na": False,
                   "cka": runs.cka.mean(),
                   # the largest of the runs' peaks (each the whole process, data and teacher too)
                   "peak_gib": runs.peak_gib.max()}
            if len(reference):
                row["gain_pct"] = relative_gain(values.mean(), reference.mean(), higher)
                paired = values.index.intersection(reference.index)
                better = (values[paired] > reference[paired]) if higher else \
                    (values[paired] < reference[paired])
                row["wins"] = f"{int(better.sum())}/{len(paired)}"
            rows.append(row)
    # tasks by name; settings and methods in the rows' order (the store's reader keeps the
    # order they were run in)
    return pd.DataFrame(rows).sort_values("task", kind="stable", ignore_index=True)


def _rank(order: list[str]):
    """Sort key: position in ``order``; names not in it after, in their current order
    (with a stable sort)."""
    position = {name: i for i, name in enumerate(order)}
    return lambda names: names.map(lambda name: position.get(name, len(position)))


def _variants(study: Study = STUDY) -> list[str]:
    """The labels of the focus's ablation variants (the ablation suite but the reference and
    the focus itself)."""
    from talkingmodels.suites import VARIANTS

    return [label for label in VARIANTS if label not in (study.reference, study.focus)]


def without_variants(frame: pd.DataFrame, study: Study = STUDY) -> pd.DataFrame:
    """The rows of methods (not of the ablation variants): the tables comparing methods,
    and "the best other method", leave the variants to the ablation tables."""
    return frame[~frame.method.isin(_variants(study))]


def _ablation_only(frame: pd.DataFrame, study: Study = STUDY) -> pd.Series:
    """Per row: whether its (task, setting) holds ablation variants and no method but the
    reference and the focus, i.e. was run for the ablations only."""
    variant = frame.method.isin(_variants(study))
    other = ~variant & ~frame.method.isin([study.reference, study.focus])
    by = [frame.task, frame.setting]
    return variant.groupby(by).transform("any") & ~other.groupby(by).transform("any")


def compared(frame: pd.DataFrame, study: Study = STUDY) -> pd.DataFrame:
    """The rows of methods on the settings where methods are compared: a setting that holds
    TD's ablation variants and no method but scratch and TD (text's ``tweets-1k``) was run
    for the ablations only, so the tables across methods leave it out (its columns would
    be n/a for every other method, and TD's average gain would count one more setting than
    theirs); its own section and the ablation tables show it. A store of the ablations
    alone keeps all its settings: scratch and TD are the methods it compares."""
    variant, ablation_only = frame.method.isin(_variants(study)), _ablation_only(frame, study)
    if ablation_only[~variant].all():
        return frame[~variant]
    return frame[~variant & ~ablation_only]


def _values(results: pd.DataFrame) -> pd.DataFrame:
    """Test metric by seed (rows) and method (columns); failed and n/a runs left out."""
    return results.pivot_table(index="seed", columns="method", values="value")


def best_other(summary: pd.DataFrame, study: Study = STUDY) -> str | None:
    """The method other than the focus (and the reference) with the best mean test metric."""
    higher = _higher(summary)
    others = summary[(summary.method != study.focus) & (summary.method != study.reference)
                     & ~summary.na.astype(bool)]
    others = others.dropna(subset=["mean"])
    if others.empty:
        return None
    return others.loc[others["mean"].idxmax() if higher else others["mean"].idxmin(), "method"]


def forest_rows(results: pd.DataFrame, study: Study = STUDY) -> pd.DataFrame:
    """Per compared (task, setting) and method but scratch: the gain over scratch in percent
    of scratch's mean, paired by seed, with its 95% interval (the t interval of the mean
    paired difference, scaled the same way)."""
    from talkingmodels.analysis import paired_comparison

    runs = compared(results, study)
    runs = runs[~_na_runs(runs)]
    rows = []
    for (task, setting), group in runs.groupby(["task", "setting"], sort=False):
        values = group.pivot_table(index="seed", columns="method", values="value")
        if study.reference not in values:
            continue
        higher, scale = _higher(group), 100.0 / values[study.reference].mean()
        for method in dict.fromkeys(group.method):
            if method == study.reference or method not in values:  # (all its runs failed)
                continue
            test = paired_comparison(values[method], values[study.reference], higher)
            rows.append({"task": task, "setting": setting, "method": method, "n": test["n"],
                         "gain_pct": scale * test["mean_diff"], "low_pct": scale * test["ci_low"],
                         "high_pct": scale * test["ci_high"]})
    return pd.DataFrame(rows)


def _per_class(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean over seeds of a per-class JSON column: methods x classes (named, where the
    task names its classes)."""
    import json

    rows = [{"method": r.method, **{int(k): v for k, v in json.loads(r[column]).items()}}
            for _, r in runs.iterrows() if isinstance(r[column], str)]
    frame = pd.DataFrame(rows).groupby("method", sort=False).mean()
    frame = frame[sorted(frame.columns)].astype(float)
    recorded = runs.class_names.dropna() if "class_names" in runs else ()
    names = json.loads(recorded.iloc[0]) if len(recorded) else []  # as the store recorded them
    return frame.rename(columns=lambda c: names[c] if c < len(names) else c)
