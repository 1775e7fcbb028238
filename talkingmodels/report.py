"""Tables and plots from a runs store: ``results.csv`` (+ ``curves.csv.gz``) -> ``report.md``,
``summary.csv`` and one PNG of validation curves per setting."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from talkingmodels.errors import UserError
from talkingmodels.store import read_curves, read_results
from talkingmodels.tasks import get_task

REFERENCE = "scratch"


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


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, setting, method): mean, std, n, gain over scratch, paired wins."""
    rows = []
    for (task, setting), group in results.groupby(["task", "setting"], sort=False):
        higher = _higher(group)
        reference = group[group.method == REFERENCE].set_index("seed")["value"].dropna()
        for method, runs in group.groupby("method", sort=False):
            na = _na_runs(runs)
            if na.all():  # the method has no meaning for this task (e.g. class logits on ratings)
                rows.append({"task": task, "setting": setting, "method": method, "na": True,
                             "higher": higher,
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
    return _in_suite_order(pd.DataFrame(rows))


def _suite_order(task: str) -> tuple[list[str], list[str]]:
    """A task's settings and method labels in the order of its bench suites (the full
    suite, then the ablations)."""
    from talkingmodels import suites

    cls = get_task(task)
    settings = [*suites.settings(cls, "full"), *suites.settings(cls, "ablations")]
    labels = [entry["label"] for suite in ("full", "ablations") for entry in suites.methods(cls, suite)]
    return list(dict.fromkeys(settings)), list(dict.fromkeys(labels))


def _rank(order: list[str]):
    """Sort key: position in ``order``; names not in it after, in their current order
    (with a stable sort)."""
    position = {name: i for i, name in enumerate(order)}
    return lambda names: names.map(lambda name: position.get(name, len(position)))


def _in_suite_order(summary: pd.DataFrame) -> pd.DataFrame:
    """Tasks in name order (as bench all runs them), whatever order the store was filled
    in; within a task, settings and methods in the order of its bench suites, others after
    them in the store's order."""
    parts = []
    for task, group in summary.groupby("task", sort=True):
        settings, labels = _suite_order(task)
        group = group.sort_values("method", kind="stable", key=_rank(labels))
        parts.append(group.sort_values("setting", kind="stable", key=_rank(settings)))
    return pd.concat(parts, ignore_index=True)


def _na(row) -> bool:
    """Whether a summary row is a method with no meaning for its task (n/a)."""
    value = row.get("na")
    return bool(value) if value is not None and pd.notna(value) else False


def _gain_text(row) -> str:
    return f"{row['gain_pct']:+.2f}%" if pd.notna(row.get("gain_pct")) else "n/a"


def _cka_text(row) -> str:
    return f"{row['cka']:.3f}" if pd.notna(row.get("cka")) else "-"


def markdown_table(summary: pd.DataFrame) -> str:
    metric = summary.metric.iloc[0]
    lines = [f"| method | test {metric} (mean ± std) | gain vs scratch | beats scratch | n | "
             f"val {metric} | best epoch | s/run | peak GiB | extra params | CKA at h |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        if _na(r):
            lines.append(f"| {r['method']} | n/a (no meaning for this task) |" + " |" * 9)
            continue
        cka, gain = _cka_text(r), _gain_text(r)
        peak = f"{r['peak_gib']:.2f}" if pd.notna(r.get("peak_gib")) else "-"
        wins = r.get("wins", "n/a") if r["method"] != REFERENCE else "-"
        n = f"{r['n']} ({r['failed']} failed)" if r["failed"] else f"{r['n']}"
        lines.append(f"| {r['method']} | {r['mean']:.4f} ± {r['std']:.4f} | {gain} | {wins} | "
                     f"{n} | {r['val_mean']:.4f} | {r['epochs']:.1f} | {r['seconds']:.1f} | {peak} | "
                     f"{int(r['extra_params'])} | {cka} |")
    return "\n".join(lines)


def overview_table(summary: pd.DataFrame) -> str:
    """Methods as rows, settings side by side: validation and test mean (± std over seeds)."""
    settings = list(dict.fromkeys(summary.setting))
    metric = summary.metric.iloc[0]
    head = " | ".join(f"{s}: val {metric} | {s}: test {metric} | {s}: gain" for s in settings)
    lines = [f"| method | {head} |", "|---" * (1 + 3 * len(settings)) + "|"]
    for method in dict.fromkeys(summary.method):
        cells = []
        for setting in settings:
            row = summary[(summary.method == method) & (summary.setting == setting)]
            if row.empty or _na(row.iloc[0]):
                cells += ["n/a"] * 3
                continue
            r = row.iloc[0]
            cells += [f"{r['val_mean']:.4f}", f"{r['mean']:.4f} ± {r['std']:.4f}", _gain_text(r)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    cells = []  # the frozen teacher with its task head, for scale (one value: no seeds)
    higher = _higher(summary)
    for setting in settings:
        rows = summary[summary.setting == setting]
        scratch, teacher = rows[rows.method == REFERENCE], rows.teacher.iloc[0]
        gain = "n/a" if scratch.empty else f"{relative_gain(teacher, scratch['mean'].iloc[0], higher):+.2f}%"
        cells += ["-", f"{teacher:.4f}", gain]
    lines.append("| teacher (frozen) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _variants() -> list[str]:
    """The labels of TD's ablation variants (the ablation suite but scratch and TD itself)."""
    from talkingmodels.suites import ABLATIONS

    return [label for label in ABLATIONS if label not in (REFERENCE, "td")]


def without_variants(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of methods (not of TD's ablation variants): the tables comparing methods,
    and "the best other method", leave the variants to the ablation tables."""
    return frame[~frame.method.isin(_variants())]


def _ablation_only(frame: pd.DataFrame) -> pd.Series:
    """Per row: whether its (task, setting) holds TD's ablation variants and no method but
    scratch and TD, i.e. was run for the ablations only."""
    variant = frame.method.isin(_variants())
    other = ~variant & ~frame.method.isin([REFERENCE, "td"])
    by = [frame.task, frame.setting]
    return variant.groupby(by).transform("any") & ~other.groupby(by).transform("any")


def compared(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of methods on the settings where methods are compared: a setting that holds
    TD's ablation variants and no method but scratch and TD (text's ``tweets-1k``) was run
    for the ablations only, so the tables across methods leave it out (its columns would
    be n/a for every other method, and TD's average gain would count one more setting than
    theirs); its own section and the ablation tables show it. A store of the ablations
    alone keeps all its settings: scratch and TD are the methods it compares."""
    variant, ablation_only = frame.method.isin(_variants()), _ablation_only(frame)
    if ablation_only[~variant].all():
        return frame[~variant]
    return frame[~variant & ~ablation_only]


def _change(label: str) -> str:
    from talkingmodels.suites import ABLATIONS

    return ", ".join(f"{k} {v}" for k, v in ABLATIONS[label].items() if k != "name")


def ablation_table(summary: pd.DataFrame, results: pd.DataFrame) -> str:
    """TD's ablation variants of one setting against the default TD, paired by seed: what
    each changes, its test metric, gain over scratch, difference from TD (positive =
    the variant is better) with the paired t-test, and CKA with the teacher."""
    from talkingmodels.analysis import paired_comparison

    higher = _higher(summary)
    table = _values(results)
    metric = summary.metric.iloc[0]
    lines = [f"| variant | change from td | test {metric} | gain vs scratch | vs td | p (paired t) | "
             "better than td on | CKA at h |", "|---|---|---|---|---|---|---|---|"]
    for label in [REFERENCE, "td", *_variants()]:
        row = summary[summary.method == label]
        if row.empty or _na(row.iloc[0]):
            continue
        r = row.iloc[0]
        gain, cka = _gain_text(r), _cka_text(r)
        if label == "td" or "td" not in table or label not in table:
            versus = ["-", "-", "-"]
        else:
            c = paired_comparison(table[label], table["td"], higher)
            versus = [f"{c['mean_diff']:+.4f}", f"{c['p_ttest']:.3f}", f"{c['wins']}/{c['n']}"]
        change = "(reference)" if label in (REFERENCE, "td") else _change(label)
        lines.append(f"| {label} | {change} | {r['mean']:.4f} ± {r['std']:.4f} | {gain} | "
                     + " | ".join(versus) + f" | {cka} |")
    return "\n".join(lines)


def ablation_overview(summary: pd.DataFrame) -> str:
    """Every ablated setting side by side: each variant's test metric relative to the
    default TD's, in percent (positive = the variant is better); "" without variants."""
    variants = summary[summary.method.isin(_variants())]
    keys = list(dict.fromkeys(zip(variants.task, variants.setting, strict=True)))
    if not keys:
        return ""
    lines = ["| variant | change from td | " + " | ".join(f"{t} / {s}" for t, s in keys) + " |",
             "|---" * (len(keys) + 2) + "|"]
    for label in [REFERENCE, *_variants()]:
        cells = []
        for task, setting in keys:
            group = summary[(summary.task == task) & (summary.setting == setting)]
            row, td = group[group.method == label], group[group.method == "td"]
            if row.empty or td.empty or _na(row.iloc[0]):
                cells.append("n/a")
                continue
            higher = _higher(summary[summary.task == task])
            cells.append(f"{relative_gain(row.iloc[0]['mean'], td.iloc[0]['mean'], higher):+.2f}%")
        if set(cells) != {"n/a"}:
            change = "no distillation" if label == REFERENCE else _change(label)
            lines.append(f"| {label} | {change} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _values(results: pd.DataFrame) -> pd.DataFrame:
    """Test metric by seed (rows) and method (columns); failed and n/a runs left out."""
    return results.pivot_table(index="seed", columns="method", values="value")


def paired_table(results: pd.DataFrame, focus: str = "td") -> str:
    """``focus`` against every other method of one setting, paired by seed (same split,
    same student initialisation): mean difference with its 95% interval, the paired t-test
    and the exact Wilcoxon signed-rank p-values, and the seeds on which ``focus`` wins."""
    from talkingmodels.analysis import paired_comparison

    higher = _higher(results)
    table = _values(results)
    if focus not in table:
        return ""
    lines = [f"| {focus} against | mean difference ({focus} better if > 0) | 95% interval | "
             f"p (paired t) | p (Wilcoxon) | {focus} better on | at 5% |",
             "|---|---|---|---|---|---|---|"]
    for other in table.columns:
        if other == focus:
            continue
        c = paired_comparison(table[focus], table[other], higher)
        verdict = "significant" if c["significant"] else "not significant"
        lines.append(f"| {other} | {c['mean_diff']:+.4f} | [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | "
                     f"{c['p_ttest']:.3f} | {c['p_wilcoxon']:.3f} | {c['wins']}/{c['n']} | {verdict} |")
    return "\n".join(lines)


def best_other(summary: pd.DataFrame, focus: str = "td") -> str | None:
    """The method other than ``focus`` (and scratch) with the best mean test metric."""
    higher = _higher(summary)
    others = summary[(summary.method != focus) & (summary.method != REFERENCE) & ~summary.na.astype(bool)]
    others = others.dropna(subset=["mean"])
    if others.empty:
        return None
    return others.loc[others["mean"].idxmax() if higher else others["mean"].idxmin(), "method"]


def significance_line(results: pd.DataFrame, summary: pd.DataFrame, focus: str = "td") -> str:
    """One plain sentence: ``focus`` against the best other method of the setting."""
    from talkingmodels.analysis import paired_comparison

    other = best_other(summary, focus)
    table = _values(results)
    if other is None or focus not in table or other not in table:
        return ""
    c = paired_comparison(table[focus], table[other], _higher(summary))
    word = "better" if c["mean_diff"] > 0 else "worse"
    claim = ("the difference is significant at 5%" if c["significant"] else
             "the difference is **not** significant at 5%")
    return (f"{focus} against the best other method ({other}): {word} by {abs(c['mean_diff']):.4f} "
            f"on average, better on {c['wins']} of {c['n']} seeds, paired t-test p = {c['p_ttest']:.3f}: "
            f"{claim}.")


def versus_table(results: pd.DataFrame, summary: pd.DataFrame, focus: str = "td") -> str:
    """``focus`` against every other method on every setting of a store, paired by seed:
    "better" or "worse" where the paired t-test says so at 5%, else "n.s.", with its p; the
    last column counts the settings each way. docs/results.md's plain words on where TD wins
    are read off this table."""
    from talkingmodels.analysis import paired_comparison

    keys = list(dict.fromkeys(zip(summary.task, summary.setting, strict=True)))
    lines = [f"| {focus} against | " + " | ".join(f"{t} / {s}" for t, s in keys) +
             f" | {focus} better / worse |", "|---" * (len(keys) + 2) + "|"]
    tables = {(task, setting): _values(results[(results.task == task) & (results.setting == setting)])
              for task, setting in keys}
    for other in dict.fromkeys(summary.method):
        if other == focus:
            continue
        cells, counts = [], {"better": 0, "worse": 0, "n.s.": 0}
        for (task, _), table in tables.items():
            c = (paired_comparison(table[focus], table[other], _higher(summary[summary.task == task]))
                 if focus in table and other in table else None)
            if c is None or pd.isna(c["p_ttest"]):
                cells.append("n/a")
                continue
            word = ("better" if c["mean_diff"] > 0 else "worse") if c["significant"] else "n.s."
            counts[word] += 1
            cells.append(f"{word} (p {c['p_ttest']:.3f})")
        lines.append(f"| {other} | " + " | ".join(cells) + f" | {counts['better']} / {counts['worse']} |")
    return "\n".join(lines)


def gains_table(summary: pd.DataFrame) -> str:
    """The paper's Table 1, extended: every method's relative improvement over scratch in
    every (task, setting) of the store, and its average across them."""
    keys = list(dict.fromkeys(zip(summary.task, summary.setting, strict=True)))
    lines = ["| method | " + " | ".join(f"{t} / {s}" for t, s in keys) + " | average |",
             "|---" * (len(keys) + 2) + "|"]
    for method in dict.fromkeys(summary.method):
        cells, gains = [], []
        for task, setting in keys:
            row = summary[(summary.task == task) & (summary.setting == setting) & (summary.method == method)]
            usable = not row.empty and not _na(row.iloc[0])
            gain = row.iloc[0].get("gain_pct") if usable else None
            if gain is None or pd.isna(gain):
                cells.append("n/a")
            else:
                cells.append(f"{gain:+.2f}%")
                gains.append(gain)
        average = f"{sum(gains) / len(gains):+.2f}% ({len(gains)})" if gains else "n/a"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)


def cka_section(results: pd.DataFrame, summary: pd.DataFrame, task: str, out: Path) -> list[str]:
    """Linear CKA between each method's student and the teacher at h (test split, mean
    over seeds): a table and a heatmap of methods x settings; for classification, the same
    per class, and whether TD gains most where logit KD does not help ("undistillable"
    classes: those whose test accuracy logit-kd lowers against scratch)."""
    from talkingmodels.analysis import cka_heatmap

    group = summary[summary.task == task]
    if "cka" not in group or group.cka.isna().all():
        return []
    table = group.pivot_table(index="method", columns="setting", values="cka", sort=False)
    table = table.reindex(index=list(dict.fromkeys(group.method)),
                          columns=list(dict.fromkeys(group.setting)))
    cka_heatmap(table, out / f"cka_{task}.png", f"{task}: linear CKA with the teacher at h (test)")
    lines = [f"### {task}: representation similarity", "",
             "Linear CKA between the student's and the teacher's state at `h` on the test split "
             "(each pooled to one vector per example), mean over seeds:", "",
             "| method | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join("n/a" if pd.isna(v) else f"{v:.3f}" for v in row) + " |"
              for m, row in table.iterrows()]
    lines += ["", f"![CKA](cka_{task}.png)", ""]
    runs = results[(results.task == task) & results.class_metric.notna()]
    for setting, per_setting in runs.groupby("setting", sort=False):
        lines += undistillable(per_setting, setting, task, out)
    return lines


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


def undistillable(runs: pd.DataFrame, setting: str, task: str, out: Path) -> list[str]:
    """The per-class CKA heatmap of one setting and :func:`undistillable_table`."""
    from talkingmodels.analysis import cka_heatmap

    if "cka_classes" not in runs:
        return []
    path = cka_heatmap(_per_class(runs, "cka_classes"), out / f"cka_classes_{task}_{setting}.png",
                       f"{task} / {setting}: per-class CKA with the teacher at h")
    return [f"Per-class CKA, {setting} (mean over seeds): ![per-class CKA]({path.name})", "",
            *undistillable_table(runs, setting)]


def undistillable_table(runs: pd.DataFrame, setting: str) -> list[str]:
    """The paper's claim that TD helps most on "undistillable" classes, as numbers: the
    classes whose test accuracy logit-kd lowers against scratch (mean over seeds), and each
    method's mean per-class accuracy gain over scratch and CKA on them and on the others."""
    if not {"cka_classes", "class_metric"} <= set(runs) or runs.class_metric.isna().all():
        return []
    cka, accuracy = _per_class(runs, "cka_classes"), _per_class(runs, "class_metric")
    if not {REFERENCE, "logit-kd"} <= set(accuracy.index):
        return []
    gain = accuracy - accuracy.loc[REFERENCE]  # per-class accuracy gain over scratch
    hard = gain.columns[gain.loc["logit-kd"] < 0]
    easy = gain.columns[gain.loc["logit-kd"] >= 0]
    lines = [f"Undistillable classes of {setting} (logit-kd's per-class test accuracy below "
             f"scratch's): {', '.join(map(str, hard)) or 'none'}. Mean per-class accuracy gain "
             "over scratch, in points:", "",
             "| method | on undistillable classes | on the other classes | CKA, undistillable "
             "| CKA, other |",
             "|---|---|---|---|---|"]

    def points(method, columns):
        return f"{100 * gain.loc[method, columns].mean():+.2f}" if len(columns) else "n/a"

    def similarity(method, columns):
        ok = len(columns) and method in cka.index
        return f"{cka.loc[method, columns].mean():.3f}" if ok else "n/a"

    order = _suite_order(runs.task.iloc[0])[1] if "task" in runs else []
    for method in gain.index.to_series().sort_values(kind="stable", key=_rank(order)):
        lines.append(f"| {method} | {points(method, hard)} | {points(method, easy)} | "
                     f"{similarity(method, hard)} | {similarity(method, easy)} |")
    return [*lines, ""]


def _plot_panel(ax, group: pd.DataFrame, task: str, higher: bool) -> None:
    """One axis of validation curves, methods in the suite's order: TD in black and scratch
    in grey as the references, every other method in a colour of its own (tab20: an
    ablation panel has 20 lines)."""
    colours = iter(_colours(len(set(group.method))))
    group = group.sort_values("method", kind="stable", key=_rank(_suite_order(task)[1]))
    for method, runs in group.groupby("method", sort=False):
        mean = runs.groupby("epoch")["value"].mean()
        style = {"td": {"color": "black", "linewidth": 2.2},
                 REFERENCE: {"color": "grey", "linewidth": 2.2}}.get(method)
        style = style or {"color": next(colours), "linewidth": 1.3}
        # Solid while every seed still trains; dotted once early stopping has ended some
        # (the mean of the survivors is then a biased view).
        complete = int(runs.groupby("seed")["epoch"].max().min())
        ax.plot(mean.index[mean.index <= complete], mean[mean.index <= complete], label=method, **style)
        ax.plot(mean.index[mean.index >= complete], mean[mean.index >= complete], linestyle=":",
                color=style["color"], linewidth=1.0)
    # Zoom on where methods differ; a diverging or collapsed run (high RMSE, low accuracy)
    # must not flatten every other curve, and the best curves must stay in view.
    means = group.groupby(["method", "epoch"])["value"].mean()
    low, high = (means.quantile(0.1), means.max()) if higher else (means.min(), means.quantile(0.9))
    if high > low:  # (a single point has no range to zoom on)
        margin = 0.05 * (high - low)
        ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def _colours(n: int) -> list:
    import matplotlib

    return [matplotlib.colormaps["tab20" if n > 10 else "tab10"](i % 20) for i in range(n)]


def plot_curves(curves: pd.DataFrame, out: Path, results: pd.DataFrame) -> list[Path]:
    """Mean validation metric per epoch and method, one PNG per (task, setting): the
    methods in one panel and, where the setting was ablated, TD's variants in a second
    (``results``: the store's rows, for each task's metric direction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    val = curves[curves.name.str.startswith("val_")]
    for (task, setting), group in val.groupby(["task", "setting"], sort=False):
        variants = group.method.isin(_variants())
        # (a setting run for the ablations only has no methods of its own to show)
        panels = [] if _ablation_only(group).all() else [("methods", group[~variants])]
        if variants.any():
            references = group.method.isin([REFERENCE, "td"])
            panels.append(("TD's ablations", group[variants | references]))
        fig, axes = plt.subplots(1, len(panels), figsize=(7.6 * len(panels), 4.4), squeeze=False)
        for ax, (title, rows) in zip(axes[0], panels, strict=True):
            _plot_panel(ax, rows, task, _higher(results[results.task == task]))
            ax.set_title(title, fontsize=10)
        metric = group.name.iloc[0][len("val_"):]
        axes[0][0].set_ylabel(f"validation {metric} (mean over seeds)")
        fig.suptitle(f"{task} / {setting} (dotted: some seeds stopped early)", fontsize=11)
        fig.tight_layout()
        path = out / f"curves_{task}_{setting}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def forest_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Per compared (task, setting) and method but scratch: the gain over scratch in percent
    of scratch's mean, paired by seed, with its 95% interval (the t interval of the mean
    paired difference, scaled the same way)."""
    from talkingmodels.analysis import paired_comparison

    runs = compared(results)
    runs = runs[~_na_runs(runs)]
    rows = []
    for (task, setting), group in runs.groupby(["task", "setting"], sort=False):
        values = group.pivot_table(index="seed", columns="method", values="value")
        if REFERENCE not in values:
            continue
        higher, scale = _higher(group), 100.0 / values[REFERENCE].mean()
        for method in dict.fromkeys(group.method):
            if method == REFERENCE or method not in values:  # (a method whose runs all failed)
                continue
            test = paired_comparison(values[method], values[REFERENCE], higher)
            rows.append({"task": task, "setting": setting, "method": method, "n": test["n"],
                         "gain_pct": scale * test["mean_diff"], "low_pct": scale * test["ci_low"],
                         "high_pct": scale * test["ci_high"]})
    return pd.DataFrame(rows)


def forest_plot(results: pd.DataFrame, path: Path, focus: str = "td") -> Path | None:
    """The summary figure of a store: each method's gain over scratch with its 95% interval,
    one panel per setting in the report's order (``focus`` in black); None when no setting
    has scratch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = forest_rows(results)
    if rows.empty:
        return None
    order = compared(summarise(results))  # tasks by name, settings and methods in suite order
    panels = [key for key in dict.fromkeys(zip(order.task, order.setting, strict=True))
              if key in set(zip(rows.task, rows.setting, strict=True))]
    methods = [m for m in dict.fromkeys(order.method) if m in set(rows.method)][::-1]  # first on top
    columns = min(len(panels), 3)
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.4 * columns, 0.32 * len(methods) * lines + 1.2),
                             sharey=True, squeeze=False)
    for ax, (task, setting) in zip(axes.flat, panels, strict=False):
        mine = rows[(rows.task == task) & (rows.setting == setting)].set_index("method")
        for y, method in enumerate(methods):
            if method not in mine.index:
                continue
            row = mine.loc[method]
            colour = "black" if method == focus else "tab:blue"
            ax.errorbar(row.gain_pct, y, xerr=[[row.gain_pct - row.low_pct], [row.high_pct - row.gain_pct]],
                        fmt="o", color=colour, markersize=4, capsize=2, linewidth=1.2)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_title(f"{task} / {setting}", fontsize=9)
        ax.set_xlabel("gain over scratch (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0, 0].set_yticks(range(len(methods)), methods)
    fig.suptitle("Gain over scratch: mean over seeds and 95% interval (paired by seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path) -> Path:
    """Write ``report.md`` and the plots for the runs stored in ``out``."""
    results = read_results(out)
    summary = summarise(results)
    lines = ["# talkingmodels report", "",
             f"Runs: {len(results)} (from `results.csv`). Gains are relative to `scratch` "
             "(positive = better); *beats scratch* counts the seeds on which the method's "
             "test metric is better than scratch's on the same seed.", ""]
    methods = compared(summary)
    if forest_plot(results, Path(out) / "forest.png") is not None:
        lines += ["![gain over scratch with 95% intervals](forest.png)", ""]
    if len(methods.groupby(["task", "setting"])) > 1:
        lines += ["## Relative improvement over scratch, every setting", "",
                  "Mean test metric against scratch's, in percent (positive = better); the average "
                  "is over the settings where the method applies (their count in brackets).", "",
                  gains_table(methods), ""]
        if "td" in set(methods.method):
            lines += ["## TD against every method, every setting", "",
                      "Paired by seed; better or worse where the paired t-test says so at 5%, else "
                      "n.s. (not significant); each setting's full table is under it.", "",
                      versus_table(compared(results), methods), ""]
    if ablations := ablation_overview(summary):
        lines += ["## Ablations of TD, every ablated setting", "",
                  "Each variant's mean test metric against the default TD's, in percent (positive = "
                  "the variant is better); details and paired tests under each setting.", "",
                  ablations, ""]
    for task, group in methods.groupby("task", sort=False):
        if group.setting.nunique() > 1:
            lines += [f"## {task}: all settings", "", overview_table(group), ""]
        # (the variants' CKA is in the ablation tables)
        lines += cka_section(compared(results), methods, task, Path(out))
    for (task, setting), everything in summary.groupby(["task", "setting"], sort=False):
        group = without_variants(everything)
        lines += [f"## {task} / {setting}", "",
                  f"Teacher (frozen, pre-trained) test {group.metric.iloc[0]}: "
                  f"{group.teacher.iloc[0]:.4f}", "", markdown_table(group), ""]
        runs = results[(results.task == task) & (results.setting == setting)]
        paired = paired_table(without_variants(runs))
        if paired:
            line = significance_line(without_variants(runs), group)
            lines += ["Paired by seed (same split and student initialisation per seed):", "",
                      paired, "", *([line, ""] if line else [])]
        if len(group) < len(everything):
            lines += [f"### Ablations of TD, {task} / {setting}", "", ablation_table(everything, runs), ""]
        lines += [f"![validation curves](curves_{task}_{setting}.png)", ""]
    curves = read_curves(out)
    if curves is not None:
        plot_curves(curves, Path(out), results)
    summary.to_csv(Path(out) / "summary.csv", index=False)
    report = Path(out) / "report.md"
    report.write_text("\n".join(lines))
    return report


# ------------------------------------------------------------------------------ README
README_START = "<!-- results of {store} (generated: talkingmodels report {store} --readme {doc}) -->"
README_END = "<!-- end of results of {store} -->"


def readme_markers(doc: str, store: str) -> tuple[str, str]:
    """The two marker lines around ``store``'s generated block in the Markdown file ``doc``
    (both as paths relative to the repository root, as the command is typed there)."""
    return README_START.format(store=store, doc=doc), README_END.format(store=store)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def compute_table(results: pd.DataFrame) -> str:
    """Per task: the runs a store holds, n/a rows, their training time summed over runs (the
    time each ``fit`` took, as it ran: teacher pre-training and caches not included) and the
    largest peak resident memory of a run."""
    trained = results[~_na_runs(results)]
    lines = ["| task | runs | n/a | training time (sum over runs) | largest peak memory of a run |",
             "|---|---|---|---|---|"]
    tasks = sorted(set(results.task))
    for task in [*tasks, *(["all"] if len(tasks) > 1 else [])]:
        mine = results.task == task if task != "all" else results.task.notna()
        runs = trained[mine[trained.index]]
        peak = runs["peak_gib"].max()
        lines.append(f"| {task} | {len(runs)} | {int(mine.sum()) - len(runs)} | "
                     f"{_duration(runs.seconds.sum())} | "
                     f"{'-' if pd.isna(peak) else f'{peak:.2f} GiB'} |")
    return "\n".join(lines)


def readme_block(out: Path) -> str:
    """The results of a runs store as a doc (docs/results.md) shows them: the table of every method's
    gain over scratch across settings, each task's settings side by side, and for each
    setting TD's paired comparison with the best other method. Generated, so the doc
    never carries a number typed by hand."""
    results = read_results(out)
    summary = summarise(results)
    methods = compared(summary)
    lines = []
    for task, group in methods.groupby("task", sort=False):
        lines += [f"**{task}**", "", overview_table(group), ""]
        for setting, per_setting in group.groupby("setting", sort=False):
            runs = without_variants(results[(results.task == task) & (results.setting == setting)])
            if line := significance_line(runs, per_setting):
                lines += [f"- {setting}: {line}"]
        if lines[-1]:  # (after significance lines)
            lines += [""]
        for setting in dict.fromkeys(group.setting):
            lines += undistillable_table(
                without_variants(results[(results.task == task) & (results.setting == setting)]), setting)
    if len(methods.groupby(["task", "setting"])) > 1:
        lines += ["Relative improvement over scratch (average over the settings):", "",
                  gains_table(methods), ""]
        if "td" in set(methods.method):
            lines += ["TD against every method, paired by seed (paired t-test at 5%; n.s.: not "
                      "significant):", "", versus_table(compared(results), methods), ""]
    if ablations := ablation_overview(summary):
        lines += ["Ablations: each variant's test metric against the default TD's (positive = the "
                  "variant is better):", "", ablations, ""]
    if results.peak_gib.notna().any():  # (stores from before peaks were recorded have none)
        lines += ["Runs in this store (2 CPU cores):", "", compute_table(results), ""]
    return "\n".join(lines).rstrip("\n")


def update_readme(readme: Path, out: Path, name: str | None = None) -> Path:
    """Replace the block between the markers for ``out`` in ``readme`` by
    :func:`readme_block`; the markers must already be there (the prose around them is the
    author's)."""
    name = name or Path(out).as_posix()
    doc = Path(readme)
    if doc.is_absolute() and doc.resolve().is_relative_to(Path.cwd().resolve()):
        doc = doc.resolve().relative_to(Path.cwd().resolve())
    start, end = readme_markers(doc.as_posix(), name)
    text = Path(readme).read_text()
    if start not in text or end not in text:
        raise UserError(f"{readme} has no block for {name}; add the two lines\n{start}\n{end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    Path(readme).write_text(f"{head}{start}\n{readme_block(out)}\n{end}{tail}")
    return Path(readme)
