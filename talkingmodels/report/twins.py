"""One change between two settings of a task: a setting and its twin that differs in one
model only (``tweets-1k`` and ``tweets-1k-llm``: the same sentences, splits and student
architecture, a 135M-parameter teacher instead of a 22M one; ``tweets-300`` and
``tweets-300-wide``: the same teacher, a 4x wider student). Per method: its mean test metric
on both, the paired difference (by seed: the same split and data order), Holm-adjusted over
the pair's methods, and its gain over the reference on each, so a report shows which methods
gain and which lose from the change."""

from __future__ import annotations

import pandas as pd

from talkingmodels.report.statistics import STUDY, Study, _higher, _values, without_variants
from talkingmodels.report.tables import _gain_text, _p_text

# A twin's suffix -> what it changes (the tasks' setting names: see each task's ``settings``).
TWINS = {
    "-llm": "the teacher: SmolLM2-135M-Instruct (a decoder-only LLM) instead of the task's",
    "-wide": "the student: 4x wider, the same layers",
    "-tiny": "the student: smaller, the capacity gap",
}


TWINS_INTRO = ("One change between twin settings: a setting and its twin that differs in one model, "
               "the same texts, splits and seeds. Per method its mean test metric on both, the "
               "difference paired by seed (positive = better on the twin; p Holm-adjusted over the "
               "pair's methods, * below 0.05) and its gain over scratch on each:")


def twin_pairs(results: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """(task, setting, twin, suffix) for every setting of the store whose twin is there too."""
    keys = set(zip(results.task, results.setting, strict=True))
    return [(task, setting, setting + suffix, suffix)
            for task, setting in dict.fromkeys(zip(results.task, results.setting, strict=True))
            for suffix in TWINS if (task, setting + suffix) in keys]


def twin_table(results: pd.DataFrame, summary: pd.DataFrame, task: str, setting: str, twin: str,
               study: Study = STUDY) -> str:
    """The methods run on both ``setting`` and ``twin`` of ``task``: mean on each, the paired
    difference twin - setting (oriented: positive = better on the twin), its Holm-adjusted
    p over the pair's methods, the seeds on which the twin is better, and each side's gain
    over the reference. The first row is the frozen teacher of each (one number, no test)."""
    from talkingmodels.analysis import holm_family, paired_comparison

    here = without_variants(results[results.task == task], study)  # the methods, not TD's variants
    base, other = (_values(here[here.setting == name]) for name in (setting, twin))
    higher = _higher(here)
    methods = [m for m in dict.fromkeys(summary[summary.task == task].method)
               if m in base.columns and m in other.columns]
    family = holm_family({m: paired_comparison(other[m].dropna(), base[m].dropna(), higher)
                          for m in methods})
    rows = summary[summary.task == task].set_index(["setting", "method"])
    teacher = [rows.loc[name].teacher.iloc[0] for name in (setting, twin)]
    lines = [f"| method | {setting} | {twin} | difference ({twin} better if > 0) | p (Holm) | "
             f"{twin} better on | gain over {study.reference}: {setting} | {twin} |",
             "|---|---|---|---|---|---|---|---|",
             f"| frozen teacher | {teacher[0]:.4f} | {teacher[1]:.4f} | | | | | |"]
    for method in methods:
        c, gain = family[method], [_gain_text(rows.loc[(name, method)]) for name in (setting, twin)]
        lines.append(f"| {method} | {base[method].mean():.4f} | {other[method].mean():.4f} | "
                     f"{c['mean_diff']:+.4f} | {_p_text(c)} | {c['wins']}/{c['n']} | {gain[0]} | {gain[1]} |")
    return "\n".join(lines)


def twins_section(results: pd.DataFrame, summary: pd.DataFrame, study: Study = STUDY) -> list[str]:
    """The report's lines for every twin pair of the store ([] when there is none)."""
    lines = []
    for task, setting, twin, suffix in twin_pairs(results):
        lines += [f"{task}: {setting} against {twin}, one change: {TWINS[suffix]}.", "",
                  twin_table(results, summary, task, setting, twin, study), ""]
    return lines
