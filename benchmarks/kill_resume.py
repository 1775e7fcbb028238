"""Kill a TD run with SIGKILL while it trains, resume it, and check that every resumed run
ends exactly like the uninterrupted one (test metric, selected weights, per-epoch curves)
and trains only what was left.

    python benchmarks/kill_resume.py --data-dir ../shared/data/ml-100k [--kills 10]

Each trial starts ``talkingmodels run`` on a one-run config (TD, dense setting, seed 0, a
short epoch budget, no early stop), waits until the run's checkpoint holds a randomly drawn
epoch (1 to epochs - 2), waits a random part of one more epoch, and kills it with SIGKILL
(a trial where the run has already finished is reported as such, not counted). It then runs
the same command with ``--resume`` and a TensorBoard folder of its own: the steps and
epochs logged there are the ones trained after resuming, which must be exactly those the
checkpoint had left (a resume that silently started over would end alike, but train them
all again).
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from talkingmodels.store import read_curves

RUN_ID = "dense__td__0"


def command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "talkingmodels", "run", str(config), "--out", str(out)]


def outcome(out: Path) -> tuple:
    """What a finished run leaves: its results row, curves and selected student weights."""
    row = (out / "results.csv").read_text().splitlines()[1].split(",")
    keep = [row[i] for i in (5, 6, 8, 9)]  # value, val_value, best_epoch, epochs
    curves = read_curves(out).to_csv(index=False)
    weights = load_file(out / "students" / f"{RUN_ID}.safetensors")
    return keep, curves, weights


def same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[2].keys() == b[2].keys() and all(
        torch.equal(a[2][k], b[2][k]) for k in a[2])


def checkpoint_epoch(out: Path) -> int | None:
    """The last finished epoch in the run's checkpoint (None: no checkpoint yet)."""
    path = out / "checkpoints" / f"{RUN_ID}.pt"
    try:
        return torch.load(path, weights_only=False)["run"]["epoch"]
    except (OSError, EOFError, RuntimeError, KeyError):
        return None


def logged(folder: Path) -> tuple[int, int]:
    """(training steps, epochs) a run logged to its TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, epochs = set(), set()
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events)).Reload()
        tags = accumulator.Tags()["scalars"]
        if "step/loss_task" in tags:
            steps |= {e.step for e in accumulator.Scalars("step/loss_task")}
        epochs |= {e.step for tag in tags if tag.startswith("epoch/") for e in accumulator.Scalars(tag)}
    return len(steps), len(epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/ml-100k")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    config = work / "td.yaml"
    config.write_text(yaml.safe_dump({
        "task": "movielens", "settings": ["dense"], "seeds": [0], "methods": [{"name": "td"}],
        "train": {"epochs": args.epochs, "patience": args.epochs},
        "task_options": {"data_dir": str(Path(args.data_dir).resolve()),
                         "cache_dir": str(work / "cache")},
    }))
    subprocess.run(command(config, work / "warm"), check=True, capture_output=True)  # teacher
    start = time.perf_counter()
    subprocess.run([*command(config, work / "whole"), "--tensorboard", str(work / "tb-whole")],
                   check=True, capture_output=True)
    total = time.perf_counter() - start
    reference = outcome(work / "whole")
    steps, epochs = logged(work / "tb-whole")
    per_epoch = steps // epochs
    print(f"uninterrupted run: {total:.1f} s, test rmse {reference[0][0]}, {epochs} epochs of "
          f"{per_epoch} steps")

    rng = random.Random(args.seed)
    passed = valid = 0
    print("| trial | killed during epoch | resumed at epoch | epochs trained after resuming "
          "(expected) | steps trained after resuming (expected) | resumed run equals uninterrupted |")
    print("|---|---|---|---|---|---|")
    for trial in range(1, args.kills + 1):
        out = work / f"trial{trial}"
        target = rng.randint(1, epochs - 2)
        process = subprocess.Popen(command(config, out), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        while (checkpoint_epoch(out) or 0) < target and process.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.9) * total / epochs)  # into the next epoch
        still_training = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not still_training or (out / "results.csv").exists():
            print(f"| {trial} | - | - | - | - | the run finished before the kill: not counted |")
            continue
        valid += 1
        resumed_at = checkpoint_epoch(out) or 0
        subprocess.run([*command(config, out), "--resume", "--tensorboard", str(work / f"tb{trial}")],
                       check=True, capture_output=True)
        steps_after, epochs_after = logged(work / f"tb{trial}")
        want_epochs = epochs - resumed_at
        ok = (same(outcome(out), reference) and epochs_after == want_epochs
              and steps_after == want_epochs * per_epoch)
        passed += ok
        print(f"| {trial} | {resumed_at + 1} | {resumed_at} | {epochs_after} ({want_epochs}) | "
              f"{steps_after} ({want_epochs * per_epoch}) | {'yes' if ok else 'NO'} |")
    print(f"{passed} of {valid} runs killed while training resumed exactly, training only what was left")
    shutil.rmtree(work)
    sys.exit(0 if passed == valid == args.kills else 1)


if __name__ == "__main__":
    main()
