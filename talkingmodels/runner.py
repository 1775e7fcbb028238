"""Grids of settings x methods x seeds: each run trained and appended to the runs store
(:mod:`talkingmodels.store`), then the report.

A rerun only does what is missing (``force`` redoes everything). A run interrupted midway
continues from its checkpoint with ``resume``; without it, such a checkpoint is an error
rather than being silently reused or overwritten. A checkpoint also holds its run's
settings: resuming it under changed settings is an error.

Under a multi-process launcher (see :mod:`talkingmodels.distributed`) every process runs
the grid and only the main one writes.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from talkingmodels import analysis, distributed, store
from talkingmodels.checkpoint import load_checkpoint
from talkingmodels.config import Experiment, ExperimentConfig, resolve
from talkingmodels.data import as_loader, iterate
from talkingmodels.engine import (
    NumericalFault,
    first_batch,
    fit,
    place,
    seed_everything,
)
from talkingmodels.errors import UserError
from talkingmodels.export import save_weights
from talkingmodels.inference import device_of, precompute_teacher, predict
from talkingmodels.methods import not_applicable
from talkingmodels.probes import PeakMemory, TensorBoardLog, release_memory
from talkingmodels.splits import Split
from talkingmodels.states import ModelPair
from talkingmodels.tasks import Prepared


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


def _classes(exp: Experiment) -> int | None:
    """The number of classes of the experiment's task (None: not a classification task)."""
    names = getattr(exp.task, "class_names", None)
    return len(names) if names else None


def _prepare(exp: Experiment, setting: str) -> Prepared:
    """A setting of the experiment's task, the frozen teacher's states cached on its
    in-memory training split (a task's own loaders run the teacher online)."""
    prep = exp.task.prepare(setting)
    if isinstance(prep.splits.train, Split):
        precompute_teacher(prep.teacher, prep.splits.train, prep.teacher_layers or ())
    return prep


def _check_output(out: Path) -> None:
    """The output folder exists (or can be made) and is a writable directory."""
    if distributed.is_main():
        store.make_folder(out)
    distributed.barrier()


def run_experiment(exp: Experiment, out: Path, force: bool = False, progress: bool = True,
                   resume: bool = False, tensorboard: Path | None = None, jobs: int | None = 1,
                   threads: int | None = None) -> Path:
    """Run every (setting, method, seed) not yet in ``out/results.csv``; then the report.

    ``resume`` continues runs interrupted midway (their checkpoints); ``tensorboard`` is a
    folder for TensorBoard logs of every loss term per step and per epoch. ``jobs`` > 1
    trains independent runs in that many worker processes, each with ``threads`` threads
    (default: the cores shared out); this process alone writes the store, in the grid's
    order, so the store is the one a serial run with as many threads writes. ``jobs=None``
    picks for the task: for tasks whose models are tiny (``Task.tiny_models``) as many jobs
    as cores, one thread each (a tiny model gains nothing from a second thread, and spread
    over every core each run stalls whenever another process is busy); else one job.
    """
    if jobs is None:
        tiny = getattr(exp.task, "tiny_models", False) and not distributed.launched()
        jobs = (os.cpu_count() or 1) if tiny else 1
        threads = 1 if tiny and threads is None else threads
    if jobs < 1 or (threads is not None and threads < 1):
        raise UserError(f"--jobs and --threads must be at least 1 (got {jobs} and {threads})")
    if jobs > 1 and distributed.launched():
        raise UserError("--jobs runs worker processes of its own: not under a multi-process launcher")
    if threads is not None:
        torch.set_num_threads(threads)
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
            # (no local name for it: the runs let each setting go, see _serial)
            prepared[setting] = _prepare(exp, setting)
            for _, cls, options in exp.methods:
                if not_applicable(cls, options, prepared[setting].output, _classes(exp)) is None:
                    build_method(prepared[setting], cls, options, seed=0)  # (else n/a)
    if force and distributed.is_main():  # only now: a config mistake must not cost old results
        for path in (results, *store.curve_files(out), *out.glob("students/*.safetensors"),
                     *out.glob("checkpoints/*.pt")):
            path.unlink(missing_ok=True)
    distributed.barrier()
    if distributed.is_main():
        store.record_task(out, exp.task.name, exp.config.task_options, exp.settings,
                          [label for label, _, _ in exp.methods])
        _teacher_samples(exp, prepared, out)
    bar = tqdm(total=len(grid), desc=f"{task.name}", unit="run",
               disable=not (progress and distributed.is_main()))
    try:
        if min(jobs, len(grid)) > 1:
            prepared.clear()  # (the workers prepare their own)
            exp.task.release()  # (and load their own teacher: this one would be a third copy)
            release_memory()
            outcomes = _in_workers(exp, grid, out, tensorboard, min(jobs, len(grid)), threads)
        else:
            outcomes = _serial(exp, grid, prepared, out, tensorboard, bar)
        for outcome in outcomes:  # (in the grid's order, whichever process trained them)
            # a bench's peak memory is its largest process's, a worker's included
            PeakMemory.include(outcome.get("worker_peak", 0.0))
            bar.update()
            if distributed.is_main():
                _write(out, outcome)
    finally:
        bar.close()
    distributed.barrier()
    return write_report(out) if distributed.is_main() else out / "report.md"


