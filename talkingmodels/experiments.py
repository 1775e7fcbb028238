"""Experiments: a validated config -> a grid of task settings x methods x seeds -> the
runs store -> the report.

The store, in the output folder: ``results.csv`` (one row per finished run),
``curves/RUN.csv`` (per-epoch losses and validation metric), ``students/RUN.pt`` (the
selected student's weights) and, while a run trains, ``checkpoints/RUN.pt``. A run's
curves and weights are written atomically first and its results row last, so a grid that
stops at any point keeps every finished run, resumes an interrupted one from its last
epoch, and a rerun only does what is missing (``force`` redoes everything).
"""

from __future__ import annotations

import copy
import csv
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tqdm.auto import tqdm

from talkingmodels.engine import (
    NumericalFault,
    TrainConfig,
    fit,
    precompute_teacher,
    seed_everything,
)
from talkingmodels.errors import UserError
from talkingmodels.io import atomic_save, atomic_write_text
from talkingmodels.methods import ModelPair, get_method
from talkingmodels.tasks import Prepared, Task, get_task

RESULT_COLUMNS = ["task", "setting", "method", "seed", "metric", "value", "val_value",
                  "teacher_value", "best_epoch", "epochs", "seconds", "extra_params", "method_name",
                  "status"]
CURVE_COLUMNS = ["task", "setting", "method", "seed", "epoch", "stage", "name", "value"]


class MethodEntry(BaseModel):
    """One method of the grid: a registered name, an optional label (to run variants of
    one method side by side) and that method's own options."""

    model_config = ConfigDict(extra="allow")
    name: str
    label: str | None = None

    @property
    def options(self) -> dict:
        return dict(self.model_extra or {})


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    settings: list[str] | None = Field(None, min_length=1, description="default: the task's own")
    task_options: dict = Field(default_factory=dict)
    methods: list[MethodEntry] | None = Field(None, min_length=1, description="default: the task's")
    seeds: int | list[int] = Field(3, description="a count (0..N-1) or an explicit list")
    train: dict = Field(default_factory=dict, description="TrainConfig values over the task's")
    out: Path | None = None

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("seeds must be at least 1")
        if isinstance(value, list) and not value:
            raise ValueError("seeds must not be empty")
        return value

    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


def describe(error: ValidationError, where: str, model: type[BaseModel] | None = None) -> str:
    """One line for the first problem pydantic found, naming the valid keys on a typo."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden" and model is not None:
        valid = ", ".join(model.model_fields)
        return f"{where}: unknown key {loc!r}; valid keys: {valid}"
    return f"{where}: {loc}: {first['msg']} (got {first.get('input')!r})"


def validate(model: type[BaseModel], data, where: str):
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise UserError(describe(error, where, model)) from None


@dataclass
class Experiment:
    """A config with every name resolved and every option validated."""

    config: ExperimentConfig
    task: Task
    settings: list[str]
    methods: list[tuple[str, type, object]]  # (label, class, validated method config)
    train: TrainConfig
    seeds: list[int]


def resolve(config: ExperimentConfig) -> Experiment:
    task_cls = get_task(config.task)
    task = task_cls(validate(task_cls.Config, config.task_options, f"task_options ({config.task})"))
    settings = [task.check_setting(s) for s in (config.settings or task.default_settings)]
    entries = config.methods or [MethodEntry(name=label.split(":")[0], label=label, **opts)
                                 for label, opts in task.default_methods.items()]
    methods, labels = [], set()
    for index, entry in enumerate(entries):
        cls = get_method(entry.name)
        options = validate(cls.Config, entry.options, f"methods[{index}] ({entry.name})")
        label = entry.label or entry.name
        if label in labels:
            raise UserError(f"methods[{index}]: label {label!r} is used twice; give each variant "
                            "its own 'label'")
        labels.add(label)
        methods.append((label, cls, options))
    train = validate(TrainConfig, {**task.default_train, **config.train}, "train")
    return Experiment(config, task, settings, methods, train, config.seed_list())


def load_config(path: Path, overrides: dict | None = None) -> Experiment:
    """Read, validate and resolve a YAML experiment; every mistake is one UserError line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a YAML mapping with at least a 'task' key")
    data.update(overrides or {})
    return resolve(validate(ExperimentConfig, data, f"config {path}"))


# ------------------------------------------------------------------------------ running
def build_method(prepared: Prepared, cls: type, options, seed: int):
    """The student (identically initialised for every method of one seed) and the method."""
    seed_everything(seed)
    student = prepared.build_student()
    teacher = copy.deepcopy(prepared.teacher) if options.unfreeze_teacher else prepared.teacher
    pair = ModelPair(student, teacher, prepared.student_layers, prepared.teacher_layers,
                     prepared.output, prepared.task_loss)
    example = prepared.splits.train.batch(slice(0, 4))
    return cls(pair, options, example)


