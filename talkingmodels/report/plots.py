"""The figures of a report: validation curves, CKA heatmaps, the forest plot of the gains."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from talkingmodels.io import save_figure
from talkingmodels.report.statistics import (
    STUDY,
    Study,
    _ablation_only,
    _higher,
    _per_class,
    _rank,
    _variants,
    compared,
    forest_rows,
    summarise,
)
from talkingmodels.report.tables import undistillable_table


def cka_section(results: pd.DataFrame, summary: pd.DataFrame, task: str, out: Path,
                study: Study = STUDY) -> list[str]:
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
        lines += undistillable(per_setting, setting, task, out, study)
    return lines


def undistillable(runs: pd.DataFrame, setting: str, task: str, out: Path,
                  study: Study = STUDY) -> list[str]:
    """The per-class CKA heatmap of one setting and :func:`undistillable_table`."""
    from talkingmodels.analysis import cka_heatmap

    if "cka_classes" not in runs:
        return []
    path = cka_heatmap(_per_class(runs, "cka_classes"), out / f"cka_classes_{task}_{setting}.png",
                       f"{task} / {setting}: per-class CKA with the teacher at h")
    return [f"Per-class CKA, {setting} (mean over seeds): ![per-class CKA]({path.name})", "",
            *undistillable_table(runs, setting, study)]


def _plot_panel(ax, group: pd.DataFrame, order: list[str], higher: bool, study: Study) -> None:
    """One axis of validation curves, methods in the suite's order: TD in black and scratch
    in grey as the references, every other method in a colour of its own (tab20: an
    ablation panel has 20 lines)."""
    colours = iter(_colours(len(set(group.method))))
    group = group.sort_values("method", kind="stable", key=_rank(order))
    for method, runs in group.groupby("method", sort=False):
        mean = runs.groupby("epoch")["value"].mean()
        style = {study.focus: {"color": "black", "linewidth": 2.2},
                 study.reference: {"color": "grey", "linewidth": 2.2}}.get(method)
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


def plot_curves(curves: pd.DataFrame, out: Path, results: pd.DataFrame,
                study: Study = STUDY) -> list[Path]:
    """Mean validation metric per epoch and method, one PNG per (task, setting): the
    methods in one panel and, where the setting was ablated, TD's variants in a second
    (``results``: the store's rows, for each task's metric direction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    val = curves[curves.name.str.startswith("val_")]
    for (task, setting), group in val.groupby(["task", "setting"], sort=False):
        if not ((results.task == task) & (results.setting == setting)).any():
            continue  # curves of runs without a row (a run interrupted before its result)
        variants = group.method.isin(_variants(study))
        # (a setting run for the ablations only has no methods of its own to show)
        panels = [] if _ablation_only(group, study).all() else [("methods", group[~variants])]
        if variants.any():
            references = group.method.isin([study.reference, study.focus])
            panels.append((f"{study.name}'s ablations", group[variants | references]))
        fig, axes = plt.subplots(1, len(panels), figsize=(7.6 * len(panels), 4.4), squeeze=False)
        for ax, (title, rows) in zip(axes[0], panels, strict=True):
            mine = results[results.task == task]  # (its methods in the store's order)
            _plot_panel(ax, rows, list(dict.fromkeys(mine.method)), _higher(mine), study)
            ax.set_title(title, fontsize=10)
        metric = group.name.iloc[0][len("val_"):]
        axes[0][0].set_ylabel(f"validation {metric} (mean over seeds)")
        fig.suptitle(f"{task} / {setting} (dotted: some seeds stopped early)", fontsize=11)
        fig.tight_layout()
        path = out / f"curves_{task}_{setting}.png"
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def forest_plot(results: pd.DataFrame, path: Path, study: Study = STUDY) -> Path | None:
    """The summary figure of a store: each method's gain over scratch with its 95% interval,
    one panel per setting in the report's order (the focus in black); None when no setting
    has scratch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = forest_rows(results, study)
    if rows.empty:
        return None
    order = compared(summarise(results, study), study)  # tasks by name, then the run order
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
            colour = "black" if method == study.focus else "tab:blue"
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
    save_figure(fig, path)
    plt.close(fig)
    return path