def _teacher_samples(exp: Experiment, prepared: dict[str, Prepared], out: Path) -> None:
    """The frozen teacher's completions of the task's prompts, once per setting in a store
    (for a task that generates text)."""
    have = store.read_samples(out)
    for setting, prep in prepared.items():
        key = {"task": exp.task.name, "setting": setting, "method": store.TEACHER, "seed": ""}
        if tuple(key.values()) not in have and (samples := exp.task.samples(prep.teacher)):
            store.append_samples(out, key, samples)


def _serial(exp: Experiment, grid: list, prepared: dict[str, Prepared], out: Path,
            tensorboard: Path | None, bar):
    """The grid's outcomes from this process, a setting at a time (the grid holds each
    setting's runs together). A setting's data is let go after its last run: the pages of
    its memory-mapped teacher cache that training read stay resident while it is held (on
    text, tweets' 0.24 GiB stayed through every movies run)."""
    for setting, runs in itertools.groupby(grid, key=lambda run: run[0]):
        prep, teacher_test = prepared.pop(setting), {}  # (the teacher's pooled test states)
        for _, label, cls, options, seed in runs:
            yield _run_one(exp, prep, label, cls, options, seed, out, tensorboard, teacher_test, bar)
            release_memory()
        del prep, teacher_test
        release_memory()


_WORKER: dict = {}  # a worker process's experiment and prepared settings


