"""The store's headline, as plain text for the terminal at the end of ``bench`` and ``run``:
per setting and method, the test metric's mean ± std over seeds, the gain over the
reference, and whether the method is better or worse than the reference paired by seed
(the t-test at 5%, Holm-adjusted over the setting's methods), as report.md's tables say."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from talkingmodels.report.statistics import STUDY, Study, _higher, _values, summarise
from talkingmodels.report.tables import is_tuning
from talkingmodels.store import read_results


def verdicts(runs: pd.DataFrame, study: Study = STUDY) -> dict[str, str]:
    """method -> "better (p 0.004)", "worse (p ...)" or "n.s. (p ...)" against the reference
    on one setting's runs, one Holm family; methods without two paired seeds are left out."""
    from talkingmodels.analysis import holm_family, paired_comparison

    table = _values(runs)
    if study.reference not in table:
        return {}
    reference, higher = table[study.reference], _higher(runs)
    pairs = {m: table[m] for m in table.columns if m != study.reference
             and (table[m].notna() & reference.notna()).sum() >= 2}
    family = holm_family({m: paired_comparison(v, reference, higher) for m, v in pairs.items()})
    words = {True: "better", False: "worse"}
    return {m: f"{words[c['mean_diff'] > 0] if c['significant'] else 'n.s.'} (p {c['p_holm']:.3f})"
            for m, c in family.items()}


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def headline(out: Path, study: Study = STUDY) -> str:
    """The headline tables of the store ``out`` (empty for a tuning store, whose report
    keeps test numbers out of view)."""
    results = read_results(out)
    if is_tuning(results):
        return ""
    summary, blocks = summarise(results, study), []
    for (task, setting), group in summary.groupby(["task", "setting"], sort=False):
        runs = results[(results.task == task) & (results.setting == setting)]
        said = verdicts(runs, study)
        direction = "higher" if _higher(runs) else "lower"
        rows = [["method", f"test {group.metric.iloc[0]} (mean ± std)", f"vs {study.reference}",
                 "paired t, Holm (5%)", "n"]]
        for _, r in group.iterrows():
            if bool(r.get("na")) and pd.notna(r.get("na")):
                rows.append([r["method"], "n/a", "", "", ""])
                continue
            gain = f"{r['gain_pct']:+.2f}%" if pd.notna(r.get("gain_pct")) else "-"
            rows.append([r["method"], f"{r['mean']:.4f} ± {r['std']:.4f}",
                         "-" if r["method"] == study.reference else gain,
                         said.get(r["method"], "-"), str(r["n"])])
        rows.append(["teacher (frozen)", f"{group.teacher.iloc[0]:.4f}", "", "", ""])
        blocks.append("\n".join([f"{task} / {setting} ({direction} is better)", *_aligned(rows)]))
    return "\n\n".join(blocks)
