"""logit-kd and TD training steps on a GPU, in fp32 and bf16, against the CPU.

    python benchmarks/gpu_check.py [--tasks vision,text,lm] [--methods logit-kd,td]
        [--precisions no,bf16] [--device cuda] [--compare 3] [--warmup 5] [--steps 30]

For each task (its first bench setting, prepared as the bench prepares it: the frozen
teacher's states cached) and method, the method is built with seed 0 and trained on the same
fixed batches:

- on the CPU in fp32: the reference losses of the first ``compare`` steps;
- on ``--device`` in each precision (``no`` = fp32, ``bf16`` = autocast): the same first
  steps from the same initial weights, and the largest relative difference of a step's
  summed loss from the CPU's; then ``warmup`` steps, and ``steps`` steps timed one by one
  (the device synchronised around each): the median step time, samples per second and the
  peak GPU memory (``torch.cuda.max_memory_allocated``, reset before the precision's run).

A fp32 GPU step differs from the CPU's by floating-point order (and TF32 convolutions, which
PyTorch enables by default in cuDNN); bf16 autocast by bf16 rounding. Prints one Markdown
table. Exits with code 2, printing why, where the device does not exist. ``--device cpu``
runs the same comparison on the CPU (a check of the script itself).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch


def first_losses(method, batches, optimizer, acc, device, count: int) -> list[float]:
    from talkingmodels.engine import TrainStep, train_step

    step, losses = TrainStep(method), []
    for batch in batches[:count]:
        terms = train_step(step, batch.to(device), optimizer, acc)
        losses.append(float(sum(terms.values())))
    return losses


def check(task_name: str, method_name: str, args) -> list[dict]:
    from talkingmodels import distributed
    from talkingmodels.config import ExperimentConfig, resolve, validate
    from talkingmodels.engine import TrainStep, make_optimizer, place, train_step
    from talkingmodels.inference import precompute_teacher
    from talkingmodels.runner import build_method

    exp = resolve(validate(ExperimentConfig, {"task": task_name, "methods": [{"name": method_name}],
                                              "seeds": 1}, "gpu_check"))
    setting = exp.settings[0]
    prepared = exp.task.prepare(setting)
    precompute_teacher(prepared.teacher, prepared.splits.train, prepared.teacher_layers)
    cfg = exp.train[setting]
    _, cls, options = exp.methods[0]
    order = torch.Generator().manual_seed(0)
    batches = list(itertools.islice(prepared.splits.train.batches(cfg.batch_size, order),
                                    max(args.compare, args.warmup + args.steps)))

    def fresh(device):
        method = build_method(prepared, cls, options, seed=0)
        place(method, torch.device(device))
        method.train()
        return method, make_optimizer(method.learnable_parameters(), cfg)

    cpu_method, cpu_optimizer = fresh("cpu")
    reference = first_losses(cpu_method, batches, cpu_optimizer, distributed.accelerator("cpu"),
                             "cpu", args.compare)
    rows = []
    for precision in args.precisions.split(","):
        acc = distributed.accelerator(args.device, precision)
        device = acc.device
        method, optimizer = fresh(device)
        losses = first_losses(method, batches, optimizer, acc, device, args.compare)
        gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference, strict=True))
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step = TrainStep(method)
        times = []
        for index, batch in enumerate(itertools.islice(itertools.cycle(batches), args.warmup + args.steps)):
            batch = batch.to(device)
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            train_step(step, batch, optimizer, acc)
            if cuda:
                torch.cuda.synchronize(device)
            if index >= args.warmup:
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows.append({"task": f"{task_name} ({setting})", "method": method_name, "precision": precision,
                     "device": str(device), "batch": cfg.batch_size,
                     "first_losses": " ".join(f"{v:.5f}" for v in losses),
                     "cpu_losses": " ".join(f"{v:.5f}" for v in reference), "max_rel_diff": gap,
                     "step_ms": 1000 * median, "samples_per_s": cfg.batch_size / median,
                     "peak_gib": torch.cuda.max_memory_allocated(device) / 1024**3 if cuda else float("nan")})
        print(f"  {rows[-1]['task']} {method_name} {precision}: {rows[-1]['step_ms']:.1f} ms/step, "
              f"first losses within {gap:.2e} of the CPU's", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="vision,text,lm")
    parser.add_argument("--methods", default="logit-kd,td")
    parser.add_argument("--precisions", default="no,bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compare", type=int, default=3, help="first steps compared with the CPU")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    from talkingmodels import distributed
    from talkingmodels.errors import UserError

    try:
        distributed.resolve_device(args.device)
        rows = [row for task in args.tasks.split(",") for method in args.methods.split(",")
                for row in check(task, method, args)]
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(f"{name}, torch {torch.__version__}; first {args.compare} steps against the CPU (fp32), "
          f"median of {args.steps} steps after {args.warmup} warm-up steps")
    print("| task (setting) | method | precision | batch | max rel. diff of first losses | step (ms) "
          "| samples/s | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['method']} | {r['precision']} | {r['batch']} | {r['max_rel_diff']:.2e} "
              f"| {r['step_ms']:.1f} | {r['samples_per_s']:.0f} | {r['peak_gib']:.2f} |".replace("nan", "-"))


if __name__ == "__main__":
    main()
