"""Tables and plots from a runs store: ``results.csv`` (+ ``curves/``) -> ``report.md``,
``summary.csv`` and one PNG of validation curves per setting."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from talkingmodels.errors import UserError
from talkingmodels.tasks import get_task

REFERENCE = "scratch"


def relative_gain(value: float, reference: float, higher_is_better: bool) -> float:
    """Improvement over the reference in percent (positive = better, either direction)."""
    change = (value - reference) if higher_is_better else (reference - value)
    return 100.0 * change / reference


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, setting, method): mean, std, n, gain over scratch, paired wins."""
    rows = []
    for (task, setting), group in results.groupby(["task", "setting"], sort=False):
        higher = get_task(task).metric.higher_is_better
        reference = group[group.method == REFERENCE].set_index("seed")["value"].dropna()
        for method, runs in group.groupby("method", sort=False):
            failed = runs[runs.value.isna()]  # kept in the store, shown, not averaged
            values = runs.set_index("seed")["value"].dropna()
            row = {"task": task, "setting": setting, "method": method,
                   "metric": runs.metric.iloc[0], "mean": values.mean(),
                   "std": values.std(ddof=1) if len(values) > 1 else 0.0, "n": len(values),
                   "val_mean": runs.val_value.mean(),
                   "teacher": runs.teacher_value.iloc[0], "extra_params": runs.extra_params.iloc[0],
                   "epochs": runs.best_epoch.mean(), "seconds": runs.seconds.mean(),
                   "failed": len(failed)}
            if len(reference):
                row["gain_pct"] = relative_gain(values.mean(), reference.mean(), higher)
                paired = values.index.intersection(reference.index)
                better = (values[paired] > reference[paired]) if higher else \
                    (values[paired] < reference[paired])
                row["wins"] = f"{int(better.sum())}/{len(paired)}"
            rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(summary: pd.DataFrame) -> str:
    metric = summary.metric.iloc[0]
    lines = [f"| method | test {metric} (mean ± std) | gain vs scratch | beats scratch | n | "
             f"val {metric} | best epoch | s/run | extra params |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        gain = f"{r['gain_pct']:+.2f}%" if "gain_pct" in r and pd.notna(r.get("gain_pct")) else "n/a"
        wins = r.get("wins", "n/a") if r["method"] != REFERENCE else "-"
        n = f"{r['n']} ({r['failed']} failed)" if r["failed"] else f"{r['n']}"
        lines.append(f"| {r['method']} | {r['mean']:.4f} ± {r['std']:.4f} | {gain} | {wins} | "
                     f"{n} | {r['val_mean']:.4f} | {r['epochs']:.1f} | {r['seconds']:.1f} | "
                     f"{int(r['extra_params'])} |")
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
            if row.empty:
                cells += ["n/a"] * 3
                continue
            r = row.iloc[0]
            gain = f"{r['gain_pct']:+.2f}%" if pd.notna(r.get("gain_pct")) else "n/a"
            cells += [f"{r['val_mean']:.4f}", f"{r['mean']:.4f} ± {r['std']:.4f}", gain]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: pd.DataFrame, focus: str = "td") -> str:
    """``focus`` against every other method of one setting, paired by seed (same split,
    same student initialisation): mean difference and the seeds on which ``focus`` wins."""
    higher = get_task(results.task.iloc[0]).metric.higher_is_better
    table = results.pivot_table(index="seed", columns="method", values="value")
    if focus not in table:
        return ""
    lines = [f"| {focus} against | mean difference ({focus} better if > 0) | {focus} better on |",
             "|---|---|---|"]
    for other in table.columns:
        if other == focus:
            continue
        pair = table[[focus, other]].dropna()
        diff = (pair[focus] - pair[other]) * (1 if higher else -1)
        lines.append(f"| {other} | {diff.mean():+.4f} | {int((diff > 0).sum())}/{len(diff)} |")
    return "\n".join(lines)


def plot_curves(curves: pd.DataFrame, out: Path) -> list[Path]:
    """Mean validation metric per epoch and method, one PNG per (task, setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    val = curves[curves.name.str.startswith("val_")]
    for (task, setting), group in val.groupby(["task", "setting"], sort=False):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for method, runs in group.groupby("method", sort=False):
            mean = runs.groupby("epoch")["value"].mean()
            # Solid while every seed still trains; dotted once early stopping has ended some
            # (the mean of the survivors is then a biased view).
            complete = int(runs.groupby("seed")["epoch"].max().min())
            line, = ax.plot(mean.index[mean.index <= complete], mean[mean.index <= complete],
                            label=method, linewidth=1.5)
            ax.plot(mean.index[mean.index >= complete], mean[mean.index >= complete],
                    linestyle=":", linewidth=1.0, color=line.get_color())
        # Zoom on where methods differ; a diverging run must not flatten every other curve.
        means = group.groupby(["method", "epoch"])["value"].mean()
        low, high = means.min(), means.quantile(0.9)
        if high > low:  # (a single point has no range to zoom on)
            ax.set_ylim(low - 0.05 * (high - low), high)
        metric = group.name.iloc[0][len("val_"):]
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {metric} (mean over seeds)")
        ax.set_title(f"{task} / {setting} (dotted: some seeds stopped early)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"curves_{task}_{setting}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(out: Path) -> Path:
    """Write ``report.md`` and the plots for the runs stored in ``out``."""
    results_path = Path(out) / "results.csv"
    if not results_path.is_file():
        raise UserError(f"no results.csv in {out}; run an experiment first")
    results = pd.read_csv(results_path)
    summary = summarise(results)
    lines = ["# talkingmodels report", "",
             f"Runs: {len(results)} (from `results.csv`). Gains are relative to `scratch` "
             "(positive = better); *beats scratch* counts the seeds on which the method's "
             "test metric is better than scratch's on the same seed.", ""]
    for task, group in summary.groupby("task", sort=False):
        if group.setting.nunique() > 1:
            lines += [f"## {task}: all settings", "", overview_table(group), ""]
    for (task, setting), group in summary.groupby(["task", "setting"], sort=False):
        lines += [f"## {task} / {setting}", "",
                  f"Teacher (frozen, pre-trained) test {group.metric.iloc[0]}: "
                  f"{group.teacher.iloc[0]:.4f}", "", markdown_table(group), ""]
        paired = paired_table(results[(results.task == task) & (results.setting == setting)])
        if paired:
            lines += ["Paired by seed:", "", paired, ""]
        lines += [f"![validation curves](curves_{task}_{setting}.png)", ""]
    curve_files = sorted(Path(out).glob("curves/*.csv"))
    if (Path(out) / "curves.csv").is_file():  # the single-file layout of older stores
        curve_files.append(Path(out) / "curves.csv")
    if curve_files:
        plot_curves(pd.concat([pd.read_csv(path) for path in curve_files]), Path(out))
    summary.to_csv(Path(out) / "summary.csv", index=False)
    report = Path(out) / "report.md"
    report.write_text("\n".join(lines))
    return report