def _start_worker(config: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(exp=resolve(ExperimentConfig.model_validate(config)), prepared={}, teacher_test={})


def _work(setting: str, label: str, seed: int, out: Path, tensorboard: Path | None) -> dict:
    """One run in a worker process (its settings prepared once per worker, from the caches
    the main process built)."""
    exp = _WORKER["exp"]
    with PeakMemory() as worker:  # (preparing included: the main process reports it)
        if setting not in _WORKER["prepared"]:
            # runs reach the workers in the grid's order, a setting's together: a worker done
            # with one setting lets it go (see _serial)
            _WORKER["prepared"].clear()
            _WORKER["teacher_test"].clear()
            release_memory()
            _WORKER["prepared"][setting] = _prepare(exp, setting)
        _, cls, options = next(m for m in exp.methods if m[0] == label)
        outcome = _run_one(exp, _WORKER["prepared"][setting], label, cls, options, seed, out,
                           tensorboard, _WORKER["teacher_test"])
        release_memory()  # (as a serial run does after each run)
    return {**outcome, "worker_peak": worker.peak}


def _in_workers(exp: Experiment, grid: list, out: Path, tensorboard: Path | None, jobs: int,
                threads: int | None):
    """The grid's outcomes, in its order, from ``jobs`` worker processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    config = exp.config.model_dump(mode="json", by_alias=True)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker, initargs=(config, threads)) as pool:
        futures = [pool.submit(_work, s, label, seed, out, tensorboard)
                   for s, label, _, _, seed in grid]
        for future in futures:
            yield future.result()


def _fingerprint(exp: Experiment, setting: str, cls: type, options) -> dict:
    """What a checkpoint must agree with to be resumed: everything that shapes its run."""
    return {"task": exp.config.task_options, "train": exp.train[setting].model_dump(),
            "method": {"name": cls.name, **options.model_dump(mode="json")}}


TEACHER_BATCH = 64


def representation(prep: Prepared, student, teacher_test: dict, batch_size: int) -> dict:
    """What the report says about a trained student besides its metric: linear CKA between
    its state at ``h`` and the teacher's on the test split (pooled per example), and for
    classification the same per class and the per-class test and validation accuracy (the
    report chooses classes on validation and scores them on test), as JSON cells."""
    def as_split(data):  # a task's own loader: its examples in order, as tensors
        if isinstance(data, Split):
            return data
        return Split.from_batches(iterate(as_loader(data, batch_size, shuffle=False), batch_size))

    test = as_split(prep.splits.test)
    row = {}
    if prep.student_layers and prep.teacher_layers:  # (a task may name no layers)
        if prep.setting not in teacher_test:
            # (in batches of at most 64: a large teacher's activations on 512 sentences were
            # the text bench's peak memory, 0.45 GiB above training's)
            teacher_test[prep.setting] = analysis.pooled_states(
                prep.teacher, prep.teacher_layers[1], test, "teacher", min(batch_size, TEACHER_BATCH))
        mine = analysis.pooled_states(student, prep.student_layers[1], test, "student", batch_size)
        row["cka"] = f"{analysis.linear_cka(mine, teacher_test[prep.setting]):.6f}"
        if prep.output == "classification":
            cell = {c: None if math.isnan(v) else round(v, 6) for c, v in analysis.per_class_cka(
                mine, teacher_test[prep.setting], test.target).items()}
            row["cka_classes"] = json.dumps(cell)
    if prep.output == "classification":
        for column, split in (("class_metric", test), ("class_metric_val", as_split(prep.splits.val))):
            accuracy = analysis.class_accuracy(predict(student, split, batch_size), split.target)
            row[column] = json.dumps({c: round(v, 6) for c, v in accuracy.items()})
    return row


def _run_one(exp: Experiment, prep: Prepared, label: str, cls: type, options, seed: int,
             out: Path, tensorboard: Path | None, teacher_test: dict, bar=None) -> dict:
    """Train one (setting, method, seed): what the store gets of it (:func:`_write`), as a
    picklable dict (a worker process hands it to the main one)."""
    task, train = exp.task, exp.train[prep.setting]
    where = f"{prep.setting} {label} seed {seed}"
    if bar is not None:
        bar.set_postfix_str(where, refresh=False)
    key = {"task": task.name, "setting": prep.setting, "method": label, "seed": seed}
    run_id = store.run_id_of(prep.setting, label, seed)
    outcome = {"key": key, "run_id": run_id, "where": where}

    def row(status: str, **cells) -> dict:  # this run's results row
        return store.result_row(key, task.metric, prep.teacher_metric, cls.name, status,
                                task.class_names, **cells)

    if reason := not_applicable(cls, options, prep.output, _classes(exp)):
        return {**outcome, "row": row(f"n/a: {reason}")}  # e.g. class distributions on ratings
    method = build_method(prep, cls, options, seed)
    board = TensorBoardLog(tensorboard / run_id if tensorboard and distributed.is_main() else None)

    def on_epoch(epoch_row):
        board.epoch(epoch_row)
        if bar is not None:
            bar.set_postfix_str(f"{where} epoch {epoch_row['epoch']} "
                                f"val {epoch_row[f'val_{task.metric.name}']:.4f}", refresh=False)

    try:
        with PeakMemory() as memory:  # this run's own peak, not an earlier run's
            result = fit(method, prep.splits, task.metric, train, seed, on_epoch,
                         out / "checkpoints" / f"{run_id}.pt",
                         on_step=board.step if board.folder else None,
                         fingerprint=_fingerprint(exp, prep.setting, cls, options), distribute=True)
    except NumericalFault as fault:
        # Recorded as failed (the report shows it); the last good checkpoint stays on disk.
        board.close()
        return {**outcome, "failed": str(fault),
                "row": row(f"failed: {fault}", extra_params=method.extra_parameter_count())}
    board.close()
    if not distributed.is_main():
        return outcome
    curves = [{**key, "epoch": r["epoch"], "stage": r["stage"], "name": name, "value": value}
              for r in result.history for name, value in r.items() if name not in ("epoch", "stage")]
    # The weights are a file of their own (written atomically, before the run's row); the
    # rows go to the main process, which alone appends to the store's shared files.
    save_weights(method.student, out / "students" / f"{run_id}.safetensors")
    samples = task.samples(method.student)  # (a task that generates text: its prompts' completions)
    return {**outcome, "curves": curves, **({"samples": samples} if samples else {}),
            "row": row("ok", value=f"{result.test:.6f}", val_value=f"{result.val:.6f}",
                       best_epoch=result.best_epoch, epochs=result.epochs,
                       seconds=f"{result.seconds:.2f}", peak_gib=f"{memory.peak:.3f}",
                       extra_params=method.extra_parameter_count(),
                       # (in batches small enough for a large teacher's activations)
                       **representation(prep, method.student, teacher_test,
                                        min(train.eval_batch_size, 512)))}


def _write(out: Path, outcome: dict) -> None:
    """Append one run to the store (main process): its curves first, its row last."""
    if "failed" in outcome:
        tqdm.write(f"run {outcome['where']} failed: {outcome['failed']}", file=sys.stderr)
    if "row" not in outcome:  # (a process of a launcher that does not write)
        return
    if "curves" in outcome:
        store.append_curves(out, outcome["curves"])
    if "samples" in outcome:
        store.append_samples(out, outcome["key"], outcome["samples"])
    store.append_results(out, [outcome["row"]])
    if "curves" in outcome:
        (out / "checkpoints" / f"{outcome['run_id']}.pt").unlink(missing_ok=True)  # in the store now