def _csv_text(columns: list[str], rows: list[dict], header: bool = True) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _append(path: Path, columns: list[str], rows: list[dict]) -> None:
    # One write of a few hundred bytes in append mode: the row lands whole or not at all.
    text = _csv_text(columns, rows, header=not path.exists())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _done(path: Path) -> set[tuple[str, str, str, str]]:
    if not path.exists():
        return set()
    with open(path, newline="") as handle:
        return {(r["task"], r["setting"], r["method"], r["seed"]) for r in csv.DictReader(handle)
                if None not in r.values()}  # a row cut short by a crash does not count


def _upgrade(path: Path) -> None:
    """Rewrite a results.csv of an older layout (fewer columns) in the current one."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        columns = reader.fieldnames or []
    if columns != RESULT_COLUMNS:
        rows = [{**{"status": "ok"}, **{k: v for k, v in r.items() if k in RESULT_COLUMNS}}
                for r in rows if None not in r.values()]
        atomic_write_text(path, _csv_text(RESULT_COLUMNS, rows))


def run_experiment(exp: Experiment, out: Path, force: bool = False, progress: bool = True) -> Path:
    """Run every (setting, method, seed) not yet in ``out/results.csv``; then the report."""
    from talkingmodels.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise UserError(f"output directory {out} is not writable")
    results = out / "results.csv"
    if force:
        for path in (results, out / "curves.csv", *out.glob("curves/*.csv"),
                     *out.glob("students/*.pt"), *out.glob("checkpoints/*.pt")):
            path.unlink(missing_ok=True)
    _upgrade(results)
    done = _done(results)
    task = exp.task
    grid = [(s, label, cls, opts, seed) for s in exp.settings for label, cls, opts in exp.methods
            for seed in exp.seeds if (task.name, s, label, str(seed)) not in done]
    # Prepare every setting and build every method once before the first run, so a bad
    # layer name or missing data is reported before any work (and before the progress bar).
    prepared: dict[str, Prepared] = {}
    for setting in dict.fromkeys(s for s, *_ in grid):
        prepared[setting] = prep = task.prepare(setting)
        precompute_teacher(prep.teacher, prep.splits.train, prep.teacher_layers)
        for _, cls, options in exp.methods:
            build_method(prep, cls, options, seed=0)
    bar = tqdm(total=len(grid), desc=f"{task.name}", unit="run", disable=not progress)
    try:
        for setting, label, cls, options, seed in grid:
            _run_one(task, prepared[setting], label, cls, options, seed, exp.train, out, bar)
    finally:
        bar.close()
    return write_report(out)


def _run_one(task: Task, prep: Prepared, label: str, cls: type, options, seed: int,
             train: TrainConfig, out: Path, bar) -> None:
    """Train one (setting, method, seed) and append its rows to the runs store."""
    where = f"{prep.setting} {label} seed {seed}"
    bar.set_postfix_str(where, refresh=False)
    method = build_method(prep, cls, options, seed)

    def on_epoch(row):
        bar.set_postfix_str(f"{where} epoch {row['epoch']} "
                            f"val {row[f'val_{task.metric.name}']:.4f}", refresh=False)

    # A run interrupted midway continues from its last epoch when the grid is run again.
    run_id = re.sub(r"[^\w.=+-]", "_", f"{prep.setting}__{label}__{seed}")  # a safe file name
    checkpoint = out / "checkpoints" / f"{run_id}.pt"
    key = {"task": task.name, "setting": prep.setting, "method": label, "seed": seed}
    try:
        result = fit(method, prep.splits, task.metric, train, seed, on_epoch, checkpoint)
    except NumericalFault as fault:
        # Recorded as failed (the report shows it); the last good checkpoint stays on disk.
        tqdm.write(f"run {prep.setting} {label} seed {seed} failed: {fault}", file=sys.stderr)
        _append(out / "results.csv", RESULT_COLUMNS, [{
            **key, "metric": task.metric.name, "value": "nan", "val_value": "nan",
            "teacher_value": f"{prep.teacher_metric:.6f}", "method_name": cls.name,
            "extra_params": method.extra_parameter_count(), "status": f"failed: {fault}"}])
        bar.update()
        return
    curve_rows = [{**key, "epoch": row["epoch"], "stage": row["stage"], "name": name, "value": value}
                  for row in result.history for name, value in row.items()
                  if name not in ("epoch", "stage")]
    atomic_write_text(out / "curves" / f"{run_id}.csv", _csv_text(CURVE_COLUMNS, curve_rows))
    atomic_save(method.student.state_dict(), out / "students" / f"{run_id}.pt")
    _append(out / "results.csv", RESULT_COLUMNS, [{
        **key, "metric": task.metric.name, "value": f"{result.test:.6f}",
        "val_value": f"{result.val:.6f}", "teacher_value": f"{prep.teacher_metric:.6f}",
        "best_epoch": result.best_epoch, "epochs": result.epochs,
        "seconds": f"{result.seconds:.2f}", "extra_params": method.extra_parameter_count(),
        "method_name": cls.name, "status": "ok",
    }])
    checkpoint.unlink()  # the run is in the store now
    bar.update()
