"""Markdown tables of the focus method's variants against the focus itself (TD's
ablations, the diagnostics of its interaction, its exchange without the KD term where the
teacher's logits are weak), each paired by seed and Holm-adjusted; the tables that compare
methods with each other are in :mod:`talkingmodels.report.tables`."""

from __future__ import annotations

import pandas as pd

from talkingmodels.report.statistics import STUDY, Study, _higher, _values, _variants, relative_gain
from talkingmodels.report.tables import _cka_text, _gain_text, _na, _no_value, _p_text


def _change(label: str) -> str:
    from talkingmodels.suites import VARIANTS

    return ", ".join(f"{k} {v}" for k, v in VARIANTS[label].items() if k != "name")


def _ablation_family(summary: pd.DataFrame, results: pd.DataFrame, study: Study = STUDY):
    """One setting's ablation labels (reference, focus, variants that ran) and the focus
    against each variant, paired by seed: one family, Holm-adjusted."""
    from talkingmodels.analysis import compare_family

    table = _values(results)
    focus, reference = study.focus, study.reference
    labels = [label for label in [reference, focus, *_variants(study)]
              if not summary[summary.method == label].empty
              and not _na(summary[summary.method == label].iloc[0])]
    # one family: the variants (the reference's comparison with the focus is the methods')
    tested = [label for label in labels if label not in (focus, reference) and focus in table
              and label in table]
    family = (compare_family(table[focus], {label: table[label] for label in tested}, _higher(summary))
              if tested else {})
    return labels, family


