"""Where TD's training step spends its time, per task.

    python benchmarks/td_profile.py [--tasks movielens,vision,text] [--steps 30] [--threads 2]
        [--data-dir DIR] [--ops 8]

For each task (its first bench setting, the task's batch size, teacher states cached), in
one process: the median of ``steps`` timed steps (after warm-up) of

- ``logit-kd``: the student's forward and backward, the optimiser step, the KD term;
- ``td``: the same plus TD's channel and its interpretation step;
- the interpretation step alone: the teacher's layers ``l+1..h`` (``taps.run_between``) run
  forward on a batch-shaped state and backward to that state, as TD's gradient needs it;
- the teacher's forward over those layers without autograd (what no gradient would cost).

``td - logit-kd - interpretation`` is then the channel (encoders, decoders, losses) and
its share of the optimiser step. With ``--ops N`` the N aten operators with the most self
time in TD's step are printed too (torch.profiler).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch


def median_ms(fn, steps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def profile_task(name: str, args) -> dict:
    from talkingmodels import taps
    from talkingmodels.engine import TrainStep, make_optimizer, train_step
    from talkingmodels.experiments import ExperimentConfig, build_method, resolve, validate

    options = {"data_dir": args.data_dir} if args.data_dir and name == "movielens" else {}
    exp = resolve(validate(ExperimentConfig, {
        "task": name, "task_options": options, "seeds": 1,
        "methods": [{"name": "logit-kd"}, {"name": "td"}]}, "td_profile"))
    setting = exp.settings[0]
    prepared = exp.task.prepare(setting)
    cfg = exp.train[setting]
    order = torch.Generator().manual_seed(0)
    shuffled = prepared.splits.train.batches(cfg.batch_size, order)
    batches = itertools.cycle(list(itertools.islice(shuffled, 50)))
    row = {"task": f"{name} ({setting})", "batch": cfg.batch_size}
    for label, cls, method_options in exp.methods:
        method = build_method(prepared, cls, method_options, seed=0)
        method.train()
        step, optimizer = TrainStep(method), make_optimizer(method.learnable_parameters(), cfg)
        row[label] = median_ms(lambda: train_step(step, next(batches), optimizer), args.steps)  # noqa: B023
        if label == "td" and args.ops:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    train_step(step, next(batches), optimizer)
            row["ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops)
    teacher, (low, high) = prepared.teacher, prepared.teacher_layers
    batch = next(batches)
    state = batch.teacher_cache[low].clone()

    def interpret(grad: bool):
        heard = state.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = taps.run_between(teacher, low, high, heard, *batch.teacher_inputs)
        if grad:
            out.sum().backward()

    row["interpretation"] = median_ms(lambda: interpret(True), args.steps)
    row["interpretation (forward only)"] = median_ms(lambda: interpret(False), args.steps)
    row["channel and rest"] = row["td"] - row["logit-kd"] - row["interpretation"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="movielens,vision,text")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", help="MovieLens-100K folder")
    parser.add_argument("--ops", type=int, default=0, help="print TD's top N operators")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [profile_task(name, args) for name in args.tasks.split(",")]
    print(f"median ms per step, {args.threads} threads, torch {torch.__version__}")
    print("| task | batch | logit-kd step | td step | td / logit-kd | interpretation (fwd+bwd) "
          "| interpretation (fwd, no grad) | channel and rest |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['batch']} | {r['logit-kd']:.2f} | {r['td']:.2f} | "
              f"{r['td'] / r['logit-kd']:.2f} | {r['interpretation']:.2f} "
              f"({100 * r['interpretation'] / r['td']:.0f}% of td) | "
              f"{r['interpretation (forward only)']:.2f} | {r['channel and rest']:.2f} |")
    for r in rows:
        if "ops" in r:
            print(f"\n{r['task']}: td's operators with the most self time (10 steps)\n{r['ops']}")


if __name__ == "__main__":
    main()
