"""Method suites (core, full, ablations), their configs in configs/, methods that do not
apply to a task (n/a in the store and the report), and the per-run CKA numbers."""

from __future__ import annotations

import copy
import csv
import json
import mmap
from pathlib import Path

import pytest
import yaml

from talkingmodels import cli, suites
from talkingmodels.config import ExperimentConfig, resolve, validate
from talkingmodels.methods import METHODS
from talkingmodels.tasks import benchmarks, get_task

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", benchmarks())
def test_ablation_configs_equal_the_suite(name):
    """configs/ablations-TASK.yaml runs exactly the grid of bench TASK --suite ablations."""
    task = get_task(name)
    config = yaml.safe_load((REPO / "configs" / f"ablations-{name}.yaml").read_text())
    suite = suites.experiment_config(task, "ablations")
    assert config["settings"] == suite["settings"]
    assert config["methods"] == suite["methods"]
    resolve(validate(ExperimentConfig, {**config, "task_options": {}}, "config"))  # all valid


@pytest.mark.parametrize("name", benchmarks())
@pytest.mark.parametrize("suite", suites.SUITES)
def test_every_suite_resolves(name, suite):
    task = get_task(name)
    exp = resolve(validate(ExperimentConfig, suites.experiment_config(task, suite), "bench"))
    labels = [label for label, _, _ in exp.methods]
    assert len(labels) == len(set(labels))
    if suite == "full":
        assert set(labels) == set(task.default_methods) | set(suites.MODERN)
        assert set(labels) <= set(METHODS)
    if suite == "ablations":
        assert {"scratch", "td", "td-rounds-0", "td-no-mc", "td-no-sc", "td-dense", "td-m64"} <= set(labels)


def test_ablations_change_only_what_their_label_says():
    base = METHODS["td"].Config()
    for label, entry in {**suites.ABLATIONS, **suites.DECODER}.items():
        if entry["name"] != "td" or label == "td":
            continue
        options = {k: v for k, v in entry.items() if k != "name"}
        changed = METHODS["td"].Config(**options)
        assert changed != base, label
        differing = [k for k in type(base).model_fields if getattr(changed, k) != getattr(base, k)]
        assert sorted(differing) == sorted(options), label
        if "teacher_layers" in options:  # (a pair of the teacher's own, not the task's (10, 14))
            assert tuple(options["teacher_layers"]) != ("model.layers.10", "model.layers.14"), label


