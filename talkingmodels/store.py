"""The runs store: an output folder's files, their schema, and how they are written and read.

* ``results.csv``: one row per finished run (``RESULT_COLUMNS``), appended in one ``write``
  each, so a grid that stops at any point keeps every finished run whole;
* ``curves/TASK__SETTING.csv.gz``: every run's per-epoch losses and validation metric
  (``CURVE_COLUMNS``), one file a setting (older stores: one ``curves.csv.gz``, still read),
  one gzip member appended per run before its results row (a run redone after a crash in
  between appends its curves again: the reader keeps the last copy);
* ``samples.jsonl``: for tasks that generate text (``Task.samples``), one line per run (and per
  setting for its teacher): the completions of the task's fixed prompts;
* ``students/RUN.safetensors``: the selected student's weights; ``tasks.json``: per task, its
  options (to rebuild a run's student), its settings and method labels in the order they
  were run (the report's order) and the machines and software that ran it (bit-identical
  results hold on one machine and software stack only); ``checkpoints/RUN.pt`` while a run
  trains.

A run's row records its metric and the metric's direction, and the class names of a
classification task, so the report needs nothing but the store.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import platform
import re
import zlib
from collections import Counter
from pathlib import Path

import pandas as pd

from talkingmodels.errors import UserError
from talkingmodels.io import atomic_write_text

RESULT_COLUMNS = ["task", "setting", "method", "seed", "metric", "value", "val_value",
                  "teacher_value", "best_epoch", "epochs", "seconds", "extra_params", "method_name",
                  "status", "cka", "cka_classes", "class_metric", "class_metric_val", "peak_gib",
                  "higher_is_better",
                  "class_names"]
CURVE_COLUMNS = ["task", "setting", "method", "seed", "epoch", "stage", "name", "value"]
RESULTS, CURVES, TASKS, SAMPLES = "results.csv", "curves", "tasks.json", "samples.jsonl"
OLD_CURVES = "curves.csv.gz"  # (one curves file for the whole store, before curves/; still read)
LOCK = ".lock"  # the one writer's lock (see writer_lock)
TEACHER = "teacher (frozen)"  # the method label of the teacher's samples


def make_folder(out: Path) -> None:
    """The output folder exists (made if need be) and is a writable directory."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output directory {out} is not writable")


