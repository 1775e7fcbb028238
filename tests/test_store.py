"""The runs store: rows of the current layout, appended whole; curves appended per run and
read back once; rows read in the order the grid ran them; older layouts refused clearly."""

from __future__ import annotations

import gzip

import pytest

from talkingmodels import store
from talkingmodels.errors import UserError
from talkingmodels.losses import ACCURACY, RMSE


def key(method, seed=0, setting="dense"):
    return {"task": "toy", "setting": setting, "method": method, "seed": seed}


def test_a_results_row_names_its_metric_and_refuses_unknown_columns():
    row = store.result_row(key("td"), RMSE, 0.9, "td", value="0.950000")
    assert row["metric"] == "rmse" and row["higher_is_better"] is False and row["status"] == "ok"
    assert row["val_value"] == "nan" and row["teacher_value"] == "0.900000" and row["class_names"] == ""
    named = store.result_row(key("td"), ACCURACY, 0.5, "td", class_names=("cat", "dog"))
    assert named["higher_is_better"] is True and named["class_names"] == '["cat", "dog"]'
    with pytest.raises(ValueError, match="not columns"):
        store.result_row(key("td"), RMSE, 0.9, "td", valu="0.95")


def test_rows_read_back_in_the_order_the_grid_ran(tmp_path):
    for method, setting in (("td", "sparse"), ("scratch", "dense"), ("td", "dense"), ("scratch", "sparse")):
        row = store.result_row(key(method, setting=setting), RMSE, 0.9, method)
        store.append_results(tmp_path, [row])
    store.record_task(tmp_path, "toy", {}, ["dense", "sparse"], ["scratch", "td"])
    results = store.read_results(tmp_path)
    assert list(zip(results.setting, results.method, strict=True)) == [
        ("dense", "scratch"), ("dense", "td"), ("sparse", "scratch"), ("sparse", "td")]
    assert store.done_runs(tmp_path) == {("toy", s, m, "0") for s in ("dense", "sparse")
                                         for m in ("td", "scratch")}


def test_curves_of_a_run_appended_twice_are_read_once(tmp_path):
    def curve(method, value):
        return [{**key(method), "epoch": e, "stage": "main", "name": "val_rmse", "value": value + e}
                for e in (1, 2)]

    store.append_curves(tmp_path, curve("td", 10))
    store.append_curves(tmp_path, curve("scratch", 20))
    store.append_curves(tmp_path, curve("td", 30))  # redone after a crash before its row
    curves = store.read_curves(tmp_path)
    assert sorted(zip(curves.method, curves.value, strict=True)) == [
        ("scratch", 21), ("scratch", 22), ("td", 31), ("td", 32)]


def test_a_store_of_another_layout_is_one_clear_error(tmp_path):
    (tmp_path / "results.csv").write_text("task,setting,method,seed,metric,value\ntoy,dense,td,0,rmse,0.9\n")
    with pytest.raises(UserError, match="not of this version's layout .*missing columns: val_value"):
        store.read_results(tmp_path)


def test_a_store_records_the_machine_and_software_it_ran_on(tmp_path, monkeypatch):
    import torch

    assert store.machines_text(tmp_path).startswith("Machine and software not recorded")
    store.record_task(tmp_path, "movielens", {}, ["dense"], ["td"])
    store.record_task(tmp_path, "movielens", {}, ["sparse"], ["td"])  # the same machine: once
    (machine,) = store.read_tasks(tmp_path)["movielens"]["machines"]
    assert machine["torch"] == torch.__version__ and machine["cores"] >= 1 and machine["cpu"]
    other = {**machine, "cpu": "Another CPU"}
    monkeypatch.setattr(store, "machine", lambda: other)
    store.record_task(tmp_path, "text", {}, ["tweets"], ["td"])
    text = store.machines_text(tmp_path)
    assert text.startswith(f"Run on {machine['cpu']} ({machine['cores']} cores), torch {torch.__version__}")
    assert "; Another CPU" in text


def test_a_store_with_a_run_twice_is_one_error_naming_it(tmp_path, capsys):
    """Two processes' rows for one run (a store written before the lock): report, export and
    --resume stop with one line naming the run and the repair; nothing is changed."""
    from talkingmodels import cli

    rows = [store.result_row(key(m), RMSE, 0.9, m, value="0.95") for m in ("scratch", "td", "td")]
    store.append_results(tmp_path, rows)
    store.record_task(tmp_path, "toy", {}, ["dense"], ["scratch", "td"])
    before = (tmp_path / "results.csv").read_bytes()
    for read in (store.read_results, store.done_runs, store.check_rows):
        with pytest.raises(UserError, match=r"holds 1 run\(s\) more than once \(toy/dense/td/0;.*--resume"):
            read(tmp_path)
    export = ["export", tmp_path, "dense__td__0", "--out", tmp_path / "s.safetensors"]
    for argv in (["report", tmp_path], export):
        assert cli.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "toy/dense/td/0" in err
    assert (tmp_path / "results.csv").read_bytes() == before and not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("cut", [1, 9, 30])
def test_a_results_file_cut_mid_row_is_one_error(tmp_path, cut):
    rows = [store.result_row(key(m), RMSE, 0.9, m, value="0.95") for m in ("scratch", "td")]
    store.append_results(tmp_path, rows)
    path = tmp_path / "results.csv"
    path.write_bytes(path.read_bytes()[:-cut])
    for read in (store.read_results, store.done_runs):
        with pytest.raises(UserError, match="row cut short at line 3 .*delete that line"):
            read(tmp_path)


def test_curves_go_in_one_file_a_setting_and_a_cut_file_is_one_error(tmp_path):
    def curve(setting):
        return [{**key("td", setting=setting), "epoch": 1, "stage": "main", "name": "val_rmse", "value": 1.5}]

    store.append_curves(tmp_path, curve("dense"))
    store.append_curves(tmp_path, curve("sparse/x"))
    files = sorted(p.name for p in (tmp_path / "curves").iterdir())
    assert files == ["toy__dense.csv.gz", "toy__sparse_x.csv.gz"]
    # an older store's single file is read with them
    old = store.csv_text(store.CURVE_COLUMNS, curve("old"))
    (tmp_path / "curves.csv.gz").write_bytes(gzip.compress(old.encode()))
    assert sorted(store.read_curves(tmp_path).setting) == ["dense", "old", "sparse/x"]
    path = tmp_path / "curves" / "toy__dense.csv.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(UserError, match="toy__dense.csv.gz is cut short or damaged"):
        store.read_curves(tmp_path)
