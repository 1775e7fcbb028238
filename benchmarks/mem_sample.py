"""A command's resident memory over time, split into its own memory and mapped files (Linux).

    python benchmarks/mem_sample.py [--every 0.02] [--tree] [--csv mem.csv] -- COMMAND [ARGS...]

Runs COMMAND and samples ``/proc/PID/status`` every ``--every`` seconds: ``RssAnon`` (the
process's own memory: tensors, heaps), ``RssFile`` (pages of mapped files: libraries, a
memory-mapped teacher cache) and ``VmRSS`` (their sum with shared memory). Prints the peak
of each and the split at the moment of the peak; ``--csv`` writes every sample (seconds,
GiB). Only the launched process is sampled: run Python directly (not under ``time``), and
with ``--jobs 1`` for a bench (workers are other processes). ``--tree`` samples the process
and all its descendants (a bench's ``--jobs`` workers) and sums each field over them, with
``Pss`` (``/proc/PID/smaps_rollup``: each page shared by n processes counted 1/n in each, so
the sum is the memory the tree holds); the peak is then the summed ``Pss``'s.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time

FIELDS = ("RssAnon", "RssFile", "VmRSS")


def sample(pid: int) -> dict[str, float] | None:
    """The process's resident memory by kind, GiB (None once it is gone)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in FIELDS:
                    values[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    except OSError:
        return None
    return values if len(values) == len(FIELDS) else None


def tree(root: int) -> list[int]:
    """``root`` and its descendants, from every process's parent in ``/proc/PID/stat``."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        found.append(pid := todo.pop())
        todo += children.get(pid, [])
    return found


def pss(pid: int) -> float:
    """The process's proportional set size, GiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return next((int(line.split()[1]) / 2**20 for line in rollup if line.startswith("Pss:")), 0.0)
    except OSError:
        return 0.0


def sample_tree(root: int) -> dict[str, float] | None:
    """Each field summed over ``root`` and its descendants, with their summed ``Pss``."""
    pids = tree(root)
    found = [values for pid in pids if (values := sample(pid)) is not None]
    if not found:
        return None
    return {**{key: sum(v[key] for v in found) for key in FIELDS}, "Pss": sum(map(pss, pids))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=0.02, help="seconds between samples")
    parser.add_argument("--csv", help="write every sample here")
    parser.add_argument("--tree", action="store_true", help="the process and its descendants, summed")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    fields, by = (*FIELDS, "Pss") if args.tree else FIELDS, "Pss" if args.tree else "VmRSS"
    start, rows = time.perf_counter(), []
    process = subprocess.Popen(command)
    while process.poll() is None:
        if (values := (sample_tree if args.tree else sample)(process.pid)) is not None:
            rows.append({"seconds": time.perf_counter() - start, **values})
        time.sleep(args.every)
    if not rows:
        sys.exit(f"no samples (the command ended first); exit code {process.returncode}")
    peak = max(rows, key=lambda row: row[by])
    print(f"{len(rows)} samples over {rows[-1]['seconds']:.0f} s; exit code {process.returncode}")
    print("peak " + ", ".join(f"{key} {max(row[key] for row in rows):.3f} GiB" for key in fields))
    print(f"at the {by} peak ({peak['seconds']:.1f} s): RssAnon {peak['RssAnon']:.3f} GiB, "
          f"RssFile {peak['RssFile']:.3f} GiB")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["seconds", *fields])
            writer.writeheader()
            writer.writerows({key: f"{value:.3f}" for key, value in row.items()} for row in rows)
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
