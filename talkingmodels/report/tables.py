"""Markdown tables of a runs store's numbers."""

from __future__ import annotations

import pandas as pd

from talkingmodels.report.statistics import (
    STUDY,
    Study,
    _higher,
    _na_runs,
    _per_class,
    _rank,
    _values,
    best_other,
    relative_gain,
)


def _na(row) -> bool:
    """Whether a summary row is a method with no meaning for its task (n/a)."""
    value = row.get("na")
    return bool(value) if value is not None and pd.notna(value) else False


def _no_value(summary: pd.DataFrame, task: str, setting: str, method: str) -> str:
    """The cell of a method without a number on a setting: "n/a" where the store holds it
    there (no meaning for the task, or nothing to compare), "not run" where its grid did
    not include it."""
    here = (summary.task == task) & (summary.setting == setting) & (summary.method == method)
    return "n/a" if here.any() else "not run"


def _gain_text(row) -> str:
    return f"{row['gain_pct']:+.2f}%" if pd.notna(row.get("gain_pct")) else "n/a"


def _cka_text(row) -> str:
    return f"{row['cka']:.3f}" if pd.notna(row.get("cka")) else "-"


def markdown_table(summary: pd.DataFrame, study: Study = STUDY) -> str:
    metric = summary.metric.iloc[0]
    lines = [f"| method | test {metric} (mean ± std) | gain vs scratch | beats scratch | n | "
             f"val {metric} | best epoch | s/run | peak GiB | extra params | CKA at h |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        if _na(r):
            lines.append(f"| {r['method']} | n/a: {r.get('reason') or 'no meaning for this task'} |"
                         + " |" * 9)
            continue
        cka, gain = _cka_text(r), _gain_text(r)
        peak = f"{r['peak_gib']:.2f}" if pd.notna(r.get("peak_gib")) else "-"
        wins = r.get("wins", "n/a") if r["method"] != study.reference else "-"
        n = f"{r['n']} ({r['failed']} failed)" if r["failed"] else f"{r['n']}"
        lines.append(f"| {r['method']} | {r['mean']:.4f} ± {r['std']:.4f} | {gain} | {wins} | "
                     f"{n} | {r['val_mean']:.4f} | {r['epochs']:.1f} | {r['seconds']:.1f} | {peak} | "
                     f"{int(r['extra_params'])} | {cka} |")
    return "\n".join(lines)


def overview_table(summary: pd.DataFrame, study: Study = STUDY) -> str:
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
                cells += [_no_value(summary, summary.task.iloc[0], setting, method)] * 3
                continue
            r = row.iloc[0]
            cells += [f"{r['val_mean']:.4f}", f"{r['mean']:.4f} ± {r['std']:.4f}", _gain_text(r)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    cells = []  # the frozen teacher with its task head, for scale (one value: no seeds)
    higher = _higher(summary)
    for setting in settings:
        rows = summary[summary.setting == setting]
        scratch, teacher = rows[rows.method == study.reference], rows.teacher.iloc[0]
        gain = "n/a" if scratch.empty else f"{relative_gain(teacher, scratch['mean'].iloc[0], higher):+.2f}%"
        cells += ["-", f"{teacher:.4f}", gain]
    lines.append("| teacher (frozen) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_table(summary: pd.DataFrame, study: Study = STUDY) -> str:
    """Per setting where the frozen teacher beats the reference (scratch) on test: the share
    of the reference-to-teacher gap each method's mean closes, in percent (100% = as good as
    the teacher, negative = worse than the reference); "" when the teacher beats it nowhere."""
    keys, cells = [], {}
    for (task, setting), group in summary.groupby(["task", "setting"], sort=False):
        reference = group[group.method == study.reference]
        if reference.empty:
            continue
        higher, teacher, base = _higher(group), group.teacher.iloc[0], reference["mean"].iloc[0]
        gap = (teacher - base) if higher else (base - teacher)
        if not gap > 0:
            continue
        keys.append((task, setting))
        for _, r in group.iterrows():
            if r["method"] != study.reference and not _na(r):
                closed = ((r["mean"] - base) if higher else (base - r["mean"])) / gap
                cells[(r["method"], task, setting)] = f"{100 * closed:+.0f}%"
    if not keys:
        return ""
    lines = ["| method | " + " | ".join(f"{t} / {s}" for t, s in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method in dict.fromkeys(summary.method):
        if method != study.reference and any((method, *key) in cells for key in keys):
            row = (cells.get((method, *key)) or _no_value(summary, *key, method) for key in keys)
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _p_text(c: dict) -> str:
    """The Holm-adjusted p, starred where significant at 5%."""
    return "n/a" if pd.isna(c["p_holm"]) else f"{c['p_holm']:.3f}" + ("*" if c["significant"] else "")


def _setting_family(results: pd.DataFrame, study: Study = STUDY) -> dict[str, dict]:
    """The focus against every other method of one setting, paired by seed: one family of
    comparisons, Holm-adjusted (:func:`~talkingmodels.analysis.compare_family`)."""
    from talkingmodels.analysis import compare_family

    table = _values(results)
    if study.focus not in table:
        return {}
    others = {other: table[other] for other in table.columns if other != study.focus}
    return compare_family(table[study.focus], others, _higher(results))


def paired_table(results: pd.DataFrame, study: Study = STUDY) -> str:
    """The focus against every other method of one setting, paired by seed (same split,
    same student initialisation): mean difference with its 95% interval, the paired t-test
    p raw and Holm-adjusted over the table (one family), the exact Wilcoxon signed-rank p,
    the seeds on which ``focus`` wins, and the verdict at 5% on the adjusted p."""
    focus = study.focus
    family = _setting_family(results, study)
    if not family:
        return ""
    lines = [f"| {focus} against | mean difference ({focus} better if > 0) | 95% interval | "
             f"p (paired t) | p (Holm) | p (Wilcoxon) | {focus} better on | at 5% (Holm) |",
             "|---|---|---|---|---|---|---|---|"]
    for other, c in family.items():
        verdict = "significant" if c["significant"] else "not significant"
        lines.append(f"| {other} | {c['mean_diff']:+.4f} | [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | "
                     f"{c['p_ttest']:.3f} | {_p_text(c)} | {c['p_wilcoxon']:.3f} | {c['wins']}/{c['n']} | "
                     f"{verdict} |")
    return "\n".join(lines)


def significance_line(results: pd.DataFrame, summary: pd.DataFrame, study: Study = STUDY) -> str:
    """One plain sentence: the focus against the best other method of the setting (its p
    Holm-adjusted over the setting's comparisons of the focus with every other method)."""
    focus = study.focus
    other = best_other(summary, study)
    family = _setting_family(results, study)
    if other is None or other not in family:
        return ""
    c = family[other]
    word = "better" if c["mean_diff"] > 0 else "worse"
    claim = ("the difference is significant at 5%" if c["significant"] else
             "the difference is **not** significant at 5%")
    return (f"{focus} against the best other method ({other}): {word} by {abs(c['mean_diff']):.4f} "
            f"on average, better on {c['wins']} of {c['n']} seeds, paired t-test p = {c['p_ttest']:.3f} "
            f"(Holm-adjusted over the {len(family)} comparisons of {focus} on this setting: "
            f"{c['p_holm']:.3f}): {claim}.")


def versus_table(results: pd.DataFrame, summary: pd.DataFrame, study: Study = STUDY) -> str:
    """The focus against every other method on every setting of a store, paired by seed:
    "better" or "worse" where the paired t-test's Holm-adjusted p (one family per setting:
    the focus against every other method there, as in the setting's own table) is below 5%,
    else "n.s.", with that adjusted p; the last column counts the settings each way.
    docs/results.md's plain words on where TD wins are read off this table."""
    focus = study.focus
    keys = list(dict.fromkeys(zip(summary.task, summary.setting, strict=True)))
    lines = [f"| {focus} against | " + " | ".join(f"{t} / {s}" for t, s in keys) +
             f" | {focus} better / worse |", "|---" * (len(keys) + 2) + "|"]
    families = {(task, setting): _setting_family(
        results[(results.task == task) & (results.setting == setting)], study) for task, setting in keys}
    for other in dict.fromkeys(summary.method):
        if other == focus:
            continue
        cells, counts = [], {"better": 0, "worse": 0, "n.s.": 0}
        for (task, setting), family in families.items():
            c = family.get(other)
            if c is None or pd.isna(c["p_ttest"]):
                cells.append(_no_value(summary, task, setting, other))
                continue
            word = ("better" if c["mean_diff"] > 0 else "worse") if c["significant"] else "n.s."
            counts[word] += 1
            cells.append(f"{word} (p {c['p_holm']:.3f})")
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
                cells.append(_no_value(summary, task, setting, method))
            else:
                cells.append(f"{gain:+.2f}%")
                gains.append(gain)
        average = f"{sum(gains) / len(gains):+.2f}% ({len(gains)})" if gains else "n/a"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)


def undistillable_table(runs: pd.DataFrame, setting: str, study: Study = STUDY) -> list[str]:
    """The paper's claim that TD helps most on "undistillable" classes, as numbers: the
    classes whose *validation* accuracy the baseline (logit-kd) lowers against the reference
    (mean over seeds), and each method's mean per-class *test* accuracy gain over the
    reference and CKA on them and on the others. Chosen on the test split, the baseline's
    loss on them would be guaranteed and every comparison there biased; a store without
    per-class validation accuracy gets a line saying so instead of the table."""
    if not {"cka_classes", "class_metric"} <= set(runs) or runs.class_metric.isna().all():
        return []
    reference, baseline = study.reference, study.baseline
    if not {reference, baseline} <= set(runs.method):
        return []
    if "class_metric_val" not in runs or runs.class_metric_val.isna().all():
        return [f"Undistillable classes of {setting}: not shown. They must be chosen on the "
                "validation split, and this store's runs did not record per-class validation "
                "accuracy (rerun them to get the table).", ""]
    cka, accuracy = _per_class(runs, "cka_classes"), _per_class(runs, "class_metric")
    chosen = _per_class(runs, "class_metric_val")
    gain = accuracy - accuracy.loc[reference]  # per-class test accuracy gain over the reference
    val_gain = chosen.loc[baseline] - chosen.loc[reference]
    hard = gain.columns[(val_gain < 0).reindex(gain.columns, fill_value=False)]
    easy = gain.columns.difference(hard, sort=False)
    lines = [f"Undistillable classes of {setting} ({baseline}'s per-class validation accuracy "
             f"below {reference}'s): {', '.join(map(str, hard)) or 'none'}. Mean per-class test "
             f"accuracy gain over {reference} on them, in points:", "",
             "| method | on undistillable classes | on the other classes | CKA, undistillable "
             "| CKA, other |",
             "|---|---|---|---|---|"]

    def points(method, columns):
        return f"{100 * gain.loc[method, columns].mean():+.2f}" if len(columns) else "n/a"

    def similarity(method, columns):
        ok = len(columns) and method in cka.index
        return f"{cka.loc[method, columns].mean():.3f}" if ok else "n/a"

    order = list(dict.fromkeys(runs.method))  # the store's order
    for method in gain.index.to_series().sort_values(kind="stable", key=_rank(order)):
        lines.append(f"| {method} | {points(method, hard)} | {points(method, easy)} | "
                     f"{similarity(method, hard)} | {similarity(method, easy)} |")
    return [*lines, ""]


TUNING_SEEDS = 100  # seeds from here on tune options; the benchmark's seeds are below


def is_tuning(results: pd.DataFrame) -> bool:
    """Whether a store holds tuning runs only (every seed a tuning seed)."""
    return bool((results.seed >= TUNING_SEEDS).all())


def tuning_table(results: pd.DataFrame) -> str:
    """A tuning store's choice, on validation only (no test number is shown, so none can
    sway it): each option's mean validation metric (± std over the tuning seeds) per
    setting, and, per method, the option the rule fixed in advance picks: the best mean
    validation metric in the task's direction, ties (equal to 4 decimals) going to the
    option named first in the config."""
    runs = results[~_na_runs(results)]
    keys = list(dict.fromkeys(zip(runs.task, runs.setting, strict=True)))
    stats = runs.groupby(["task", "setting", "method"], sort=False).val_value.agg(["mean", "std"])
    chosen = set()
    for (task, setting, _), group in runs.groupby(["task", "setting", "method_name"], sort=False):
        means = {m: round(float(stats.loc[(task, setting, m), "mean"]), 4)
                 for m in dict.fromkeys(group.method)}
        if len(means) < 2:  # a reference (scratch), not a choice
            continue
        best = max(means.values()) if _higher(group) else min(means.values())
        chosen.add((task, setting, next(m for m, v in means.items() if v == best)))
    several = len({task for task, _ in keys}) > 1  # (then each column names its task)
    heads = [f"{f'{t} / ' if several else ''}{s}: val {runs[runs.task == t].metric.iloc[0]}" for t, s in keys]
    lines = ["| option | " + " | ".join(heads) + " |", "|---" * (len(keys) + 1) + "|"]
    for method in dict.fromkeys(runs.method):
        cells = []
        for task, setting in keys:
            if (task, setting, method) not in stats.index:
                cells.append("not run")
                continue
            mean, std = stats.loc[(task, setting, method)]
            mark = " (chosen)" if (task, setting, method) in chosen else ""
            cells.append(f"{mean:.4f} ± {0.0 if pd.isna(std) else std:.4f}{mark}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(nothing)"


def samples_table(samples: dict, group: pd.DataFrame, task: str, setting: str) -> str | None:
    """A text-generating task's fixed prompts completed by the teacher, scratch and the best
    other method (chosen by mean validation metric: no test number in view), each at the
    lowest seed stored; None without samples. ``samples``: the store's ``read_samples``."""
    mine = {(method, seed): texts for (t, s, method, seed), texts in samples.items()
            if (t, s) == (task, setting)}
    runs = group[~group.na & (group.method != "scratch")].dropna(subset=["val_mean"])
    runs = runs[runs.method.isin({method for method, _ in mine})]
    best = None
    if not runs.empty:
        best = runs.method[runs.val_mean.idxmax() if runs.higher.iloc[0] else runs.val_mean.idxmin()]
    columns = []
    for label, method in (("teacher (frozen)", "teacher (frozen)"), ("scratch", "scratch"),
                          (f"best: {best}", best)):
        seeds = sorted((seed for m, seed in mine if m == method), key=lambda s: int(s or -1))
        if seeds:
            columns.append((label + (f" (seed {seeds[0]})" if seeds[0] else ""), mine[(method, seeds[0])]))
    if not columns:
        return None
    lines = ["| prompt | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for prompt in columns[0][1]:
        cells = [prompt, *(texts.get(prompt, "") for _, texts in columns)]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines)
