"""The report's numbers: relative gains in both metric directions and paired win counts."""

from __future__ import annotations

import pandas as pd
import pytest

from talkingmodels.report import gains_table, overview_table, relative_gain, summarise, write_report
from talkingmodels.store import RESULT_COLUMNS


def test_relative_gain_by_hand():
    # RMSE (lower is better): 0.90 against scratch 1.00 is a 10% improvement
    assert relative_gain(0.90, 1.00, higher_is_better=False) == pytest.approx(10.0)
    assert relative_gain(1.10, 1.00, higher_is_better=False) == pytest.approx(-10.0)
    # accuracy (higher is better): 0.88 against 0.80 is +10%
    assert relative_gain(0.88, 0.80, higher_is_better=True) == pytest.approx(10.0)


def rows(method, values):
    """A store's rows (every column of the layout) of one method on movielens/dense."""
    return [{**dict.fromkeys(RESULT_COLUMNS), "task": "movielens", "setting": "dense",
             "method": method, "seed": seed, "metric": "rmse", "value": v, "val_value": v,
             "teacher_value": 0.9, "best_epoch": 3, "epochs": 5, "seconds": 1.0, "extra_params": 0,
             "method_name": method, "status": "ok", "higher_is_better": False}
            for seed, v in enumerate(values)]


def test_summary_by_hand(tmp_path):
    results = pd.DataFrame(rows("scratch", [1.0, 1.0, 1.0]) + rows("td", [0.9, 1.1, 0.8]))
    summary = summarise(results).set_index("method")
    # td: mean 0.9333, std sqrt(((0.9-.9333)^2 + (1.1-.9333)^2 + (0.8-.9333)^2) / 2) = 0.15275
    assert summary.loc["td", "mean"] == pytest.approx(0.933333, abs=1e-6)
    assert summary.loc["td", "std"] == pytest.approx(0.152753, abs=1e-6)
    assert summary.loc["td", "gain_pct"] == pytest.approx(6.666667, abs=1e-5)
    assert summary.loc["td", "wins"] == "2/3"  # seeds 0 and 2 beat scratch, seed 1 does not
    results.to_csv(tmp_path / "results.csv", index=False)
    text = write_report(tmp_path).read_text()
    assert "| td | 0.9333 ± 0.1528 | +6.67% | 2/3 |" in text
    assert "Teacher (frozen, pre-trained) test rmse: 0.9000" in text
    # paired by seed: td - scratch = (-0.1, +0.1, -0.2) in RMSE, i.e. +0.0667 better on average
    # t = 0.0667 / (0.15275 / sqrt(3)) = 0.7559 with 2 degrees of freedom, where the two-sided
    # p-value has the closed form 1 - t / sqrt(t^2 + 2) = 0.529
    line = next(line for line in text.splitlines() if line.startswith("| scratch | +0.0667 |"))
    assert "| 0.529 |" in line and "| 2/3 | not significant |" in line
    assert "td against the best other method (scratch)" not in text  # scratch is the reference



def test_ablation_variants_have_their_own_tables(tmp_path):
    """TD's ablation variants (labels of the ablation suite) are compared with the default
    TD in ablation tables; the method tables, the gains across settings and "the best other
    method" leave them out (a TD variant is not another method)."""
    from talkingmodels.report import readme_block

    results = pd.DataFrame(rows("scratch", [1.0, 1.0, 1.0]) + rows("fitnet", [0.95, 0.96, 0.94])
                           + rows("td", [0.9, 0.92, 0.91]) + rows("td-m8", [0.8, 0.81, 0.79])
                           + rows("td-no-kd", [0.99, 1.0, 1.01]))
    results.to_csv(tmp_path / "results.csv", index=False)
    text = write_report(tmp_path).read_text()
    method_table = text.split("## movielens / dense")[1].split("### Ablations")[0]
    assert "| fitnet |" in method_table and "td-m8" not in method_table
    assert "td against the best other method (fitnet)" in text
    ablations = text.split("### Ablations of TD, movielens / dense")[1]
    # td-m8 against td: (0.9 - 0.8, 0.92 - 0.81, 0.91 - 0.79) = +0.11 better on average in RMSE
    assert "| td-m8 | message_dim 8 | 0.8000 | 0.8000 ± 0.0100 | +20.00% | +0.1100 |" in ablations
    assert "| td-no-kd | weight 0.0 | 1.0000 | 1.0000 ± 0.0100 | +0.00% | -0.0900 |" in ablations
    # the overview: each variant against td's mean 0.91, in percent (RMSE: lower is better)
    assert "| td-m8 | message_dim 8 | +12.09% |" in text
    block = readme_block(tmp_path)
    assert "td-m8 | message_dim 8 | +12.09% |" in block
    assert "best other method (fitnet)" in block and "| td-m8 | 0." not in block


