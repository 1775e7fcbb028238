"""benchmarks/td_profile.py: TD's step against its floor, on the fixture MovieLens task.

Only what the numbers are made of is checked (times are never asserted on): every
measurement is there and positive, the floor is TD's step without interaction plus the
interpretation step alone, the channel alone is measured, and the CSV has its columns.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "td_profile.py"


@pytest.fixture(scope="module")
def td_profile():
    spec = importlib.util.spec_from_file_location("td_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floor_channel_and_csv(td_profile, task_options, tmp_path):
    args = argparse.Namespace(steps=2, repeats=1, compile=False, ops=0, residual=3, data_dir=None)
    row = td_profile.profile_task("movielens", args, task_options)
    for label in ("logit-kd", "td", "td, rounds 0", "interpretation", "interpretation (forward only)",
                  "channel", "channel (forward only)", *td_profile.VARIANTS):
        assert row[label] > 0, label
    assert row["floor"] == row["td, rounds 0"] + row["interpretation"]
    assert row["floor and channel"] == row["floor"] + row["channel"]
    assert row["interaction"] == row["td"] - row["td, rounds 0"]
    # the per-operator residual: a table of 3 operators and their total
    lines = row["residual"].splitlines()
    assert len(lines) == 2 + 3 + 1 and lines[-1].startswith("| (all operators) |")
    assert any("aten::" in line for line in lines[2:5])
    path = tmp_path / "td_profile.csv"
    td_profile.write_csv(path, [row])
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == td_profile.COLUMNS
    assert {"task", "td_ms", "floor_ms", "td_over_floor"} <= set(rows[0])
    assert float(rows[0]["td_over_floor"]) == pytest.approx(row["td"] / row["floor"], abs=1e-3)
    assert float(rows[0]["td_over_floor_and_channel"]) == pytest.approx(
        row["td"] / row["floor and channel"], abs=1e-3)
    assert float(rows[0]["channel_forward_ms"]) == pytest.approx(row["channel (forward only)"], abs=1e-3)


def test_measurements_take_turns_block_by_block(td_profile):
    calls = []
    timed = {label: (lambda label=label: calls.append(label)) for label in ("td", "floor")}
    times = td_profile.interleaved_ms(timed, blocks=2, warmup=1, block=2, settle=1)
    assert set(times) == {"td", "floor"} and min(times.values()) >= 0
    # warm-up, then per block: one untimed call and two timed ones, each measurement in turn
    assert calls == ["td", "floor"] + (["td"] * 3 + ["floor"] * 3) * 2
