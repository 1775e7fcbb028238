"""The command line: a user's mistake is one ``error:`` line naming the bad value, exit 2;
``run``/``bench`` write the runs store and the report, and skip runs already done."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from talkingmodels import cli, runner
from talkingmodels.config import load_config
from talkingmodels.methods import METHODS
from talkingmodels.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
STORE_COLUMNS = ["task", "setting", "method", "seed", "metric", "value"]


@pytest.fixture
def config(task_options) -> dict:
    """A small valid experiment on the fixture data: 1 seed, 2 epochs, scratch and td."""
    return {"task": "movielens", "settings": ["dense"], "seeds": 1,
            "methods": [{"name": "scratch"}, {"name": "td"}],
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.01},
            "task_options": copy.deepcopy(task_options)}


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def call(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *names: str) -> None:
    """Exactly one line on stderr, starting with ``error:`` and naming every one of ``names``."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------ argument errors
# (every other user mistake is in test_bad_inputs.py)
@pytest.mark.parametrize("argv, names", [
    (["frobnicate"], ["invalid choice", "'frobnicate'"]),
    (["bench"], ["task"]),
])
def test_argument_errors(argv, names, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, *names)


@pytest.fixture
def no_grid(monkeypatch):
    """Replace the grid runner: records its calls and advances a fake clock by 42 s."""
    calls, clock = [], [1000.0]

    def fake_run(exp, out, force=False, progress=True, resume=False, tensorboard=None, jobs=1,
                 threads=None):
        calls.append(exp)
        clock[0] += 42.0
        return Path(out) / "report.md"

    monkeypatch.setattr(runner, "run_experiment", fake_run)
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    return calls


def test_bench_rejects_zero_epochs(no_grid, capsys, tmp_path):
    code, _, err = call(capsys, "bench", "movielens", "--epochs", "0", "--out", tmp_path)
    assert code == 2 and not no_grid
    assert_one_error_line(err, "epochs", "0")


def test_bench_reports_its_duration(no_grid, capsys, tmp_path):
    code, out, _ = call(capsys, "bench", "movielens", "--seeds", "1", "--out", tmp_path)
    assert code == 0 and len(no_grid) == 1
    assert "in 42 s" in out


@pytest.mark.parametrize("seeds", ["many", "5-2", "1,x"])
def test_bad_seeds_are_one_error_line(no_grid, capsys, tmp_path, seeds):
    code, _, err = call(capsys, "bench", "movielens", "--seeds", seeds, "--out", tmp_path)
    assert code == 2 and not no_grid
    assert_one_error_line(err, "--seeds", repr(seeds))


@pytest.mark.parametrize("seeds, expected", [("2", [0, 1]), ("100-102", [100, 101, 102]),
                                             ("3,7", [3, 7])])
def test_bench_seeds_and_suite_labels(no_grid, capsys, tmp_path, seeds, expected):
    """--seeds: a count, a range (the tuning seeds) or a list; --methods picks the suite's own
    labels with their options (other names: the method with its defaults)."""
    code, _, _ = call(capsys, "bench", "movielens", "--suite", "research", "--seeds", seeds,
                      "--methods", "td-grounded,logit-kd", "--out", tmp_path)
    assert code == 0
    exp = no_grid[0]
    assert exp.seeds == expected
    (label, cls, options), (other, _, _) = exp.methods
    assert (label, cls.name, other) == ("td-grounded", "td", "logit-kd")
    assert options.round_consistency and options.listen == "gate"


def test_run_reports_its_duration(no_grid, config, capsys, tmp_path):
    code, out, _ = call(capsys, "run", write(tmp_path / "c.yaml", config), "--out", tmp_path / "o")
    assert code == 0 and len(no_grid) == 1
    assert "in 42 s" in out


# ------------------------------------------------------------------------------ listings
def test_methods_and_tasks_are_listed(capsys):
    code, out, _ = call(capsys, "methods")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == sorted(METHODS)
    code, out, _ = call(capsys, "tasks")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == sorted(TASKS)
    assert "rmse" in out