def test_ablation_only_setting_stays_out_of_the_tables_across_methods(tmp_path):
    """A setting run for the ablations only (scratch, TD and its variants, like text's
    tweets-1k) has its own section and its ablation column, but no column in the tables
    across methods: there every other method would be n/a, and TD's average gain would
    count one setting more than theirs."""
    from talkingmodels.report import readme_block

    def on(setting, frame):
        return [{**row, "setting": setting} for row in frame]

    full = (rows("scratch", [1.0, 1.0, 1.0]) + rows("fitnet", [0.95, 0.96, 0.94])
            + rows("td", [0.9, 0.92, 0.91]))
    ablated = on("small", rows("scratch", [1.0, 1.0, 1.0]) + rows("td", [0.5, 0.5, 0.5])
                 + rows("td-m8", [0.6, 0.6, 0.6]))
    results = pd.DataFrame(on("dense", full) + on("sparse", full) + ablated)
    results.to_csv(tmp_path / "results.csv", index=False)
    text = write_report(tmp_path).read_text()
    gains = text.split("## Relative improvement over scratch")[1].split("## TD against")[0]
    # td: 9% better than scratch on dense and sparse; "small" (+50%) is not averaged in
    assert "| method | movielens / dense | movielens / sparse | average |" in gains
    assert "| td | +9.00% | +9.00% | +9.00% (2) |" in gains
    versus = text.split("## TD against every method")[1].split("## Ablations")[0]
    assert "small" not in versus
    # the ablation overview and the setting's own section keep it
    assert "| td-m8 | message_dim 8 | -20.00% |" in text  # 0.6 against td's 0.5 in RMSE
    assert "## movielens / small" in text
    block = readme_block(tmp_path)
    assert "small" not in block.split("Ablations:")[0] and "-20.00%" in block
    # a store of the ablations alone compares scratch and TD on its settings
    results[results.setting == "small"].to_csv(tmp_path / "results.csv", index=False)
    assert "| td | 0.5000 | 0.5000 ± 0.0000 | +50.00% |" in readme_block(tmp_path)


