"""Experiments: a validated config -> a grid of task settings x methods x seeds -> the
runs store -> the report.

The store, in the output folder (:mod:`talkingmodels.store`): ``results.csv`` (one row per
finished run), ``curves.csv.gz`` (per-epoch losses and validation metric),
``students/RUN.safetensors`` (the selected student's weights; ``talkingmodels export`` makes
a deployable file of them), ``tasks.json`` (each task's options, to rebuild its students)
and, while a run trains, ``checkpoints/RUN.pt``. A run's curves and weights are written first
and its results row last (one appended ``write``), so a grid that stops at any point keeps
every finished run, and a rerun only does what is missing (``force`` redoes everything). A run
interrupted midway continues from its checkpoint with ``resume``; without it, such a
checkpoint is an error rather than being silently reused or overwritten. A checkpoint also
holds its run's settings: resuming it under changed settings is an error.

Under a multi-process launcher (see :mod:`talkingmodels.distributed`) every process runs
the grid and only the main one writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from talkingmodels import analysis, distributed, store
from talkingmodels.config import validate
from talkingmodels.data import Split, as_loader, iterate
from talkingmodels.engine import (
    NumericalFault,
    TrainConfig,
    device_of,
    first_batch,
    fit,
    load_checkpoint,
    place,
    precompute_teacher,
    predict,
    seed_everything,
)
from talkingmodels.errors import UserError
from talkingmodels.export import TASKS_FILE, save_weights
from talkingmodels.io import atomic_write_text
from talkingmodels.methods import get_method, supports
from talkingmodels.states import ModelPair
from talkingmodels.tasks import Prepared, Task, get_task


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


@dataclass
class Experiment:
    """A config with every name resolved and every option validated."""

    config: ExperimentConfig
    task: Task
    settings: list[str]
    methods: list[tuple[str, type, object]]  # (label, class, validated method config)
    train: dict[str, TrainConfig]  # per setting
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
        options = validate(cls.Config, {**task.method_options.get(entry.name, {}), **entry.options},
                           f"methods[{index}] ({entry.name})")
        label = entry.label or entry.name
        if label in labels:
            raise UserError(f"methods[{index}]: label {label!r} is used twice; give each variant "
                            "its own 'label'")
        labels.add(label)
        methods.append((label, cls, options))
    # The task's defaults (per setting where they differ), under the config's own values.
    train = {s: validate(TrainConfig, {**task.default_train, **task.setting_train.get(s, {}),
                                       **config.train}, "train") for s in settings}
    for cfg in train.values():  # a device or precision this machine lacks: before any work
        distributed.check_precision(distributed.resolve_device(cfg.device), cfg.mixed_precision)
    return Experiment(config, task, settings, methods, train, config.seed_list())


def load_config(path: Path, overrides: dict | None = None, train: dict | None = None) -> Experiment:
    """Read, validate and resolve a YAML experiment; every mistake is one UserError line.
    ``overrides`` replace top-level keys, ``train`` values are set over the config's own."""
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
    if train:
        if not isinstance(data.get("train", {}), dict):
            raise UserError(f"config {path}: train must be a mapping of training options")
        data["train"] = {**data.get("train", {}), **train}
    return resolve(validate(ExperimentConfig, data, f"config {path}"))


# ------------------------------------------------------------------------------ running
def build_method(prepared: Prepared, cls: type, options, seed: int):
    """The student (identically initialised for every method of one seed) and the method,
    its own modules built from the training split's first rows (on the teacher's device)."""
    seed_everything(seed)
    student = prepared.build_student()
    teacher = copy.deepcopy(prepared.teacher) if options.unfreeze_teacher else prepared.teacher
    pair = ModelPair(student, teacher, prepared.student_layers, prepared.teacher_layers,
                     prepared.output, prepared.task_loss)
    method = cls(pair, options)
    device = device_of(teacher)
    place(method, device)
    method.setup(first_batch(as_loader(prepared.splits.train, 4, shuffle=False), 4).to(device))
    return method


