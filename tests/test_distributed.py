"""Multi-process training: ``accelerate launch`` with 2 CPU processes (DDP, gloo) against one
process with the same global batch.

Each process trains on half of every global batch and DDP averages the gradients, so the two
runs differ only by floating-point summation order (and by how an odd last batch is split):
the tolerance below is 1e-4 on RMSE, 5x the largest difference measured on the fixture data
(2e-5) and an order of magnitude below the differences between methods (1e-3 and more).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TOLERANCE = 1e-4
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def grid(task_options, tmp_path) -> Path:
    # td (channel modules in DDP) and fitnet (a stage where the student's head is unused)
    config = {"task": "movielens", "settings": ["dense"], "seeds": [0, 1],
              "methods": [{"name": "td"}, {"name": "fitnet"}],
              "train": {"epochs": 3, "batch_size": 64, "patience": 3},
              "task_options": task_options}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(argv: list[str], out: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}  # no accelerate config
    result = subprocess.run([*argv, "-m", "talkingmodels", "run", *map(str, out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_match_one_and_only_the_main_process_writes(grid, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable], (grid, "--out", one), tmp_path)
    launched = run(LAUNCH, (grid, "--out", two), tmp_path)

    single, multi = rows(one), rows(two)
    assert len(multi) == 4  # one row per run: a second writer would have doubled them
    for a, b in zip(single, multi, strict=True):
        assert (a["method"], a["seed"], b["status"]) == (b["method"], b["seed"], "ok")
        assert abs(float(a["value"]) - float(b["value"])) < TOLERANCE
        assert abs(float(a["val_value"]) - float(b["val_value"])) < TOLERANCE
    assert launched.stdout.count("wrote ") == 1
    assert sorted(p.name for p in (two / "students").iterdir()) == sorted(
        p.name for p in (one / "students").iterdir())
    assert not list((two / "checkpoints").glob("*.pt"))
    assert (two / "report.md").is_file()


def curves(out: Path) -> dict:
    from talkingmodels.store import read_curves

    return {(r.method, str(r.seed), str(r.epoch), r.name): float(r.value)
            for r in read_curves(out).itertuples()}


def test_a_causal_lm_on_two_processes_gives_the_losses_of_one(tmp_path):
    """Causal LMs (small random Llamas, a custom task from YAML): each process's shard of a
    batch holds its own number of real tokens, so each weighs its per-token mean by its share
    of the batch's tokens; the two processes then train on the mean over the whole batch,
    as one process does. Every logged loss term and the test perplexity agree within 2e-5."""
    pytest.importorskip("transformers")
    student = {"class": "tests.lm_models:llama", "args": {"width": 32, "layers": 2}}
    teacher = {"class": "tests.lm_models:llama", "args": {"width": 64, "layers": 4, "seed": 1}}
    config = {"task": "custom", "settings": ["default"], "seeds": [0],
              "methods": [{"name": "logit-kd", "temperature": 1.0}, {"name": "gkd"}],
              "train": {"epochs": 2, "patience": 2, "lr": 3e-3},
              "task_options": {"teacher": teacher, "student": student, "output": "causal-lm",
                               "data": {"function": "tests.lm_models:loaders", "args": {"n": 300}}}}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable], (path, "--out", one), tmp_path)
    run(LAUNCH, (path, "--out", two), tmp_path)
    single, multi = rows(one), rows(two)
    assert len(multi) == 2
    for a, b in zip(single, multi, strict=True):
        assert (a["method"], b["status"], a["metric"]) == (b["method"], "ok", "perplexity")
        assert abs(float(a["value"]) - float(b["value"])) < 2e-5 * float(a["value"])
    first, second = curves(one), curves(two)
    assert first.keys() == second.keys() and any(k[3] == "loss_gkd" for k in first)
    for key, value in first.items():
        assert abs(second[key] - value) < 2e-5 * abs(value), key
