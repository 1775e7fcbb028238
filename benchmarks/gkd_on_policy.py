"""What on-policy data costs ``gkd``: its training step off-policy (``lmbda`` 0, the teacher's
top-k cache) against on-policy (``lmbda`` 1: the student samples, the teacher runs live).

    python benchmarks/gkd_on_policy.py [--setting tweets-300] [--steps 8] [--warmup 2]
        [--batch-size 16] [--threads 1]

The lm task is prepared as the bench prepares it; each side starts from the same student
(seed 0) and steps through the split's first batches with the engine's ``train_step``. Prints
each side's mean step time over the steps after ``warmup`` and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="tweets-300")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from talkingmodels.config import ExperimentConfig, resolve, validate
    from talkingmodels.engine import TrainConfig, TrainStep, make_optimizer, seed_everything, train_step
    from talkingmodels.methods import get_method
    from talkingmodels.states import ModelPair

    config = {"task": "lm", "settings": [args.setting], "methods": [{"name": "gkd"}]}
    exp = resolve(validate(ExperimentConfig, config, "gkd_on_policy"))
    prep = exp.task.prepare(args.setting)
    data = list(prep.splits.train.batches(args.batch_size))[: args.warmup + args.steps]
    cls, seconds = get_method("gkd"), {}
    for lmbda in (0.0, 1.0):
        seed_everything(0)
        method = cls(ModelPair(prep.build_student(), prep.teacher, None, None, "causal-lm", prep.task_loss),
                     cls.Config(beta=0.5, lmbda=lmbda))
        method.setup(data[0])
        method.train()
        optimizer = make_optimizer(method.learnable_parameters(), TrainConfig(lr=3e-3))
        step, times = TrainStep(method), []
        for batch in data:
            start = time.perf_counter()
            train_step(step, batch, optimizer)
            times.append(time.perf_counter() - start)
        seconds[lmbda] = sum(times[args.warmup:]) / len(times[args.warmup:])
        print(f"lmbda {lmbda:g}: {seconds[lmbda]:.3f} s a step (batch {args.batch_size}, "
              f"{args.threads} thread(s), mean of steps {args.warmup + 1}-{len(data)})")
    print(f"on-policy / off-policy: {seconds[1.0] / seconds[0.0]:.1f}x")


if __name__ == "__main__":
    main()