def _high_water_mark(reset: bool = False) -> float:
    """This process's peak resident memory in GiB: on Linux the kernel's high-water mark
    (VmHWM), which ``reset`` sets back to the current size; elsewhere the peak so far
    (ru_maxrss: KiB on Linux, bytes on macOS), which cannot be set back."""
    status = Path("/proc/self/status")
    if status.is_file():
        line = next((x for x in status.read_text().splitlines() if x.startswith("VmHWM:")), None)
        if line is not None:
            peak = int(line.split()[1]) / 1024**2  # kB
            if reset:
                with contextlib.suppress(OSError):
                    Path("/proc/self/clear_refs").write_text("5")
            return peak
    import resource

    scale = 1024**3 if sys.platform == "darwin" else 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class PeakMemory:
    """The peak resident memory (``peak``, GiB) of this process over a block of code: a
    bench, one of its pieces, one run. The high-water mark is set back on entering, so that
    a block gets its own peak, not an earlier one's; blocks nest (an enclosing block keeps
    the peaks that its inner blocks set back)."""

    _open: list[PeakMemory] = []

    def __enter__(self) -> PeakMemory:
        self.peak = 0.0
        self._fold(reset=True)
        PeakMemory._open.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self._fold()
        PeakMemory._open.remove(self)

    @staticmethod
    def _fold(reset: bool = False) -> None:
        mark = _high_water_mark(reset)
        for block in PeakMemory._open:  # (on entering, only the enclosing blocks are open)
            block.peak = max(block.peak, mark)


def _check_output(out: Path) -> None:
    """The output folder exists (or can be made) and is a writable directory."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} is a file, not a directory")
    try:
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {out}: {exc.strerror}") from None
    distributed.barrier()
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output directory {out} is not writable")


def run_experiment(exp: Experiment, out: Path, force: bool = False, progress: bool = True,
                   resume: bool = False, tensorboard: Path | None = None) -> Path:
    """Run every (setting, method, seed) not yet in ``out/results.csv``; then the report.

    ``resume`` continues runs interrupted midway (their checkpoints); ``tensorboard`` is a
    folder for TensorBoard logs of every loss term per step and per epoch.
    """
    from talkingmodels.report import write_report

    _check_output(out)
    if tensorboard is not None and tensorboard.exists() and not tensorboard.is_dir():
        raise UserError(f"TensorBoard folder {tensorboard} is a file, not a directory")
    results = out / "results.csv"
    task = exp.task
    store.check_layout(out)
    done = set() if force else store.done_runs(out)
    grid = [(s, label, cls, opts, seed) for s in exp.settings for label, cls, opts in exp.methods
            for seed in exp.seeds if (task.name, s, label, str(seed)) not in done]
    interrupted = {path: (s, cls, options) for s, label, cls, options, seed in grid
                   if (path := out / "checkpoints" / f"{store.run_id_of(s, label, seed)}.pt").exists()}
    if interrupted and not (resume or force):
        raise UserError(f"{out} holds {len(interrupted)} interrupted run(s) ({next(iter(interrupted)).name}"
                        ", ...): add --resume to continue them, or --force to start over")
    if not force:  # verify them now, not after hours of other runs
        for path, (setting, cls, options) in interrupted.items():
            load_checkpoint(path, _fingerprint(exp, setting, cls, options))
    # Prepare every setting and build every method once before the first run, so a bad
    # layer name or missing data is reported before any work (and before the progress bar).
    # The main process goes first: it builds the caches the others then read.
    prepared: dict[str, Prepared] = {}
    with distributed.main_first():
        for setting in dict.fromkeys(s for s, *_ in grid):
            prepared[setting] = prep = task.prepare(setting)
            if isinstance(prep.splits.train, Split):  # (a task's own loaders run the teacher online)
                precompute_teacher(prep.teacher, prep.splits.train, prep.teacher_layers or ())
            for _, cls, options in exp.methods:
                if supports(cls, prep.output):  # (the others get an n/a row, not a run)
                    build_method(prep, cls, options, seed=0)
    if force and distributed.is_main():  # only now: a config mistake must not cost old results
        for path in (results, out / store.CURVES, *out.glob("students/*.safetensors"),
                     *out.glob("checkpoints/*.pt")):
            path.unlink(missing_ok=True)
    distributed.barrier()
    if distributed.is_main():
        _record_task_options(out, exp)
    bar = tqdm(total=len(grid), desc=f"{task.name}", unit="run",
               disable=not (progress and distributed.is_main()))
    teacher_test: dict[str, object] = {}  # per setting: the teacher's pooled test states at h
    try:
        for setting, label, cls, options, seed in grid:
            _run_one(exp, prepared[setting], label, cls, options, seed, out, bar, tensorboard,
                     teacher_test)
    finally:
        bar.close()
    distributed.barrier()
    return write_report(out) if distributed.is_main() else out / "report.md"


def _metric_cells(task: Task) -> dict:
    """The metric of a results row: its name and direction, and the class names of a
    classification task (the report reads them from the store)."""
    names = json.dumps(list(task.class_names)) if task.class_names else ""
    return {"metric": task.metric.name, "higher_is_better": task.metric.higher_is_better,
            "class_names": names}


def _record_task_options(out: Path, exp: Experiment) -> None:
    """Keep each task's options in the store (``tasks.json``): what ``talkingmodels export``
    needs to rebuild a run's student."""
    path = out / TASKS_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    recorded[exp.task.name] = json.loads(json.dumps(exp.config.task_options, default=str))
    atomic_write_text(path, json.dumps(recorded, indent=2, sort_keys=True) + "\n")