def test_unknown_suite_and_settings_with_all(capsys):
    assert cli.main(["bench", "movielens", "--suite", "full,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown suite 'nope'; valid suites: core, full, ablations")
    assert len(err.splitlines()) == 1
    assert cli.main(["bench", "all", "--settings", "dense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --settings") and len(err.splitlines()) == 1


def test_classification_only_methods_are_na_on_ratings(task_options, tmp_path, capsys):
    """dkd has no meaning on rating regression: the store holds an n/a row, the report says
    n/a, and the other methods' rows carry their CKA with the teacher."""
    config = {"task": "movielens", "settings": ["dense"], "seeds": 2,
              "methods": [{"name": "scratch"}, {"name": "dkd"}, {"name": "td"}],
              "train": {"epochs": 2, "batch_size": 64, "lr": 0.01},
              "task_options": copy.deepcopy(task_options)}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        rows = {(r["method"], r["seed"]): r for r in csv.DictReader(handle)}
    assert rows[("dkd", "0")]["status"].startswith("n/a: needs classification")
    assert rows[("dkd", "0")]["value"] == "nan"
    for method in ("scratch", "td"):
        assert 0.0 <= float(rows[(method, "1")]["cka"]) <= 1.0
        assert rows[(method, "1")]["cka_classes"] == ""  # regression: no classes
        assert 0.05 < float(rows[(method, "1")]["peak_gib"]) < 24  # the run's peak memory
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| dkd | n/a: needs classification outputs |" in report
    assert (tmp_path / "out" / "cka_movielens.png").stat().st_size > 0
    # a rerun does not try the n/a runs again
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 6


def test_per_class_numbers_are_json(tmp_path):
    """Classification runs store per-class CKA and accuracy as JSON objects keyed by class."""
    import pandas as pd

    from talkingmodels.report.statistics import _per_class

    runs = pd.DataFrame([
        {"method": "scratch", "class_metric": json.dumps({"0": 0.5, "1": 1.0})},
        {"method": "scratch", "class_metric": json.dumps({"0": 0.7, "1": 0.8})},
        {"method": "td", "class_metric": json.dumps({"0": 0.9, "1": 0.8})}])
    table = _per_class(runs, "class_metric")
    assert table.loc["scratch", 0] == pytest.approx(0.6)
    assert table.loc["scratch", 1] == pytest.approx(0.9)
    assert table.loc["td", 0] == pytest.approx(0.9)


def test_a_tasks_method_options_apply_under_the_configs_own():
    from talkingmodels.config import ExperimentConfig, resolve

    def options(task, entry):
        exp = resolve(ExperimentConfig(task=task, methods=[entry]))
        return exp.methods[0][2]

    assert options("text", {"name": "fitnet"}).hint_epochs == 2  # the task's default
    assert options("text", {"name": "fitnet", "hint_epochs": 1}).hint_epochs == 1  # the config's
    crd = options("movielens", {"name": "crd"})
    assert crd.shared_negatives and crd.nce_k == 1024
    assert options("movielens", {"name": "rkd"}).angle_examples == 64
    assert options("vision", {"name": "rkd"}).angle_examples is None
    rkd = options("text", {"name": "rkd"})  # weights chosen on text's tuning seeds
    assert (rkd.distance_weight, rkd.angle_weight) == (1.0, 2.0)
    assert options("text", {"name": "pkt"}).pkt_weight == 300.0
    assert options("vision", {"name": "pkt"}).pkt_weight == 30000.0  # the paper's elsewhere


def test_several_suites_run_into_one_store(monkeypatch, tmp_path):
    """bench all --suite full,ablations: every task's full grid and ablations, one store."""
    from talkingmodels import runner

    calls = []

    def fake_run(exp, out, **store):
        calls.append((exp.task.name, len(exp.methods), out, store["force"]))
        return out / "report.md"

    monkeypatch.setattr(runner, "run_experiment", fake_run)
    assert cli.main(["bench", "all", "--suite", "full,ablations", "--force"]) == 0
    ablations = len(suites.ABLATIONS)
    assert [(name, count) for name, count, _, _ in calls] == [
        (name, count) for name in benchmarks()
        for count in (len(get_task(name).default_methods) + len(suites.MODERN), ablations)]
    assert {out for _, _, out, _ in calls} == {Path("runs/all-full-ablations")}
    assert [force for *_, force in calls] == [True] + [False] * (len(calls) - 1)


def test_peak_memory_of_nested_blocks():
    """A block gets its own peak (the high-water mark is set back on entering it), and an
    enclosing block keeps the peaks of the blocks inside it."""
    from talkingmodels.probes import PeakMemory

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the high-water mark can only be set back on Linux")

    def spike():
        # an anonymous mapping of its own: fresh pages whatever the C allocator holds free
        # (a bytearray may be served from heap memory that is already resident)
        with mmap.mmap(-1, 200 * 1024**2) as big:
            for offset in range(0, len(big), mmap.PAGESIZE):
                big[offset] = 1  # touch every page

    with PeakMemory() as outer:
        with PeakMemory() as first:
            spike()
        with PeakMemory() as second:
            pass
    assert first.peak > second.peak + 0.15
    assert outer.peak == pytest.approx(first.peak, abs=0.01)


def test_a_workers_peak_counts_in_every_open_block():
    """With --jobs the runs' memory is the workers': the bench's printed peak is its largest
    process's, so a worker's peak is folded into every block that is open."""
    from talkingmodels.probes import PeakMemory

    with PeakMemory() as outer:
        with PeakMemory() as inner:
            PeakMemory.include(50.0)  # far above this process
    with PeakMemory() as later:
        pass
    assert inner.peak == outer.peak == 50.0 and later.peak < 50.0
