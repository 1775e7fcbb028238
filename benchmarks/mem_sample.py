"""A command's resident memory over time, split into its own memory and mapped files (Linux).

    python benchmarks/mem_sample.py [--every 0.02] [--csv mem.csv] -- COMMAND [ARGS...]

Runs COMMAND and samples ``/proc/PID/status`` every ``--every`` seconds: ``RssAnon`` (the
process's own memory: tensors, heaps), ``RssFile`` (pages of mapped files: libraries, a
memory-mapped teacher cache) and ``VmRSS`` (their sum with shared memory). Prints the peak
of each and the split at the moment of the peak; ``--csv`` writes every sample (seconds,
GiB). Only the launched process is sampled: run Python directly (not under ``time``), and
with ``--jobs 1`` for a bench (workers are other processes).
"""

from __future__ import annotations

import argparse
import csv
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=0.02, help="seconds between samples")
    parser.add_argument("--csv", help="write every sample here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    start, rows = time.perf_counter(), []
    process = subprocess.Popen(command)
    while process.poll() is None:
        if (values := sample(process.pid)) is not None:
            rows.append({"seconds": time.perf_counter() - start, **values})
        time.sleep(args.every)
    if not rows:
        sys.exit(f"no samples (the command ended first); exit code {process.returncode}")
    peak = max(rows, key=lambda row: row["VmRSS"])
    print(f"{len(rows)} samples over {rows[-1]['seconds']:.0f} s; exit code {process.returncode}")
    print("peak " + ", ".join(f"{key} {max(row[key] for row in rows):.3f} GiB" for key in FIELDS))
    print(f"at the VmRSS peak ({peak['seconds']:.1f} s): RssAnon {peak['RssAnon']:.3f} GiB, "
          f"RssFile {peak['RssFile']:.3f} GiB")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["seconds", *FIELDS])
            writer.writeheader()
            writer.writerows({key: f"{value:.3f}" for key, value in row.items()} for row in rows)
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
