"""What a training step and an epoch cost, per task and method.

    python benchmarks/step_time.py [--tasks movielens,vision,text] [--methods td,logit-kd,...]
        [--warmup 5] [--epochs 2] [--threads 2] [--csv step_time.csv]
        [--data-dir DIR]

For each task (on its first bench setting, or ``--setting TASK=SETTING``) and method, in a
process of its own (so that its peak resident memory is its own): the task is prepared as the
bench prepares it (teacher states cached), the method built with its default options and
the task's training defaults (batch size, learning rate), and then

- ``warmup`` steps are run and discarded, then every step of ``epochs`` epochs is timed one
  by one (each: the batch drawn from the training split, the method's forward, the summed
  loss's backward, the optimiser step; the engine's own ``train_step``), and their median is
  reported;
- ``epochs`` whole passes over the training split (the engine's ``train_epoch``, the loop
  ``talkingmodels run`` uses, validation excluded) are timed, and their median reported.

Printed as a Markdown table, with the ratios of every method's median step to logit-kd's
and scratch's on the same task, and written as CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

TASKS = ("movielens", "vision", "text")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def worker(task: str, setting: str | None, method: str, args) -> dict:
    import itertools

    import torch

    from talkingmodels.config import ExperimentConfig, resolve, validate
    from talkingmodels.engine import TrainStep, make_optimizer, train_epoch, train_step
    from talkingmodels.inference import precompute_teacher
    from talkingmodels.runner import build_method

    torch.set_num_threads(args.threads)
    options = {"data_dir": args.data_dir} if args.data_dir and task == "movielens" else {}
    exp = resolve(validate(ExperimentConfig, {
        "task": task, "settings": [setting] if setting else None, "task_options": options,
        "methods": [{"name": method}], "seeds": 1}, "step_time"))
    setting = exp.settings[0]
    prepared = exp.task.prepare(setting)
    # as the bench does: the frozen teacher's states and outputs computed once
    precompute_teacher(prepared.teacher, prepared.splits.train, prepared.teacher_layers)
    cfg = exp.train[setting]
    _, cls, method_options = exp.methods[0]
    distiller = build_method(prepared, cls, method_options, seed=0)
    distiller.train()
    step = TrainStep(distiller)
    optimizer = make_optimizer(distiller.learnable_parameters(), cfg)
    train = prepared.splits.train
    order = torch.Generator().manual_seed(0)

    def endless():
        while True:
            yield from train.batches(cfg.batch_size, order)

    batches = endless()
    for batch in itertools.islice(batches, args.warmup):
        train_step(step, batch, optimizer)
    # Every step of `epochs` whole epochs timed one by one: a median over whole epochs does
    # not depend on which batches were drawn (text batches differ in length).
    times = []
    for batch in itertools.islice(batches, args.epochs * math.ceil(len(train) / cfg.batch_size)):
        start = time.perf_counter()
        train_step(step, batch, optimizer)
        times.append(time.perf_counter() - start)
    epochs = []
    run = {"epoch": 0}
    for _ in range(args.epochs):
        start = time.perf_counter()
        train_epoch(distiller, step, prepared.splits.train, cfg, optimizer, order, run, "main")
        epochs.append(time.perf_counter() - start)
    return {"task": task, "setting": setting, "method": method, "batch_size": cfg.batch_size,
            "train_examples": len(train), "step_ms": 1000 * statistics.median(times),
            "epoch_s": statistics.median(epochs),
            "samples_per_s": cfg.batch_size / statistics.median(times),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default="scratch,logit-kd,feature-kd,fitnet,hybrid,td")
    parser.add_argument("--setting", action="append", default=[], metavar="TASK=SETTING",
                        help="the setting to time a task on (default: its first bench setting)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", help="MovieLens-100K folder (as for talkingmodels bench)")
    parser.add_argument("--csv", default="step_time.csv")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        task, setting, method = args.worker
        print(json.dumps(worker(task, setting or None, method, args)))
        return
    settings = dict(s.split("=", 1) for s in args.setting)
    rows = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            command = [sys.executable, __file__, "--worker", task, settings.get(task, ""), method,
                       "--warmup", str(args.warmup),
                       "--epochs", str(args.epochs), "--threads", str(args.threads)]
            if args.data_dir:
                command += ["--data-dir", args.data_dir]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{task}/{method} failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {task}/{method}: {rows[-1]['step_ms']:.1f} ms/step", file=sys.stderr)
    for row in rows:
        same = {r["method"]: r["step_ms"] for r in rows if r["task"] == row["task"]}
        row["vs_logit_kd"] = row["step_ms"] / same["logit-kd"] if "logit-kd" in same else None
        row["vs_scratch"] = row["step_ms"] / same["scratch"] if "scratch" in same else None
    print(f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} threads, torch "
          f"{__import__('torch').__version__}; median of the steps of {args.epochs} epochs after "
          f"{args.warmup} warm-up steps; median of {args.epochs} epochs")
    print("| task (setting) | method | batch | step (ms) | x logit-kd | x scratch | samples/s "
          "| epoch (s) | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    def ratio(value):
        return f"{value:.2f}" if value is not None else "-"

    for r in rows:
        print(f"| {r['task']} ({r['setting']}) | {r['method']} | {r['batch_size']} | {r['step_ms']:.1f} "
              f"| {ratio(r['vs_logit_kd'])} | {ratio(r['vs_scratch'])} | {r['samples_per_s']:.0f} "
              f"| {r['epoch_s']:.2f} | {r['peak_mib']:.0f} |")
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