def test_undistillable_classes_by_hand():
    """Classes whose *validation* accuracy logit-kd lowers against scratch (mean over seeds),
    and each method's mean *test* accuracy gain in points and CKA on them and on the others.
    Here validation picks class 1, where the test split would have picked 0 and 2."""
    import json

    from talkingmodels.report import undistillable_table

    def run(method, seed, accuracy, cka, val):
        return {"method": method, "seed": seed, "class_metric": json.dumps(accuracy),
                "cka_classes": json.dumps(cka), "class_metric_val": json.dumps(val)}

    val_scratch, val_kd = {"0": 0.5, "1": 0.8, "2": 0.5}, {"0": 0.6, "1": 0.7, "2": 0.5}
    runs = pd.DataFrame([
        run("scratch", 0, {"0": 0.8, "1": 0.6, "2": 0.5}, {"0": 0.5, "1": 0.5, "2": 0.5}, val_scratch),
        run("scratch", 1, {"0": 0.8, "1": 0.6, "2": 0.7}, {"0": 0.5, "1": 0.5, "2": 0.5}, val_scratch),
        # logit-kd on test: class 0 -0.1, class 1 +0.1, class 2 -0.05 (mean over the two seeds)
        run("logit-kd", 0, {"0": 0.7, "1": 0.7, "2": 0.5}, {"0": 0.6, "1": 0.7, "2": 0.8}, val_kd),
        run("logit-kd", 1, {"0": 0.7, "1": 0.7, "2": 0.6}, {"0": 0.6, "1": 0.7, "2": 0.8}, val_kd),
        run("td", 0, {"0": 0.9, "1": 0.6, "2": 0.8}, {"0": 0.9, "1": 0.3, "2": 0.7}, val_kd),
        run("td", 1, {"0": 0.9, "1": 0.6, "2": 0.8}, {"0": 0.9, "1": 0.3, "2": 0.7}, val_kd)])
    text = "\n".join(undistillable_table(runs, "toy"))
    assert "(logit-kd's per-class validation accuracy below scratch's): 1." in text
    # td on class 1: test gain 0; on classes 0 and 2: +0.1 and +0.2 -> +15 points; CKA 0.3, 0.8
    assert "| td | +0.00 | +15.00 | 0.300 | 0.800 |" in text
    assert "| logit-kd | +10.00 | -7.50 | 0.700 | 0.700 |" in text
    # a store without per-class validation accuracy: no table chosen on the test split
    old = undistillable_table(runs.drop(columns="class_metric_val"), "toy")
    assert len(old) == 2 and "not shown" in old[0] and "validation" in old[0]


def test_compute_table_by_hand():
    from talkingmodels.report import compute_table

    results = pd.DataFrame({
        "task": ["b", "b", "a", "a", "a"],
        "status": ["ok", "n/a: needs classification outputs", "ok", "ok", "ok"],
        "seconds": [200.0, float("nan"), 1800.0, 1830.0, 2000.0],
        "peak_gib": [0.5, float("nan"), 1.25, 2.0, 1.0],
    })
    assert compute_table(results).splitlines()[2:] == [
        "| a | 3 | 0 | 1 h 34 min | 2.00 GiB |",  # 5630 s = 93.8 min
        "| b | 1 | 1 | 3 min | 0.50 GiB |",  # 200 s, the n/a row not counted
        "| all | 4 | 1 | 1 h 37 min | 2.00 GiB |",  # 5830 s = 97.2 min
    ]


def test_versus_table_by_hand():
    """RMSE, lower is better. td against a: differences (a - td) 0.10, 0.12, 0.08 -> mean
    0.10, sd 0.02, t = 0.10 / (0.02 / sqrt 3) = 8.660, two-sided p with 2 df = 0.01307:
    better. Against b: differences -0.10, +0.10, 0.0 -> mean 0, p = 1: n.s. Against c:
    -0.10, -0.10, -0.08 -> t = -0.0933 / (0.01155 / sqrt 3) = -14.0, p = 1 - 14 / sqrt(14^2 + 2)
    = 0.0051: worse. On sparse only
    dkd: differences 0.10, 0.15 -> t = 0.125 / (0.03536 / sqrt 2) = 5.0, 1 df, p = 0.1257.
    Holm over dense's family of three: c 3 x 0.0051 = 0.0153, a max(2 x 0.01307, 0.0153) =
    0.0261, b 1; sparse's family is dkd alone."""
    from talkingmodels.report import versus_table

    results = pd.DataFrame(rows("td", [0.80, 0.90, 1.00]) + rows("a", [0.90, 1.02, 1.08])
                           + rows("b", [0.70, 1.00, 1.00]) + rows("c", [0.70, 0.80, 0.92]))
    other = pd.DataFrame(rows("td", [1.0, 0.9]) + rows("dkd", [1.1, 1.05])).assign(setting="sparse")
    # dkd has no meaning on dense (an n/a row); a, b and c did not run on sparse
    na = pd.DataFrame(rows("dkd", [None])).assign(status="n/a: no class distribution")
    results = pd.concat([results, other, na], ignore_index=True)
    summary = summarise(results)
    lines = versus_table(results, summary).splitlines()
    assert lines[0] == "| td against | movielens / dense | movielens / sparse | td better / worse |"
    assert lines[2:] == ["| a | better (p 0.026) | not run | 1 / 0 |",
                         "| b | n.s. (p 1.000) | not run | 0 / 0 |",
                         "| c | worse (p 0.015) | not run | 0 / 1 |",
                         "| dkd | n/a | n.s. (p 0.126) | 0 / 0 |"]
    assert "| dkd | n/a | n/a | n/a | 1.0750 | 1.0750 ± 0.0354 | n/a |" in overview_table(summary)
    assert "| a | 1.0000 | 1.0000 ± 0.0917 | n/a | not run | not run | not run |" in overview_table(summary)
    assert "| a | n/a | not run | n/a |" in gains_table(summary)