# ------------------------------------------------------------------------------ real runs
def check_store(out: Path, methods: list[str]) -> list[dict]:
    rows = read_rows(out / "results.csv")
    with open(out / "results.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header[: len(STORE_COLUMNS)] == STORE_COLUMNS
    assert sorted(row["method"] for row in rows) == sorted(methods)
    for row in rows:
        key = (row["task"], row["setting"], row["seed"], row["metric"])
        assert key == ("movielens", "dense", "0", "rmse")
        assert 0.3 < float(row["value"]) < 2.0
    report = (out / "report.md").read_text()
    assert "## movielens / dense" in report and all(f"| {m} |" in report for m in methods)
    for name in ("curves_movielens_dense.png", "cka_movielens.png"):  # curves, CKA heatmap
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows


def test_run_writes_the_store_and_skips_done_runs(config, tmp_path, capsys):
    path = write(tmp_path / "tiny.yaml", config)
    out = tmp_path / "out"
    code, stdout, err = call(capsys, "run", path, "--out", out)
    assert code == 0, err
    assert "report.md" in stdout
    rows = check_store(out, ["scratch", "td"])
    before = (out / "results.csv").read_text()
    code, _, err = call(capsys, "run", path, "--out", out)
    assert code == 0, err
    assert (out / "results.csv").read_text() == before  # already done: no new rows
    assert len(read_rows(out / "results.csv")) == len(rows) == 2
    # the report can be rewritten alone; a folder without a store is an error
    code, stdout, _ = call(capsys, "report", out)
    assert code == 0 and "report.md" in stdout
    code, _, err = call(capsys, "report", tmp_path)
    assert code == 2
    assert_one_error_line(err, "no results.csv", str(tmp_path))


def python_m(*argv, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "talkingmodels", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_subprocess_error_is_one_line(tmp_path):
    done = python_m("run", "missing.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert_one_error_line(done.stderr, "missing.yaml")
    assert done.stdout == ""


def test_subprocess_bench(ml_dir, tmp_path):
    argv = ["bench", "movielens", "--settings", "dense", "--methods", "scratch,td", "--seeds", "1",
            "--epochs", "2", "--data-dir", ml_dir, "--cache-dir", tmp_path / "cache", "--out",
            tmp_path / "out"]
    done = python_m(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    check_store(tmp_path / "out", ["scratch", "td"])
    before = (tmp_path / "out" / "results.csv").read_text()
    done = python_m(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "results.csv").read_text() == before


# ------------------------------------------------------------------------------ shipped configs
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS or [None], ids=[p.name for p in CONFIGS] or ["none"])
def test_shipped_configs_validate(path):
    if path is None:
        pytest.skip("no configs/*.yaml in the repo")
    exp = load_config(path)
    assert exp.methods and exp.settings and exp.seeds


@pytest.fixture
def diverging_method():
    """A registered method whose task term turns NaN from its second step on."""
    from talkingmodels.methods import Distiller

    class Diverging(Distiller):
        """Test only."""

        steps = 0

        def forward_train(self, batch):
            prediction, terms = super().forward_train(batch)
            Diverging.steps += 1
            if Diverging.steps > 1:
                terms["task"] = terms["task"] * float("nan")
            return prediction, terms

    METHODS.register("test-diverging")(Diverging)
    yield "test-diverging"
    METHODS.pop("test-diverging")


def test_a_diverging_run_is_recorded_as_failed(config, tmp_path, capsys, diverging_method):
    config["methods"] = [{"name": "scratch"}, {"name": diverging_method}]
    out = tmp_path / "out"
    code, _, err = call(capsys, "run", write(tmp_path / "c.yaml", config), "--out", out)
    assert code == 0, err  # the grid goes on; the failure is data, not a crash
    assert "Traceback" not in err
    assert "loss term 'task' became non-finite at step 2 of epoch 1" in err
    rows = {row["method"]: row for row in read_rows(out / "results.csv")}
    assert rows["scratch"]["status"] == "ok"
    assert rows[diverging_method]["status"].startswith("failed: loss term 'task'")
    assert rows[diverging_method]["value"] == "nan"
    report = (out / "report.md").read_text()
    assert f"| {diverging_method} | nan ± 0.0000 | n/a | 0/0 | 0 (1 failed) |" in report
    # a rerun does not retry it silently (--force does)
    code, _, _ = call(capsys, "run", write(tmp_path / "c.yaml", config), "--out", out)
    assert code == 0 and len(read_rows(out / "results.csv")) == 2


# ------------------------------------------------------------------------------ resume, TensorBoard
@pytest.fixture
def interrupting_method():
    """A registered TD whose first instance receives SIGINT in its 5th step."""
    import signal

    from talkingmodels.methods.td import TalkingDistillation

    class Interrupting(TalkingDistillation):
        """Test only."""

        steps = 0

        def forward_train(self, batch):
            Interrupting.steps += 1
            if Interrupting.steps == 5:
                os.kill(os.getpid(), signal.SIGINT)
            return super().forward_train(batch)

    METHODS.register("test-interrupting")(Interrupting)
    yield "test-interrupting"
    METHODS.pop("test-interrupting")


def test_resume_continues_an_interrupted_run(config, tmp_path, capsys, interrupting_method):
    config["methods"] = [{"name": interrupting_method, "label": "td"}]
    path = write(tmp_path / "c.yaml", config)
    code, _, err = call(capsys, "run", path, "--out", tmp_path / "out")
    assert code == 130 and "--resume" in err
    assert (tmp_path / "out" / "checkpoints" / "dense__td__0.pt").exists()
    code, _, err = call(capsys, "run", path, "--out", tmp_path / "out")  # no --resume
    assert code == 2 and "--resume" in err
    code, _, err = call(capsys, "run", path, "--out", tmp_path / "out", "--resume")
    assert code == 0, err
    config["methods"] = [{"name": "td"}]  # the same run, never interrupted
    code, _, err = call(capsys, "run", write(tmp_path / "w.yaml", config), "--out", tmp_path / "whole")
    assert code == 0, err
    def outcome(out):
        return [(r["value"], r["val_value"], r["epochs"]) for r in read_rows(out / "results.csv")]

    assert outcome(tmp_path / "out") == outcome(tmp_path / "whole")
    assert not list((tmp_path / "out" / "checkpoints").glob("*.pt"))


def test_tensorboard_logs_every_loss_term_per_step_and_epoch(config, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config["methods"] = [{"name": "td"}]
    code, _, err = call(capsys, "run", write(tmp_path / "c.yaml", config), "--out", tmp_path / "out",
                        "--tensorboard", tmp_path / "tb")
    assert code == 0, err
    events = EventAccumulator(str(tmp_path / "tb" / "dense__td__0")).Reload()
    tags = set(events.Tags()["scalars"])
    terms = {"task", "kd", "interact", "mc", "sc"}
    assert {f"step/loss_{t}" for t in terms} | {f"epoch/loss_{t}" for t in terms} | {"epoch/val_rmse"} <= tags
    from talkingmodels.store import read_curves

    curves = read_curves(tmp_path / "out")
    epochs = set(curves[curves.method == "td"].epoch.astype(int))
    assert [e.step for e in events.Scalars("epoch/val_rmse")] == sorted(epochs)
    steps = [e.step for e in events.Scalars("step/loss_task")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) % len(epochs) == 0


def test_jobs_write_the_store_a_serial_run_writes(config, tmp_path, capsys, monkeypatch):
    """Independent runs in worker processes: the same rows (values, epochs, CKA), curves and
    students as one process with the same threads per run, in the grid's order. The main
    process lets go of its task's models and data before the workers load their own."""
    from safetensors.torch import load_file

    from talkingmodels.store import read_curves
    from talkingmodels.tasks.base import Task

    released = []
    release = Task.release
    monkeypatch.setattr(Task, "release", lambda self: (released.append(self.name), release(self)))

    config.update(seeds=2, methods=[{"name": "scratch"}, {"name": "td"}, {"name": "fitnet"}])
    path = write(tmp_path / "c.yaml", config)
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert call(capsys, "run", path, "--out", serial, "--threads", "1")[0] == 0
    assert not released  # (a serial run trains on what it prepared)
    assert call(capsys, "run", path, "--out", parallel, "--jobs", "2", "--threads", "1")[0] == 0
    assert released == [config["task"]]
    volatile = {"seconds", "peak_gib"}
    rows = [[{k: v for k, v in r.items() if k not in volatile} for r in read_rows(out / "results.csv")]
            for out in (serial, parallel)]
    assert rows[0] == rows[1] and len(rows[0]) == 6
    assert read_curves(serial).equals(read_curves(parallel))
    for student in (serial / "students").iterdir():
        one, two = load_file(student), load_file(parallel / "students" / student.name)
        assert all(torch.equal(one[k], two[k]) for k in one)
    code, _, err = call(capsys, "run", path, "--out", tmp_path / "x", "--jobs", "0")
    assert code == 2 and "--jobs" in err


class _Workers(Exception):
    """Raised instead of starting worker processes: how many, with how many threads."""


def test_bench_defaults_to_a_job_per_core_with_one_thread_on_tiny_models(
        config, tmp_path, monkeypatch, capsys):
    def record(exp, grid, out, tensorboard, jobs, threads):
        raise _Workers(jobs, threads)

    monkeypatch.setattr(runner, "_in_workers", record)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # (this process keeps its own)
    data = config["task_options"]["data_dir"]
    argv = ["bench", "movielens", "--settings", "dense", "--methods", "scratch,td,logit-kd",
            "--seeds", "2", "--epochs", "1", "--data-dir", data, "--out", tmp_path / "bench"]
    with pytest.raises(_Workers) as raised:
        cli.main([str(a) for a in argv])
    assert raised.value.args == (4, 1)  # 6 runs, 4 cores: 4 jobs of 1 thread
    with pytest.raises(_Workers) as raised:  # given values win
        cli.main([str(a) for a in [*argv, "--jobs", "3", "--threads", "2", "--force"]])
    assert raised.value.args == (3, 2)
    # run (a config's own grid) keeps one job unless told
    path = write(tmp_path / "exp.yaml", {**config, "train": {"epochs": 1}})
    assert cli.main(["run", str(path), "--out", str(tmp_path / "run")]) == 0


def test_a_serial_run_lets_each_setting_go_after_its_runs(config, tmp_path, capsys, monkeypatch):
    """One process runs the settings one after another and drops each after its last run,
    so that it never holds every setting's data (memory-mapped teacher caches included) at
    once: no earlier setting is alive when a later one's runs start."""
    import gc
    import weakref

    alive, real = [], runner._run_one

    def spy(exp, prep, *args, **kwargs):
        gc.collect()
        alive.append((prep.setting, sorted(s for s, ref in refs if ref() is not None and s != prep.setting)))
        refs.append((prep.setting, weakref.ref(prep)))
        return real(exp, prep, *args, **kwargs)

    refs: list = []
    monkeypatch.setattr(runner, "_run_one", spy)
    config.update(settings=["dense", "sparse"], methods=[{"name": "scratch"}], train={"epochs": 1})
    assert call(capsys, "run", write(tmp_path / "c.yaml", config), "--out", tmp_path / "out")[0] == 0
    assert alive == [("dense", []), ("sparse", [])]


# ------------------------------------------------------------------------------ one writer
def _start_writer(command: list[str], out: Path) -> subprocess.Popen:
    """A real ``talkingmodels`` process, returned once it holds the store's lock."""
    import time

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock, deadline = out / ".lock", time.monotonic() + 300
    while not (lock.is_file() and lock.read_text().strip() == str(process.pid)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the writer never took the lock"
        time.sleep(0.05)
    return process


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_second_writer_of_a_store_is_refused_and_writes_nothing(config, tmp_path):
    """Two real processes on one folder: the second is refused with one line naming the
    folder and the holder's pid, exit 2, while the first is held still (SIGSTOP) with the
    lock; the store ends with the rows of one grid."""
    import signal

    config.update(seeds=2)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "talkingmodels.cli", "run", str(write(tmp_path / "c.yaml", config)),
               "--out", str(out), "--threads", "1"]
    first = _start_writer(command, out)
    first.send_signal(signal.SIGSTOP)
    try:
        before = _files(out)
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert_one_error_line(second.stderr, str(out), f"pid {first.pid}")
        assert _files(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.communicate()
    keys = [(r["setting"], r["method"], r["seed"]) for r in read_rows(out / "results.csv")]
    assert sorted(keys) == sorted({(s, m, str(seed)) for s in config["settings"]
                                   for m in ("scratch", "td") for seed in range(2)})


def test_a_killed_writer_leaves_no_stale_lock(config, tmp_path, capsys):
    """SIGKILL mid-grid: the folder is writable again at once, and --resume finishes it."""
    out = tmp_path / "out"
    path = write(tmp_path / "c.yaml", config)
    first = _start_writer([sys.executable, "-m", "talkingmodels.cli", "run", str(path), "--out", str(out),
                           "--threads", "1"], out)
    first.kill()
    first.wait()
    assert call(capsys, "run", path, "--out", out, "--resume", "--threads", "1")[0] == 0
    assert len(read_rows(out / "results.csv")) == 2


def test_report_is_refused_while_a_writer_holds_the_store(config, tmp_path, capsys):
    from talkingmodels import store

    out = tmp_path / "out"
    assert call(capsys, "run", write(tmp_path / "c.yaml", config), "--out", out, "--threads", "1")[0] == 0
    before = _files(out)
    with store.writer_lock(out):  # (a second open file's flock conflicts, in one process too)
        code, _, err = call(capsys, "report", out)
    assert code == 2
    assert_one_error_line(err, str(out), f"pid {os.getpid()}")
    assert _files(out) == before
    assert call(capsys, "report", out)[0] == 0


def test_run_ends_with_the_headline_tables_and_quiet_with_one_line(config, tmp_path, capsys):
    from talkingmodels.report.headline import headline

    path, out = write(tmp_path / "c.yaml", config), tmp_path / "out"
    code, stdout, _ = call(capsys, "run", path, "--out", out, "--threads", "1")
    assert code == 0
    table = headline(out)
    assert table.startswith("movielens / dense (lower is better)\n  method ")
    assert "vs scratch" in table and "paired t, Holm (5%)" in table
    assert {line.split()[0] for line in table.splitlines()[2:]} == {"scratch", "td", "teacher"}
    assert table in stdout and stdout.index(table) < stdout.index(f"wrote {out / 'report.md'}")
    assert stdout.rstrip().splitlines()[-1].startswith(f"wrote {out / 'report.md'} ")
    code, stdout, _ = call(capsys, "run", path, "--out", out, "--threads", "1", "--quiet")
    assert code == 0 and len(stdout.strip().splitlines()) == 1 and stdout.startswith("wrote ")
