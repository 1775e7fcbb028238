"""Kill a TD run with SIGKILL at random points, resume it, and check that every resumed run
ends exactly like the uninterrupted one (test metric, selected weights, per-epoch curves).

    python benchmarks/kill_resume.py --data-dir ../shared/data/ml-100k [--kills 10]

Each trial starts ``talkingmodels run`` on a one-run config (TD, dense setting, seed 0, a
short epoch budget), kills it with SIGKILL after a random delay, then runs the same command
with ``--resume``, which continues from the run's last checkpoint.
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


def where_killed(out: Path) -> str:
    checkpoint = out / "checkpoints" / f"{RUN_ID}.pt"
    if (out / "results.csv").exists():
        return "after the run finished"
    if checkpoint.exists():
        epoch = torch.load(checkpoint, weights_only=False)["run"]["epoch"]
        return f"after epoch {epoch}"
    return "before the first checkpoint"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/ml-100k")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
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
    subprocess.run(command(config, work / "whole"), check=True, capture_output=True)
    total = time.perf_counter() - start
    reference = outcome(work / "whole")
    print(f"uninterrupted run: {total:.1f} s, test rmse {reference[0][0]}, "
          f"{reference[0][3]} epochs")

    rng = random.Random(args.seed)
    equal = 0
    print("| trial | killed at (s) | state when killed | resumed run equals uninterrupted |")
    print("|---|---|---|---|")
    for trial in range(1, args.kills + 1):
        out = work / f"trial{trial}"
        delay = rng.uniform(0.2 * total, 0.95 * total)
        process = subprocess.Popen(command(config, out), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        state = where_killed(out)
        subprocess.run([*command(config, out), "--resume"], check=True, capture_output=True)
        ok = same(outcome(out), reference)
        equal += ok
        print(f"| {trial} | {delay:.2f} | {state} | {'yes' if ok else 'NO'} |")
    print(f"{equal} of {args.kills} resumed runs equal the uninterrupted run")
    shutil.rmtree(work)
    sys.exit(0 if equal == args.kills else 1)


if __name__ == "__main__":
    main()