def test_forest_rows_by_hand(tmp_path):
    from talkingmodels.report import forest_rows

    results = pd.DataFrame(rows("scratch", [1.0, 1.0, 1.0]) + rows("td", [0.9, 1.1, 0.8]))
    row = forest_rows(results).set_index("method").loc["td"]
    # oriented differences (scratch - td, RMSE): 0.1, -0.1, 0.2; mean 0.0667, sd 0.15275;
    # 95% t interval: 0.0667 +- 4.3027 * 0.15275 / sqrt(3) = [-0.31279, 0.44612]; in percent of
    # scratch's mean 1.0
    assert row.gain_pct == pytest.approx(6.6667, abs=1e-3)
    assert (row.low_pct, row.high_pct) == (pytest.approx(-31.279, abs=1e-2), pytest.approx(44.612, abs=1e-2))
    assert row.n == 3
    results.to_csv(tmp_path / "results.csv", index=False)
    assert "![gain over scratch with 95% intervals](forest.png)" in write_report(tmp_path).read_text()
    assert (tmp_path / "forest.png").stat().st_size > 0


def test_the_method_under_study_and_the_reference_are_parameters(tmp_path):
    from talkingmodels import cli

    results = pd.DataFrame(rows("scratch", [1.0, 1.0, 1.0]) + rows("td", [0.9, 1.1, 0.8])
                           + rows("fitnet", [0.95, 0.96, 0.94]))
    results.to_csv(tmp_path / "results.csv", index=False)
    assert cli.main(["report", str(tmp_path), "--focus", "fitnet", "--reference", "td"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| fitnet against | mean difference (fitnet better if > 0)" in text
    # gains are now over td (mean 0.9333): fitnet's 0.95 is 1.79% worse
    assert "| fitnet | 0.9500 ± 0.0100 | -1.79% |" in text


def test_ablation_table_holm_over_the_variants_by_hand():
    """RMSE. td against its variants (the values of test_versus_table_by_hand): rounds-0
    raw p 0.0131, no-mc 0.0351 (differences 0.06, 0.08, 0.04: t = 5.196), no-kd 1.0.
    Holm over the three variants (scratch, the reference, is not one of them): rounds-0
    3 x 0.0131 = 0.039 (significant), no-mc 2 x 0.0351 = 0.070 (not), no-kd 1."""
    from talkingmodels.report import ablation_table

    results = pd.DataFrame(rows("scratch", [1.0, 1.1, 1.2]) + rows("td", [0.80, 0.90, 1.00])
                           + rows("td-rounds-0", [0.90, 1.02, 1.08]) + rows("td-no-mc", [0.86, 0.98, 1.04])
                           + rows("td-no-kd", [0.70, 1.00, 1.00]))
    lines = {line.split(" | ")[0][2:]: line.split(" | ") for line in
             ablation_table(summarise(results), results).splitlines()[2:]}
    assert lines["scratch"][5:9] == ["-", "-", "-", "-"]
    assert lines["td-rounds-0"][5:9] == ["-0.1000", "0.013", "0.039*", "0/3"]
    assert lines["td-no-mc"][5:9] == ["-0.0600", "0.035", "0.070", "0/3"]
    assert lines["td-no-kd"][5:9] == ["+0.0000", "1.000", "1.000", "1/3"]


def test_a_tuning_store_shows_validation_only_and_ties_go_to_the_first_named(tmp_path):
    """Tuning seeds (100 and up): the block shows each option's validation metric and the
    rule's choice, never a test number. pkt-3000 and pkt-300 tie on validation (to 4
    decimals): the one named first in the config is chosen, whatever the test split says."""
    from talkingmodels.report import is_tuning, tuning_table

    def option(label, name, val, test):
        return [{**row, "method_name": name, "val_value": v, "value": t, "metric": "accuracy",
                 "higher_is_better": True}
                for row, v, t in zip(rows(label, [0.0] * 3), val, test, strict=True)]

    results = pd.DataFrame(option("scratch", "scratch", [0.80, 0.80, 0.80], [0.7, 0.7, 0.7])
                           + option("pkt-3000", "pkt", [0.85, 0.86, 0.87], [0.10, 0.10, 0.10])
                           + option("pkt-300", "pkt", [0.86, 0.86, 0.86], [0.99, 0.99, 0.99])
                           + option("pkt-30", "pkt", [0.84, 0.84, 0.84], [0.98, 0.98, 0.98]))
    results["seed"] = [100, 101, 102] * 4
    assert is_tuning(results) and not is_tuning(results.assign(seed=[0, 1, 2] * 4))
    lines = tuning_table(results).splitlines()
    assert lines[0] == "| option | dense: val accuracy |"
    assert lines[2] == "| scratch | 0.8000 ± 0.0000 |"  # a reference, not a choice
    assert lines[3] == "| pkt-3000 | 0.8600 ± 0.0100 (chosen) |"
    assert lines[4] == "| pkt-300 | 0.8600 ± 0.0000 |"
    assert not any(test in " ".join(lines) for test in ("0.99", "0.98", "0.10", "0.70"))
    # a second task measured in RMSE (lower is better) in the same store: its own direction
    # and metric; pkt-30's 0.84 is the lowest there, so it is chosen
    rmse = results.assign(task="movielens-rmse", metric="rmse", higher_is_better=False)
    lines = tuning_table(pd.concat([results, rmse])).splitlines()
    assert lines[0] == "| option | movielens / dense: val accuracy | movielens-rmse / dense: val rmse |"
    assert lines[3] == "| pkt-3000 | 0.8600 ± 0.0100 (chosen) | 0.8600 ± 0.0100 |"
    assert lines[5] == "| pkt-30 | 0.8400 ± 0.0000 | 0.8400 ± 0.0000 (chosen) |"
    results.to_csv(tmp_path / "results.csv", index=False)  # report.md too: validation only
    report = write_report(tmp_path).read_text()
    assert "| pkt-3000 | 0.8600 ± 0.0100 (chosen) |" in report
    assert not any(test in report for test in ("0.99", "0.98", "0.10", "0.70", "test"))


def test_gap_table_by_hand():
    """RMSE: scratch 1.0, teacher 0.9, a gap of 0.1. td's mean 0.95 closes half of it,
    fitnet's 1.02 is 20% of the gap worse than scratch; a setting where the teacher is worse
    than scratch (teacher 1.1) has no column."""
    from talkingmodels.report import gap_table

    sparse = [{**row, "setting": "sparse", "teacher_value": 1.1}
              for row in rows("scratch", [1.0, 1.0]) + rows("td", [0.9, 0.9])]
    results = pd.DataFrame(rows("scratch", [1.0, 1.0]) + rows("td", [0.94, 0.96])
                           + rows("fitnet", [1.02, 1.02]) + sparse)
    table = gap_table(summarise(results))
    assert table.splitlines()[0] == "| method | movielens / dense |"
    assert "| td | +50% |" in table and "| fitnet | -20% |" in table
    assert "scratch" not in table


def test_diagnostics_table_by_hand(tmp_path):
    """TD against its diagnostics within the setting's ablation family: far better than no
    interaction on every seed, no better than the re-initialised teacher: the interaction
    does not carry the teacher's knowledge there; better than both: it does."""
    from talkingmodels.report import diagnostics_table

    td = [0.90, 0.91, 0.92, 0.90, 0.93]

    def shifted(by, noise=(0.0, 0.001, -0.001, 0.002, 0.0)):
        return [v + by + n for v, n in zip(td, noise, strict=True)]

    results = pd.DataFrame(rows("scratch", [1.0] * 5) + rows("td", td)
                           + rows("td-rounds-0", shifted(0.1)) + rows("td-random-teacher", shifted(0.0))
                           + rows("td-shuffled-answers", shifted(0.05)))
    table = diagnostics_table(summarise(results), results)
    row = next(line for line in table.splitlines() if line.startswith("| movielens / dense |"))
    assert "| td | 0.9120 | +0.1004 (0.000*) |" in row
    assert row.endswith("| no: not significantly better than td-random-teacher | td |")
    better = results.copy()
    better.loc[better.method == "td-random-teacher", "value"] = shifted(0.08)
    row = diagnostics_table(summarise(better), better).splitlines()[2]
    assert row.endswith("| yes | td |")
    # a grounded configuration gets its own row, in the same family
    noise = (0.0, 0.003, 0.001, -0.002, 0.004)
    grounded = pd.concat([better, pd.DataFrame(rows("td-grounded", shifted(0.2, noise)))])
    lines = diagnostics_table(summarise(grounded), grounded).splitlines()
    assert lines[3].startswith("| movielens / dense | td-grounded | 1.1132 | -0.1008 (")
    assert lines[3].endswith("| no: not significantly better than td-rounds-0 nor td-random-teacher | td |")
    # so does a decoder configuration (a layer pair of its own), after the grounded ones
    decoder = pd.concat([grounded, pd.DataFrame(rows("td-layers-2-6", shifted(0.0, noise)))])
    lines = diagnostics_table(summarise(decoder), decoder).splitlines()
    assert [line.split(" | ")[1] for line in lines[2:]] == ["td", "td-grounded", "td-layers-2-6"]
    # with diagnostics of its own (at its layers), it is compared with those
    own = pd.concat([decoder, pd.DataFrame(rows("td-layers-2-6-rounds-0", shifted(0.3)))])
    lines = diagnostics_table(summarise(own), own).splitlines()
    assert [line.split(" | ")[1] for line in lines[2:]] == ["td", "td-grounded", "td-layers-2-6"]
    assert lines[4].split(" | ")[3].startswith("+0.29") and lines[4].split(" | ")[3].endswith(", its own)")
    assert lines[2].split(" | ")[3] == "+0.1004 (0.000*)"  # (td: the default diagnostic)
    assert diagnostics_table(summarise(results[~results.method.str.startswith("td-")]), results) == ""
    results.to_csv(tmp_path / "results.csv", index=False)
    assert "## Does the interaction carry the teacher's knowledge?" in write_report(tmp_path).read_text()


def test_weak_logits_table_by_hand(tmp_path):
    """RMSE, a teacher (1.2) worse than scratch (1.0): td-no-kd (0.95 + noise) against fitnet
    (0.1 + noise / 2 worse: a difference of +0.1005, significant) and kd-modules (the same
    values: +0.0, p 1); feature-kd did not run. A teacher better than scratch: no table."""
    from talkingmodels.report import weak_logits_table

    noise = [0.0, 0.002, -0.001, 0.001, 0.003]
    no_kd = [0.95 + n for n in noise]
    results = pd.DataFrame(rows("scratch", [1.0] * 5) + rows("td-no-kd", no_kd)
                           + rows("fitnet", [v + 0.1 + n / 2 for v, n in zip(no_kd, noise, strict=True)])
                           + rows("kd-modules", no_kd))
    results["teacher_value"] = 1.2
    lines = weak_logits_table(summarise(results), results).splitlines()
    assert lines[0].startswith("| setting | teacher | scratch | td-no-kd | "
                               "fitnet; td-no-kd minus it (p Holm) |")
    assert lines[2].startswith("| movielens / dense | 1.2000 | 1.0000 | 0.9510 | 1.0515; +0.1005 (0.000*) |")
    assert lines[2].endswith("| not run | 0.9510; +0.0000 (1.000) |")
    results.to_csv(tmp_path / "results.csv", index=False)
    assert "## Weak logits, rich features" in write_report(tmp_path).read_text()
    results["teacher_value"] = 0.9
    assert weak_logits_table(summarise(results), results) == ""


def test_ablation_overview_by_hand():
    """RMSE: td-m8 0.2% worse than td (0.902 against 0.9) on dense, not run on sparse, where
    only td-no-kd ran beside td (1% better: 0.99 against 1.0)."""
    from talkingmodels.report import ablation_overview

    sparse = pd.DataFrame(rows("td", [1.0, 1.0]) + rows("td-no-kd", [0.99, 0.99])).assign(setting="sparse")
    results = pd.concat([pd.DataFrame(rows("td", [0.9, 0.9]) + rows("td-m8", [0.902, 0.902])), sparse])
    lines = ablation_overview(summarise(results)).splitlines()
    assert lines[0] == "| variant | change from td | movielens / dense | movielens / sparse |"
    assert "| td-no-kd | weight 0.0 | not run | +1.00% |" in lines
    assert "| td-m8 | message_dim 8 | -0.22% | not run |" in lines
    assert not any(line.startswith("| scratch") for line in lines)  # run nowhere: no row


def test_a_store_of_variants_only_has_a_report(tmp_path):
    """A setting holding only variants of the focus (a user's grid of TD options) still gets
    its section: the teacher's line and the ablation table, no method table."""
    pd.DataFrame(rows("td-m8", [0.8, 0.81]) + rows("td-no-kd", [0.9, 0.92])).to_csv(
        tmp_path / "results.csv", index=False)
    text = write_report(tmp_path).read_text()
    assert "Teacher (frozen, pre-trained) test rmse: 0.9000" in text
    assert "| td-m8 | message_dim 8 | 0.8050 | 0.8050 ± 0.0071 |" in text


def test_curves_without_a_result_row_are_left_out_of_the_plots(tmp_path):
    """A run interrupted after some epochs has curves but no row yet: the report plots the
    settings that have rows and skips the others."""
    results = pd.DataFrame(rows("scratch", [1.0, 1.1]) + rows("td", [0.9, 1.0]))
    results.to_csv(tmp_path / "results.csv", index=False)
    curves = [{"task": "movielens", "setting": setting, "method": "td", "seed": 0, "epoch": epoch,
               "stage": "main", "name": "val_rmse", "value": 1.0} for setting in ("dense", "sparse")
              for epoch in range(2)]
    pd.DataFrame(curves).to_csv(tmp_path / "curves.csv.gz", index=False)
    write_report(tmp_path)
    assert (tmp_path / "curves_movielens_dense.png").exists()
    assert not (tmp_path / "curves_movielens_sparse.png").exists()


def test_completions_of_the_teacher_scratch_and_the_best_method_on_validation(tmp_path):
    from talkingmodels import store

    results = pd.DataFrame(rows("scratch", [1.0, 1.0]) + rows("td", [0.9, 0.95])
                           + rows("hybrid", [0.85, 0.8]))
    results.loc[results.method == "hybrid", "val_value"] = 1.2  # best on test, worst on validation
    results.to_csv(tmp_path / "results.csv", index=False)
    key = {"task": "movielens", "setting": "dense"}
    store.append_samples(tmp_path, {**key, "method": store.TEACHER, "seed": ""}, {"Hi": "there | you"})
    for method in ("scratch", "td", "hybrid"):
        for seed in (1, 0):
            store.append_samples(tmp_path, {**key, "method": method, "seed": seed},
                                 {"Hi": f"{method} {seed}"})
    with open(tmp_path / store.SAMPLES, "a") as handle:
        handle.write('{"task": "movielens", "setting"')  # a line cut short by a crash
    text = write_report(tmp_path).read_text()
    assert "| prompt | teacher (frozen) | scratch (seed 0) | best: td (seed 0) |" in text
    assert "| Hi | there \\| you | scratch 0 | td 0 |" in text


def test_the_headline_by_hand(tmp_path):
    """The terminal's headline: mean ± std, gain over scratch, and the paired t-test against
    scratch Holm-adjusted over the setting's methods. By hand (2 degrees of freedom, two-sided
    p = 1 - t / sqrt(t^2 + 2)): td - scratch = (-0.1, +0.1, -0.2), t = 0.7559, p = 0.529;
    fitnet's differences (0.05, 0.04, 0.06) give t = 0.05 / (0.01 / sqrt(3)) = 8.660,
    p = 0.01307; Holm: fitnet 2 x 0.01307 = 0.026 (better), td max(0.529, 0.026) = 0.529."""
    from talkingmodels.report.headline import headline

    results = pd.DataFrame(rows("scratch", [1.0, 1.0, 1.0]) + rows("td", [0.9, 1.1, 0.8])
                           + rows("fitnet", [0.95, 0.96, 0.94]))
    results.to_csv(tmp_path / "results.csv", index=False)
    lines = headline(tmp_path).splitlines()
    assert lines[0] == "movielens / dense (lower is better)"
    cells = {line.split()[0]: line.split() for line in lines[2:]}
    assert cells["scratch"] == ["scratch", "1.0000", "±", "0.0000", "-", "-", "3"]
    assert cells["td"] == ["td", "0.9333", "±", "0.1528", "+6.67%", "n.s.", "(p", "0.529)", "3"]
    assert cells["fitnet"] == ["fitnet", "0.9500", "±", "0.0100", "+5.00%", "better", "(p", "0.026)", "3"]
    assert lines[-1].split() == ["teacher", "(frozen)", "0.9000"]


def test_twin_settings_table_by_hand(tmp_path):
    """RMSE on dense and its twin dense-wide (a wider student). td: 0.80, 0.90, 1.00 against
    0.70, 0.82, 0.88 on the twin -> the twin better by 0.10, 0.08, 0.12 (mean 0.10, sd 0.02,
    t = 8.660, two-sided p with 2 df 0.01307); scratch: 1.0 x 3 against 0.90, 1.00, 1.05 ->
    +0.10, 0, -0.05 (mean 0.0167, sd 0.07638, t = 0.378, p = 1 - t / sqrt(t^2 + 2) = 0.742).
    Holm over the pair's two methods: td 2 x 0.01307 = 0.026, scratch 0.742. Gains over
    scratch: td 10% on dense, (0.98333 - 0.80) / 0.98333 = 18.64% on the twin. A variant
    (td-rounds-0) and a method run on one side only (fitnet) have no row; a setting with no
    twin has no table."""
    from talkingmodels.report.twins import twin_pairs, twins_section

    def on(setting, method, values):
        return [{**row, "setting": setting} for row in rows(method, values)]

    results = pd.DataFrame(
        on("dense", "scratch", [1.0, 1.0, 1.0]) + on("dense", "td", [0.80, 0.90, 1.00])
        + on("dense", "td-rounds-0", [0.8, 0.8, 0.8]) + on("dense", "fitnet", [0.9, 0.9, 0.9])
        + on("dense-wide", "scratch", [0.90, 1.00, 1.05]) + on("dense-wide", "td", [0.70, 0.82, 0.88])
        + on("dense-wide", "td-rounds-0", [0.7, 0.7, 0.7]) + on("sparse", "scratch", [1.0, 1.0]))
    assert twin_pairs(results) == [("movielens", "dense", "dense-wide", "-wide")]
    lines = twins_section(results, summarise(results))
    assert lines[0] == ("movielens: dense against dense-wide, one change: the student: 4x wider, "
                        "the same layers.")
    table = lines[2].splitlines()
    assert lines[3] == "" and table[2] == "| frozen teacher | 0.9000 | 0.9000 | | | | | |"
    assert table[3:] == ["| scratch | 1.0000 | 0.9833 | +0.0167 | 0.742 | 1/3 | +0.00% | +0.00% |",
                         "| td | 0.9000 | 0.8000 | +0.1000 | 0.026* | 3/3 | +10.00% | +18.64% |"]
    results.to_csv(tmp_path / "results.csv", index=False)
    assert "## One change between twin settings" in write_report(tmp_path).read_text()
