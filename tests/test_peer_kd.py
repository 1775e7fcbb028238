"""benchmarks/peer_kd.py: our logit-kd step against torchdistill's KD step.

The comparison itself needs torchdistill (the optional ``peer`` extra) and is skipped
without it; on a tiny vision setting (64 training images, a 32 px teacher) both sides take
a few steps, and their first-step losses must be equal: the loss mapping (alpha 1, beta w0,
T^2, batchmean) is what this checks.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_kd.py"
SMALL = {"val_size": 32, "test_size": 64, "teacher_image_size": 32, "download": False}


def load_script():
    spec = importlib.util.spec_from_file_location("peer_kd", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peer_kd():
    module = load_script()
    # torchvision (imported by torchdistill) cannot load its operators next to CPU torch:
    # the script declares the two it needs before the import (see its docstring)
    module._declare_torchvision_ops()
    pytest.importorskip("torchdistill")
    return module


@pytest.fixture(scope="module")
def options(tmp_path_factory):
    return {**SMALL, "cache_dir": str(tmp_path_factory.mktemp("peer-kd") / "cache")}


@pytest.mark.parametrize("teacher", ["cached", "online"])
def test_first_step_losses_of_ours_and_torchdistill_are_equal(peer_kd, options, teacher, tmp_path):
    row = peer_kd.compare("vision", "fashion-64", teacher, steps=2, warmup=1, block=1,
                          task_options=options)
    assert row["first_loss_ours"] > 0
    assert row["first_loss_ours"] == pytest.approx(row["first_loss_peer"], rel=peer_kd.TOLERANCE, abs=0)
    assert row["first_loss_rel"] <= peer_kd.TOLERANCE
    assert row["ours_samples_per_s"] > 0 and row["peer_samples_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["ours_samples_per_s"] / row["peer_samples_per_s"])
    assert (row["task"], row["setting"], row["teacher"]) == ("vision", "fashion-64", teacher)
    path = tmp_path / "peer.csv"
    peer_kd.write_csv(path, [row])
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == peer_kd.COLUMNS
    assert {"ours_samples_per_s", "peer_samples_per_s", "ratio"} <= set(rows[0])
    assert float(rows[0]["first_loss_peer"]) == row["first_loss_peer"]


def test_regression_tasks_are_refused():
    with pytest.raises(ValueError, match="regression"):
        load_script().compare("movielens")


def test_without_torchdistill_it_says_how_to_install(monkeypatch, capsys):
    script = load_script()
    monkeypatch.setattr(script, "import_torchdistill", lambda: None)
    monkeypatch.setattr("sys.argv", ["peer_kd.py", "--tasks", "vision"])
    with pytest.raises(SystemExit) as exit_:
        script.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: torchdistill is not installed; pip install -c constraints.txt -e ".[peer]"']