def _fingerprint(exp: Experiment, setting: str, cls: type, options) -> dict:
    """What a checkpoint must agree with to be resumed: everything that shapes its run."""
    return {"task": exp.config.task_options, "train": exp.train[setting].model_dump(),
            "method": {"name": cls.name, **options.model_dump(mode="json")}}


class _TensorBoard:
    """Per-step loss terms and per-epoch losses and metrics of one run, as TensorBoard
    scalars. The writer opens at the first step, dropping any events a killed earlier
    attempt logged from that step on (so a resumed run's curves have no duplicates)."""

    def __init__(self, folder: Path | None):
        self.folder, self.writer = folder, None

    def _open(self, step: int):
        if self.writer is None and self.folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder), purge_step=step)
        return self.writer

    def step(self, step: int, terms: dict) -> None:
        if (writer := self._open(step)) is not None:
            for name, value in terms.items():
                writer.add_scalar(f"step/loss_{name}", value, step)

    def epoch(self, row: dict) -> None:
        if (writer := self._open(row["epoch"])) is not None:
            for name, value in row.items():
                if name not in ("epoch", "stage"):
                    writer.add_scalar(f"epoch/{name}", value, row["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def representation(prep: Prepared, student, teacher_test: dict, batch_size: int) -> dict:
    """What the report says about a trained student besides its metric: linear CKA between
    its state at ``h`` and the teacher's on the test split (pooled per example), and for
    classification the same per class and the per-class test accuracy, as JSON cells."""
    test = prep.splits.test
    if not isinstance(test, Split):  # a task's own loader: its examples in order, as tensors
        test = Split.from_batches(iterate(as_loader(test, batch_size, shuffle=False), batch_size))
    row = {}
    if prep.student_layers and prep.teacher_layers:  # (a task may name no layers)
        if prep.setting not in teacher_test:
            teacher_test[prep.setting] = analysis.pooled_states(
                prep.teacher, prep.teacher_layers[1], test, "teacher", batch_size)
        mine = analysis.pooled_states(student, prep.student_layers[1], test, "student", batch_size)
        row["cka"] = f"{analysis.linear_cka(mine, teacher_test[prep.setting]):.6f}"
        if prep.output == "classification":
            cell = {c: None if math.isnan(v) else round(v, 6) for c, v in analysis.per_class_cka(
                mine, teacher_test[prep.setting], test.target).items()}
            row["cka_classes"] = json.dumps(cell)
    if prep.output == "classification":
        accuracy = analysis.class_accuracy(predict(student, test, batch_size), test.target)
        row["class_metric"] = json.dumps({c: round(v, 6) for c, v in accuracy.items()})
    return row


def _run_one(exp: Experiment, prep: Prepared, label: str, cls: type, options, seed: int,
             out: Path, bar, tensorboard: Path | None, teacher_test: dict) -> None:
    """Train one (setting, method, seed) and append its rows to the runs store."""
    task, train = exp.task, exp.train[prep.setting]
    where = f"{prep.setting} {label} seed {seed}"
    bar.set_postfix_str(where, refresh=False)
    key = {"task": task.name, "setting": prep.setting, "method": label, "seed": seed}
    if not supports(cls, prep.output):  # e.g. a class-distribution method on ratings
        bar.update()
        if distributed.is_main():
            store.append_results(out, [{
                **key, **_metric_cells(task), "value": "nan", "val_value": "nan",
                "teacher_value": f"{prep.teacher_metric:.6f}", "method_name": cls.name,
                "status": f"n/a: needs {' or '.join(cls.outputs)} outputs"}])
        return
    method = build_method(prep, cls, options, seed)
    run_id = store.run_id_of(prep.setting, label, seed)
    board = _TensorBoard(tensorboard / run_id if tensorboard and distributed.is_main() else None)

    def on_epoch(row):
        board.epoch(row)
        bar.set_postfix_str(f"{where} epoch {row['epoch']} "
                            f"val {row[f'val_{task.metric.name}']:.4f}", refresh=False)

    checkpoint = out / "checkpoints" / f"{run_id}.pt"
    try:
        with PeakMemory() as memory:  # this run's own peak, not an earlier run's
            result = fit(method, prep.splits, task.metric, train, seed, on_epoch, checkpoint,
                         on_step=board.step if board.folder else None,
                         fingerprint=_fingerprint(exp, prep.setting, cls, options), distribute=True)
    except NumericalFault as fault:
        # Recorded as failed (the report shows it); the last good checkpoint stays on disk.
        board.close()
        bar.update()
        if not distributed.is_main():
            return
        tqdm.write(f"run {prep.setting} {label} seed {seed} failed: {fault}", file=sys.stderr)
        store.append_results(out, [{
            **key, **_metric_cells(task), "value": "nan", "val_value": "nan",
            "teacher_value": f"{prep.teacher_metric:.6f}", "method_name": cls.name,
            "extra_params": method.extra_parameter_count(), "status": f"failed: {fault}"}])
        return
    board.close()
    bar.update()
    if not distributed.is_main():
        return
    curve_rows = [{**key, "epoch": row["epoch"], "stage": row["stage"], "name": name, "value": value}
                  for row in result.history for name, value in row.items()
                  if name not in ("epoch", "stage")]
    store.append_curves(out, curve_rows)
    save_weights(method.student, out / "students" / f"{run_id}.safetensors")
    store.append_results(out, [{
        **key, **_metric_cells(task), "value": f"{result.test:.6f}",
        "val_value": f"{result.val:.6f}", "teacher_value": f"{prep.teacher_metric:.6f}",
        "best_epoch": result.best_epoch, "epochs": result.epochs,
        "seconds": f"{result.seconds:.2f}", "peak_gib": f"{memory.peak:.3f}",
        "extra_params": method.extra_parameter_count(), "method_name": cls.name, "status": "ok",
        # (in batches small enough for a large teacher's activations)
        **representation(prep, method.student, teacher_test, min(train.eval_batch_size, 512)),
    }])
    checkpoint.unlink(missing_ok=True)  # the run is in the store now