@contextlib.contextmanager
def writer_lock(out: Path):
    """Hold the store's one-writer lock while the block runs: an exclusive ``flock`` on
    ``OUT/.lock``, which holds the holder's process id. The kernel lets go of the lock when
    its process ends, even by SIGKILL, so no stale lock is ever left. A second process gets a
    ``UserError`` naming the folder and the holder, having written nothing (the folder and
    the lock file already exist)."""
    import fcntl

    out = Path(out)
    make_folder(out)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{out} is being written by another talkingmodels process (pid "
                            f"{holder}); wait for it to finish or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # (closing the file lets go of the lock)


def run_id_of(setting: str, label: str, seed) -> str:
    """A run's name in the store's files: ``SETTING__LABEL__SEED``, as a safe file name."""
    return _name(setting, label, str(seed))


def result_row(key: dict, metric, teacher_value: float, method_name: str, status: str = "ok",
               class_names: tuple[str, ...] = (), **cells) -> dict:
    """One results row: the run's ``key`` (task, setting, method label, seed), its metric
    (a :class:`~talkingmodels.losses.Metric`: name and direction), the teacher's metric, the
    method's registered name, the status (``ok``, ``n/a: ...``, ``failed: ...``), the task's
    class names, and the run's own ``cells`` (test and validation values, epochs, ...); a run
    that produced no value has ``nan`` there."""
    row = {**key, "metric": metric.name, "higher_is_better": metric.higher_is_better,
           "value": "nan", "val_value": "nan", "teacher_value": f"{teacher_value:.6f}",
           "method_name": method_name, "status": status,
           "class_names": json.dumps(list(class_names)) if class_names else "", **cells}
    if unknown := set(row) - set(RESULT_COLUMNS):
        raise ValueError(f"not columns of the runs store: {sorted(unknown)}")
    return row


def csv_text(columns: list[str], rows: list[dict], header: bool = True) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _append_bytes(path: Path, data: bytes) -> None:
    # One write in append mode, then fsync: the rows land whole or not at all.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def append_results(out: Path, rows: list[dict]) -> None:
    path = Path(out) / RESULTS
    _append_bytes(path, csv_text(RESULT_COLUMNS, rows, header=not path.exists()).encode())


def _name(*parts: str) -> str:
    return re.sub(r"[^\w.=+-]", "_", "__".join(parts))


def append_curves(out: Path, rows: list[dict]) -> None:
    """A run's curve rows as one gzip member of its setting's file (concatenated members
    read as one file); a file a setting keeps each of a large store's files small."""
    if not rows:
        return
    path = Path(out) / CURVES / f"{_name(str(rows[0]['task']), str(rows[0]['setting']))}.csv.gz"
    text = csv_text(CURVE_COLUMNS, rows, header=not path.exists())
    _append_bytes(path, gzip.compress(text.encode(), mtime=0))


def curve_files(out: Path) -> list[Path]:
    out = Path(out)
    return [p for p in [out / OLD_CURVES] if p.is_file()] + sorted((out / CURVES).glob("*.csv.gz"))


def append_samples(out: Path, key: dict, samples: dict[str, str]) -> None:
    """A run's (or a teacher's, method ``TEACHER``) completions of its task's prompts."""
    line = json.dumps({**key, "samples": samples}, sort_keys=True) + "\n"
    _append_bytes(Path(out) / SAMPLES, line.encode())


def read_samples(out: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    """(task, setting, method, seed) -> prompt -> completion; the last line of a key wins (a
    run redone appends again); a line cut short by a crash is skipped."""
    path = Path(out) / SAMPLES
    found = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            found[(entry["task"], entry["setting"], entry["method"], str(entry["seed"]))] = entry["samples"]
    return found


KEY = ["task", "setting", "method", "seed"]  # a run's identity: one row each


def check_rows(out: Path) -> list[tuple[str, ...]]:
    """The runs (``KEY``) of a store's results.csv, in its order, once it is known whole and
    with one row a run: a row cut short (a crash while it was appended, a full disk) or a run
    written twice (two processes on one store before the lock) is a ``UserError`` naming
    the rows and the repair, before anything reads or appends to the file."""
    path = Path(out) / RESULTS
    if not path.is_file():
        return []
    check_layout(out)
    data = path.read_bytes()
    rows = list(csv.reader(io.StringIO(data.decode(errors="replace"), newline="")))[1:]
    if (data and not data.endswith(b"\n")) or any(len(r) != len(RESULT_COLUMNS) for r in rows):
        line = 2 + next((i for i, r in enumerate(rows) if len(r) != len(RESULT_COLUMNS)), len(rows) - 1)
        raise UserError(f"{path} has a row cut short at line {line} (a crash or a full disk while "
                        "it was written); delete that line and run the grid again with --resume "
                        "to redo the run")
    keys = [tuple(r[RESULT_COLUMNS.index(c)] for c in KEY) for r in rows]
    if twice := [k for k, n in Counter(keys).items() if n > 1]:
        named = ", ".join("/".join(k) for k in twice[:3]) + (f" and {len(twice) - 3} more" * (len(twice) > 3))
        raise UserError(f"{path} holds {len(twice)} run(s) more than once ({named}; task/setting/"
                        "method/seed): two processes wrote this store; delete every row of those "
                        "runs and run the grid again with --resume to redo each once")
    return keys


def done_runs(out: Path) -> set[tuple[str, str, str, str]]:
    """(task, setting, method, seed) of every run the store holds a row of."""
    return set(check_rows(out))


def check_layout(out: Path) -> None:
    """A clear error for a results.csv that is not of the current layout."""
    path = Path(out) / RESULTS
    if path.exists():
        with open(path, newline="") as handle:
            header = next(csv.reader(handle), [])
        if header != RESULT_COLUMNS:
            missing = [c for c in RESULT_COLUMNS if c not in header]
            raise UserError(f"{path} is not of this version's layout (missing columns: "
                            f"{', '.join(missing) or 'none; other order'}); write a new store")


def read_tasks(out: Path) -> dict:
    """``tasks.json``: per task, ``options``, ``settings`` and ``methods`` (as run)."""
    path = Path(out) / TASKS
    return json.loads(path.read_text()) if path.is_file() else {}


def machine() -> dict:
    """This machine and software stack: CPU model, cores, torch and Python versions."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "system": platform.system()}


def record_task(out: Path, task: str, options: dict, settings: list[str], methods: list[str]) -> None:
    """Add a grid's task to ``tasks.json``: its options, its settings and method labels after
    those already recorded, and this machine (:func:`machine`) if it is a new one."""
    tasks = read_tasks(out)
    known = tasks.get(task, {})
    machines = known.get("machines", [])
    tasks[task] = {"options": json.loads(json.dumps(options, default=str)),
                   "settings": list(dict.fromkeys([*known.get("settings", []), *settings])),
                   "methods": list(dict.fromkeys([*known.get("methods", []), *methods])),
                   "machines": machines + ([machine()] if machine() not in machines else [])}
    atomic_write_text(Path(out) / TASKS, json.dumps(tasks, indent=2, sort_keys=True) + "\n")


def machines_text(out: Path) -> str:
    """Where a store's runs were made, as a sentence (from ``tasks.json``)."""
    seen = []
    for task in read_tasks(out).values():
        seen += [m for m in task.get("machines", []) if m not in seen]
    if not seen:
        return "Machine and software not recorded (a store from before they were)."
    return "Run on " + "; ".join(f"{m['cpu']} ({m['cores']} cores), torch {m['torch']}, Python "
                                 f"{m['python']}" for m in seen) + "."


def read_results(out: Path) -> pd.DataFrame:
    """The store's rows, tasks by name and, within a task, its settings and methods in the
    order they were run (``tasks.json``; names it does not list after, in the rows' order)."""
    path = Path(out) / RESULTS
    if not path.is_file():
        raise UserError(f"no results.csv in {out}; run an experiment first")
    check_rows(out)
    results = pd.read_csv(path)
    order = read_tasks(out)

    def ranks(column: str, key: str) -> list[int]:
        listed = {task: {name: i for i, name in enumerate(entry.get(key, []))}
                  for task, entry in order.items()}
        return [listed.get(t, {}).get(v, len(listed.get(t, {})))
                for t, v in zip(results.task, results[column], strict=True)]

    # stable sorts, the least significant first: method, then setting, then task
    ranked = results.assign(_method=ranks("method", "methods"), _setting=ranks("setting", "settings"))
    for column in ("_method", "_setting", "task"):
        ranked = ranked.sort_values(column, kind="stable")
    return ranked.drop(columns=["_method", "_setting"]).reset_index(drop=True)


def read_curves(out: Path) -> pd.DataFrame | None:
    """Every run's curves (the last copy of a run whose curves were appended twice)."""
    parts = []
    for path in curve_files(out):
        try:
            parts.append(pd.read_csv(path, compression="gzip"))
        except (EOFError, OSError, zlib.error, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise UserError(f"{path} is cut short or damaged ({exc}; a crash or a full disk while "
                            "a run's curves were appended): move it away to report without that "
                            "setting's curves (their plots), or run the setting again into a new "
                            "folder") from None
    if not parts:
        return None
    curves = pd.concat(parts, ignore_index=True)
    identity = ["task", "setting", "method", "seed", "epoch", "stage", "name"]
    return curves.drop_duplicates(identity, keep="last").reset_index(drop=True)
