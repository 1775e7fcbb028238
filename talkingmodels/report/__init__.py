"""Tables and plots from a runs store: ``results.csv`` (+ ``curves/``) -> ``report.md``,
``summary.csv``, the forest plot of gains and one PNG of validation curves per setting; and the
generated results blocks of the docs. The report reads nothing but the store.

``statistics`` computes, ``tables`` and ``plots`` present, ``blocks`` writes into Markdown docs.
"""

from __future__ import annotations

from pathlib import Path

from talkingmodels.report.ablations import (
    ablation_overview,
    ablation_table,
    diagnostics_table,
    weak_logits_table,
)
from talkingmodels.report.blocks import (
    GAP_INTRO,
    README_END,
    README_START,
    WEAK_LOGITS_INTRO,
    diagnostics_intro,
    readme_block,
    readme_markers,
    update_readme,
)
from talkingmodels.report.plots import cka_section, forest_plot, plot_curves
from talkingmodels.report.statistics import (
    REFERENCE,
    STUDY,
    Study,
    best_other,
    compared,
    forest_rows,
    relative_gain,
    summarise,
    without_variants,
)
from talkingmodels.report.tables import (
    compute_table,
    gains_table,
    gap_table,
    is_tuning,
    markdown_table,
    overview_table,
    paired_table,
    samples_table,
    significance_line,
    tuning_table,
    undistillable_table,
    versus_table,
)
from talkingmodels.report.twins import TWINS_INTRO, twins_section
from talkingmodels.store import machines_text, read_curves, read_results, read_samples

__all__ = [
    "GAP_INTRO", "README_END", "README_START", "REFERENCE", "STUDY", "Study", "WEAK_LOGITS_INTRO",
    "ablation_overview", "ablation_table", "best_other", "cka_section", "compared", "compute_table",
    "diagnostics_intro", "diagnostics_table", "forest_plot", "forest_rows", "gains_table", "gap_table",
    "is_tuning", "markdown_table", "overview_table", "paired_table", "plot_curves", "readme_block",
    "readme_markers", "relative_gain", "significance_line", "summarise", "tuning_table",
    "undistillable_table", "update_readme", "versus_table", "weak_logits_table", "without_variants",
    "write_report",
]


def write_report(out: Path, study: Study = STUDY) -> Path:
    """Write ``report.md`` and the plots for the runs stored in ``out``."""
    results = read_results(out)
    if is_tuning(results):  # validation only: no test number in view when choosing
        report = Path(out) / "report.md"
        report.write_text(f"# talkingmodels report: tuning runs\n\n{readme_block(out, study)}\n")
        return report
    summary = summarise(results, study)
    samples = read_samples(out)
    lines = ["# talkingmodels report", "",
             f"Runs: {len(results)} (from `results.csv`). Gains are relative to `scratch` "
             "(positive = better); *beats scratch* counts the seeds on which the method's "
             "test metric is better than scratch's on the same seed.", "", machines_text(out),
             "Seeded runs reproduce bit for bit on the same machine and software; on another CPU "
             "or version the values differ by floating-point order, and the conclusions are what "
             "should hold.", ""]
    methods = compared(summary, study)
    if forest_plot(results, Path(out) / "forest.png", study) is not None:
        lines += ["![gain over scratch with 95% intervals](forest.png)", ""]
    if len(methods.groupby(["task", "setting"])) > 1 and methods.method.nunique() > 1:
        lines += ["## Relative improvement over scratch, every setting", "",
                  "Mean test metric against scratch's, in percent (positive = better); the average "
                  "is over the settings where the method applies (their count in brackets).", "",
                  gains_table(methods), ""]
        if study.focus in set(methods.method):
            lines += [f"## {study.name} against every method, every setting", "",
                      "Paired by seed; better or worse where the paired t-test says so at 5% after "
                      "Holm's adjustment over the setting's comparisons (the p shown is the adjusted "
                      "one), else n.s. (not significant); each setting's full table is under it.", "",
                      versus_table(compared(results, study), methods, study), ""]
    if methods.method.nunique() > 1 and (gaps := gap_table(methods, study)):
        lines += ["## Share of the scratch-to-teacher gap closed", "", GAP_INTRO, "", gaps, ""]
    if twins := twins_section(results, summary, study):
        lines += ["## One change between twin settings", "", TWINS_INTRO, "", *twins]
    if ablations := ablation_overview(summary, study):
        lines += [f"## Ablations of {study.name}, every ablated setting", "",
                  f"Each variant's mean test metric against the default {study.name}'s, in percent "
                  "(positive = the variant is better); details and paired tests (Holm-adjusted over "
                  "each setting's variants) under each setting.", "",
                  ablations, ""]
        if diagnostics := diagnostics_table(summary, results, study):
            lines += ["## Does the interaction carry the teacher's knowledge?", "",
                      diagnostics_intro(study), "", diagnostics, ""]
    if weak := weak_logits_table(summary, results, study):
        lines += ["## Weak logits, rich features", "", WEAK_LOGITS_INTRO, "", weak, ""]
    for task, group in methods.groupby("task", sort=False):
        if group.setting.nunique() > 1:
            lines += [f"## {task}: all settings", "", overview_table(group), ""]
        # (the variants' CKA is in the ablation tables)
        lines += cka_section(compared(results, study), methods, task, Path(out), study)
    for (task, setting), everything in summary.groupby(["task", "setting"], sort=False):
        group = without_variants(everything, study)
        lines += [f"## {task} / {setting}", "",
                  f"Teacher (frozen, pre-trained) test {everything.metric.iloc[0]}: "
                  f"{everything.teacher.iloc[0]:.4f}", ""]
        if not group.empty:  # (a store may hold variants of the focus only)
            lines += [markdown_table(group, study), ""]
        runs = results[(results.task == task) & (results.setting == setting)]
        paired = paired_table(without_variants(runs, study), study)
        if paired:
            line = significance_line(without_variants(runs, study), group, study)
            lines += ["Paired by seed (same split and student initialisation per seed):", "",
                      paired, "", *([line, ""] if line else [])]
        if completions := samples_table(samples, everything, task, setting):
            lines += ["Three fixed prompts completed greedily (16 tokens):", "", completions, ""]
        if len(group) < len(everything):
            lines += [f"### Ablations of {study.name}, {task} / {setting}", "",
                      ablation_table(everything, runs, study), ""]
        lines += [f"![validation curves](curves_{task}_{setting}.png)", ""]
    curves = read_curves(out)
    if curves is not None:
        plot_curves(curves, Path(out), results, study)
    summary.to_csv(Path(out) / "summary.csv", index=False)
    report = Path(out) / "report.md"
    report.write_text("\n".join(lines))
    return report
