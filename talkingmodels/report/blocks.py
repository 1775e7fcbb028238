"""Generated results blocks in Markdown docs: the marker lines and the block of a store."""

from __future__ import annotations

from pathlib import Path

from talkingmodels.errors import UserError
from talkingmodels.report.ablations import (
    ablation_overview,
    ablation_table,
    diagnostics_table,
    weak_logits_table,
)
from talkingmodels.report.statistics import STUDY, Study, compared, summarise, without_variants
from talkingmodels.report.tables import (
    compute_table,
    gains_table,
    gap_table,
    is_tuning,
    overview_table,
    significance_line,
    tuning_table,
    undistillable_table,
    versus_table,
)
from talkingmodels.report.twins import TWINS_INTRO, twins_section
from talkingmodels.store import machines_text, read_results

README_START = "<!-- results of {store} (generated: talkingmodels report {store} --readme {doc}) -->"


README_END = "<!-- end of results of {store} -->"


GAP_INTRO = ("Share of the gap between scratch and the frozen teacher that each method closes, on "
             "the settings where the teacher is better than scratch on test (100% = as good as the "
             "teacher, above = better than it; negative = worse than scratch):")


WEAK_LOGITS_INTRO = ("Weak logits, rich features: on the settings where the frozen teacher is worse "
                     "than scratch on test, TD without its KD term (w0 = 0, td-no-kd) against the "
                     "methods that learn from the teacher's features, paired by seed (difference "
                     "positive = td-no-kd is better; p Holm-adjusted over the setting's comparisons):")


def diagnostics_intro(study: Study = STUDY) -> str:
    return (f"Does the interaction carry the teacher's knowledge? {study.name} and its grounded "
            "configurations against its diagnostics, paired by seed (difference positive = the "
            "configuration is better; p Holm-adjusted over the setting's configuration x "
            "diagnostic comparisons). It does only where a configuration is significantly better "
            "than both no interaction (td-rounds-0) and a re-initialised teacher (td-random-teacher):")


def readme_markers(doc: str, store: str) -> tuple[str, str]:
    """The two marker lines around ``store``'s generated block in the Markdown file ``doc``
    (both as paths relative to the repository root, as the command is typed there)."""
    return README_START.format(store=store, doc=doc), README_END.format(store=store)


def readme_block(out: Path, study: Study = STUDY) -> str:
    """The results of a runs store as a doc (docs/results.md) shows them: the table of every method's
    gain over scratch across settings, each task's settings side by side, and for each
    setting TD's paired comparison with the best other method. Generated, so the doc
    never carries a number typed by hand."""
    results = read_results(out)
    if is_tuning(results):  # validation only: a tuning table never shows a test number
        return "\n".join([
            f"Tuning runs (seeds {', '.join(map(str, sorted(set(results.seed))))}), validation only; "
            "per method the option with the best mean validation metric is chosen, ties (to 4 "
            "decimals) going to the one named first in the config:", "", tuning_table(results),
            "", f"Runs in this store. {machines_text(out)}"])
    summary = summarise(results, study)
    methods = compared(summary, study)
    lines = []
    for task, group in methods.groupby("task", sort=False):
        lines += [f"**{task}**", "", overview_table(group, study), ""]
        for setting, per_setting in group.groupby("setting", sort=False):
            runs = without_variants(results[(results.task == task) & (results.setting == setting)], study)
            if line := significance_line(runs, per_setting, study):
                lines += [f"- {setting}: {line}"]
        if lines[-1]:  # (after significance lines)
            lines += [""]
        for setting in dict.fromkeys(group.setting):
            lines += undistillable_table(
                without_variants(results[(results.task == task) & (results.setting == setting)], study),
                setting, study)
    if len(methods.groupby(["task", "setting"])) > 1 and methods.method.nunique() > 1:
        lines += ["Relative improvement over scratch (average over the settings):", "",
                  gains_table(methods), ""]
        if study.focus in set(methods.method):
            lines += [f"{study.name} against every method, paired by seed (paired t-test at 5%, Holm-"
                      "adjusted over each setting's comparisons; the p shown is the adjusted one; n.s.: "
                      "not significant):", "", versus_table(compared(results, study), methods, study), ""]
    if methods.method.nunique() > 1 and (gaps := gap_table(methods, study)):
        lines += [GAP_INTRO, "", gaps, ""]
    if twins := twins_section(results, summary, study):
        lines += [TWINS_INTRO, "", *twins]
    if ablations := ablation_overview(summary, study):
        lines += [f"Ablations: each variant's test metric against the default {study.name}'s (positive = the "
                  "variant is better):", "", ablations, ""]
        if diagnostics := diagnostics_table(summary, results, study):
            lines += [diagnostics_intro(study), "", diagnostics, ""]
    if weak := weak_logits_table(summary, results, study):
        lines += [WEAK_LOGITS_INTRO, "", weak, ""]
    if ablations and methods.method.nunique() == 1:  # a store of the focus's variants only: their tests too
        for (task, setting), group in summary.groupby(["task", "setting"], sort=False):
            runs = results[(results.task == task) & (results.setting == setting)]
            lines += [f"{task} / {setting}, paired by seed against the default {study.name} "
                      "(p Holm-adjusted over the setting's variants; * below 0.05):", "",
                      ablation_table(group, runs, study), ""]
    if results.peak_gib.notna().any():  # (stores from before peaks were recorded have none)
        lines += [f"Runs in this store. {machines_text(out)}", "", compute_table(results), ""]
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
