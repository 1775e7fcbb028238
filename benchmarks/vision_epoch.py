"""What the teacher-state cache saves on the vision task, and what TD costs over logit-kd.

    python benchmarks/vision_epoch.py [--setting fashion] [--threads 2]

Times one training epoch (the default batch size, after a few warm-up steps) of
``logit-kd`` with the cached teacher, of ``logit-kd`` computing the teacher online (its
states and probe logits for every batch), and of ``td`` with the cache (it still runs the
teacher's layers between l and h: the interpretation step). Each case runs in its own
process, so its peak resident memory is its own. The teacher cache must exist (any
``talkingmodels bench vision`` run builds it; else the first case does).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = {"logit-kd (cached teacher)": ("logit-kd", True), "logit-kd (teacher online)": ("logit-kd", False),
         "td (cached teacher)": ("td", True)}


def worker(method_name: str, cached: bool, setting: str, threads: int) -> dict:
    import itertools

    import torch

    from talkingmodels.engine import make_optimizer
    from talkingmodels.methods import METHODS
    from talkingmodels.runner import build_method
    from talkingmodels.tasks.vision import FashionVision, VisionConfig

    torch.set_num_threads(threads)
    task = FashionVision(VisionConfig())
    prep = task.prepare(setting)
    if not cached:
        prep.splits.train.teacher_cache = {}
    cls = METHODS[method_name]
    method = build_method(prep, cls, cls.Config(), seed=0)
    batch_size = task.default_train["batch_size"]
    optimizer = make_optimizer(method.learnable_parameters(), task_train(task))
    method.train()

    def steps(batches):
        for batch in batches:
            _, terms = method.forward_train(batch)
            optimizer.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            optimizer.step()

    order = torch.Generator().manual_seed(0)
    steps(itertools.islice(prep.splits.train.batches(batch_size, order), 5))  # warm-up
    start = time.perf_counter()
    steps(prep.splits.train.batches(batch_size, order))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(prep.splits.train),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def task_train(task):
    from talkingmodels.engine import TrainConfig

    return TrainConfig(**task.default_train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="fashion")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, cached = CASES[args.worker]
        print(json.dumps(worker(name, cached, args.setting, args.threads)))
        return
    rows = {}
    for case in CASES:
        done = subprocess.run([sys.executable, __file__, "--worker", case, "--setting", args.setting,
                               "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        rows[case] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"setting {args.setting}, {rows[next(iter(CASES))]['images']} training images, "
          f"{args.threads} threads")
    print("| case | epoch (s) | images/s | peak memory (MiB) |")
    print("|---|---|---|---|")
    for case, row in rows.items():
        rate = row["images"] / row["seconds"]
        print(f"| {case} | {row['seconds']:.1f} | {rate:.0f} | {row['peak_mib']:.0f} |")
    cached, online, td = (rows[c]["seconds"] for c in CASES)
    print(f"teacher online / cached (logit-kd): {online / cached:.2f}x")
    print(f"td / logit-kd (both cached): {td / cached:.2f}x")


if __name__ == "__main__":
    main()