def ablation_table(summary: pd.DataFrame, results: pd.DataFrame, study: Study = STUDY) -> str:
    """The focus's ablation variants of one setting against its default, paired by seed:
    what each changes, its test metric, gain over the reference, difference from the focus
    (positive = the variant is better) with the paired t-test's p, raw and Holm-adjusted over
    the table's variants (one family), and CKA with the teacher."""
    metric = summary.metric.iloc[0]
    focus, reference = study.focus, study.reference
    labels, family = _ablation_family(summary, results, study)
    lines = [f"| variant | change from {focus} | val {metric} | test {metric} | gain vs {reference} | "
             f"vs {focus} | p (paired t) | p (Holm) | better than {focus} on | CKA at h |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        r = summary[summary.method == label].iloc[0]
        gain, cka = _gain_text(r), _cka_text(r)
        if label in family:
            c = family[label]  # oriented for the focus: the variant's difference is its negative
            versus = [f"{-c['mean_diff']:+.4f}", f"{c['p_ttest']:.3f}", _p_text(c),
                      f"{c['n'] - c['wins'] - c['ties']}/{c['n']}"]
        else:
            versus = ["-", "-", "-", "-"]
        change = "(reference)" if label in (reference, focus) else _change(label)
        lines.append(f"| {label} | {change} | {r['val_mean']:.4f} | {r['mean']:.4f} ± {r['std']:.4f} | "
                     f"{gain} | " + " | ".join(versus) + f" | {cka} |")
    return "\n".join(lines)


# The controls that say whether the exchange carries what the teacher knows: without them
# (no interaction), with a teacher that knows nothing, with answers to other questions.
DIAGNOSTICS = ("td-rounds-0", "td-random-teacher", "td-shuffled-answers")


def _diagnostic(config: str, diagnostic: str, table: pd.DataFrame) -> str:
    """The diagnostic a configuration is compared with: its own, run with its options (its
    label with the diagnostic's ending: td-layers-2-6-rounds-0 for td-layers-2-6), where that
    ran; else the default one (at the task's layers)."""
    own = f"{config}{diagnostic.removeprefix('td')}"
    return own if own in table else diagnostic


def diagnostics_table(summary: pd.DataFrame, results: pd.DataFrame, study: Study = STUDY) -> str:
    """Per setting where a diagnostic ran: the focus and each of its grounded (and decoder) configurations
    there against each diagnostic, paired by seed (difference, positive = the configuration is
    better; p Holm-adjusted over the setting's configuration x diagnostic comparisons, one
    family), the verdict (the interaction carries this teacher's knowledge only where the
    configuration is significantly better than both no interaction and the re-initialised
    teacher; a configuration with diagnostics of its own, e.g. at its own layers, is compared
    with those, "its own" in the cell) and the setting's best label by mean. "" when no setting
    ran a diagnostic."""
    from talkingmodels.analysis import holm_family, paired_comparison
    from talkingmodels.suites import DECODER, GROUNDED

    keys = [key for key, group in summary.groupby(["task", "setting"], sort=False)
            if group.method.isin(DIAGNOSTICS[1:]).any()]
    if not keys:
        return ""
    lines = ["| setting | configuration | mean | " + " | ".join(f"vs {d} (p Holm)" for d in DIAGNOSTICS)
             + " | carries the teacher's knowledge | best by mean |", "|---" * (len(DIAGNOSTICS) + 5) + "|"]
    for task, setting in keys:
        here = summary[(summary.task == task) & (summary.setting == setting) & ~summary.na.fillna(False)]
        table = _values(results[(results.task == task) & (results.setting == setting)])
        higher = _higher(here)
        configs = [c for c in dict.fromkeys((study.focus, *GROUNDED, *DECODER)) if c in table
                   and not any(c.endswith(d.removeprefix("td")) for d in DIAGNOSTICS)]
        pairs = holm_family({(c, d): paired_comparison(table[c], table[_diagnostic(c, d, table)], higher)
                             for c in configs for d in DIAGNOSTICS if _diagnostic(c, d, table) in table})
        best = here.sort_values("mean", ascending=not higher).method.iloc[0]
        for config in configs:
            cells, better = [], []
            for d in DIAGNOSTICS:
                c = pairs.get((config, d))
                own = ", its own" if _diagnostic(config, d, table) != d else ""
                cells.append("not run" if c is None else f"{c['mean_diff']:+.4f} ({_p_text(c)}{own})")
                better.append(c is not None and c["significant"] and c["mean_diff"] > 0)
            verdict = "yes" if all(better[:2]) else "no: not significantly better than " + " nor ".join(
                d for d, b in zip(DIAGNOSTICS[:2], better[:2], strict=True) if not b)
            mean = here[here.method == config]["mean"].iloc[0]
            lines.append(f"| {task} / {setting} | {config} | {mean:.4f} | " + " | ".join(cells)
                         + f" | {verdict} | {best} |")
    return "\n".join(lines)


# The methods that learn from the teacher's features, not its logits (the parameter-matched
# control too): where the teacher's logits are weak, the focus without its KD term (w0 = 0)
# must beat them for its exchange to be the better way to read those features.
FEATURE_METHODS = ("fitnet", "feature-kd", "kd-modules")
NO_KD = "td-no-kd"


def weak_logits_table(summary: pd.DataFrame, results: pd.DataFrame, study: Study = STUDY) -> str:
    """Per setting where the frozen teacher is worse than the reference (scratch) on test
    (weak logits) and ``td-no-kd`` ran: its mean against the reference's and the teacher's,
    and against each feature method paired by seed (difference, positive = td-no-kd is
    better; p Holm-adjusted over the setting's comparisons, one family). "" when none."""
    from talkingmodels.analysis import holm_family, paired_comparison

    lines = []
    for (task, setting), group in summary.groupby(["task", "setting"], sort=False):
        here = group[~group.na.fillna(False)]
        means = dict(zip(here.method, here["mean"], strict=True))
        if NO_KD not in means or study.reference not in means:
            continue
        higher, teacher, base = _higher(here), here.teacher.iloc[0], means[study.reference]
        if not ((teacher < base) if higher else (teacher > base)):
            continue
        table = _values(results[(results.task == task) & (results.setting == setting)])
        pairs = holm_family({m: paired_comparison(table[NO_KD], table[m], higher)
                             for m in FEATURE_METHODS if m in table})
        cells = [f"{means[m]:.4f}; {pairs[m]['mean_diff']:+.4f} ({_p_text(pairs[m])})" if m in pairs
                 else "not run" for m in FEATURE_METHODS]
        lines.append(f"| {task} / {setting} | {teacher:.4f} | {base:.4f} | {means[NO_KD]:.4f} | "
                     + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = (f"| setting | teacher | {study.reference} | {NO_KD} | "
            + " | ".join(f"{m}; {NO_KD} minus it (p Holm)" for m in FEATURE_METHODS) + " |")
    return "\n".join([head, "|---" * (len(FEATURE_METHODS) + 4) + "|", *lines])


def ablation_overview(summary: pd.DataFrame, study: Study = STUDY) -> str:
    """Every ablated setting side by side: each variant's test metric relative to the
    focus's default, in percent (positive = the variant is better); "" without variants."""
    variants = summary[summary.method.isin(_variants(study))]
    keys = list(dict.fromkeys(zip(variants.task, variants.setting, strict=True)))
    if not keys:
        return ""
    lines = [f"| variant | change from {study.focus} | " + " | ".join(f"{t} / {s}" for t, s in keys)
             + " |", "|---" * (len(keys) + 2) + "|"]
    for label in [study.reference, *_variants(study)]:
        cells = []
        for task, setting in keys:
            group = summary[(summary.task == task) & (summary.setting == setting)]
            row, default = group[group.method == label], group[group.method == study.focus]
            if row.empty or default.empty or _na(row.iloc[0]):
                cells.append(_no_value(summary, task, setting, label) if not default.empty else "not run")
                continue
            higher = _higher(summary[summary.task == task])
            cells.append(f"{relative_gain(row.iloc[0]['mean'], default.iloc[0]['mean'], higher):+.2f}%")
        if set(cells) - {"n/a", "not run"}:
            change = "no distillation" if label == study.reference else _change(label)
            lines.append(f"| {label} | {change} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
