"""Our ``gkd`` against TRL's ``GKDTrainer`` (off-policy), side by side in one run.

    python benchmarks/peer_lm.py [--setting tweets-300] [--steps 20] [--warmup 2]
        [--batch-size 8] [--beta 0.5] [--lr 3e-3] [--threads 2] [--csv FILE]
        [--cache-dir DIR] [--limit N]

TRL (``pip install -c constraints.txt -e ".[peer-lm]"``, pinned at 1.16.0) is the peer. The
lm task is prepared as the bench prepares it, on ``--setting``: the frozen SmolLM2-135M-Instruct
teacher (float32) and the task's default student (seed 0), on the setting's training texts.
Each side runs in a process of its own (so that each peak memory is its own), with the same
thread count:

- **Ours**: the ``gkd`` method with ``beta`` and ``supervised: false`` (the divergence alone,
  as TRL trains), the teacher live on every batch (no cache: TRL runs its teacher every step),
  stepped by the engine's ``train_step`` with ``make_optimizer`` (Adam, constant ``lr``).
- **Peer**: ``trl.experimental.gkd.GKDTrainer`` with ``GKDConfig(lmbda=0.0, beta, seq_kd=False,
  use_cpu=True, bf16=False, report_to=[], optim="adamw_torch", weight_decay=0.0, lr_scheduler_type=
  "constant", train_sampling_strategy="sequential")`` (AdamW without weight decay is Adam),
  ``trainer.train()`` for the same steps. (TRL's trainer configs default to ``bf16=True``, bf16
  autocast even on a CPU: without ``bf16=False`` its first loss differs from ours by 3e-4, its
  logits being bf16 products.) Its data are the same texts, each its real tokens
  only, batched by a collator that right-pads them as our split batches them (padding past a
  batch's longest text dropped, labels -100 there).

Both sides see the same batches in the same order (the split's first texts, in order) from
the same initial student. The first step's losses are compared (relative difference at most
``TOLERANCE``), and each side's tokens per second over the steps after ``warmup`` (real
tokens of the batches over the wall time between the end of the last warm-up step and the
end of the last step), the ratio ours / peer (above 1: ours is faster; the goal is at least
1.0), and each process's peak resident memory. The script exits with code 1 when the first
losses differ.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

TOLERANCE = 1e-5


def prepared(args):
    from talkingmodels.config import ExperimentConfig, resolve, validate

    options = {"download": False, **({"cache_dir": args.cache_dir} if args.cache_dir else {}),
               **({"limit": args.limit} if args.limit else {})}
    config = {"task": "lm", "settings": [args.setting], "task_options": options, "methods": [{"name": "gkd"}]}
    exp = resolve(validate(ExperimentConfig, config, "peer_lm"))
    return exp.task, exp.task.prepare(args.setting)


def batches(prep, args) -> list:
    """The first (warmup + steps) batches of the training split, in order, without a cache."""
    split = prep.splits.train
    split.teacher_cache = {}
    wanted = args.warmup + args.steps
    found = list(split.batches(args.batch_size))[:wanted]
    if len(found) < wanted:
        raise SystemExit(f"{args.setting} has {len(found)} batches of {args.batch_size}; fewer steps, please")
    return found


def tokens_of(batch) -> int:
    return int(batch.student_kwargs["attention_mask"].sum())


def run_ours(args) -> dict:
    from talkingmodels.engine import TrainConfig, TrainStep, make_optimizer, seed_everything, train_step
    from talkingmodels.methods import get_method
    from talkingmodels.states import ModelPair

    _, prep = prepared(args)
    data = batches(prep, args)
    seed_everything(0)
    student = prep.build_student()
    cls = get_method("gkd")
    method = cls(ModelPair(student, prep.teacher, None, None, "causal-lm", prep.task_loss),
                 cls.Config(beta=args.beta, supervised=False))
    method.setup(data[0])
    method.train()
    optimizer = make_optimizer(method.learnable_parameters(), TrainConfig(lr=args.lr))
    step, losses, ends = TrainStep(method), [], []
    for batch in data:
        terms = train_step(step, batch, optimizer)
        losses.append(float(terms["gkd"]))
        ends.append(time.perf_counter())
    return {"losses": losses, "ends": ends, "tokens": [tokens_of(b) for b in data]}


def run_peer(args) -> dict:
    import datasets
    import transformers
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from talkingmodels.engine import seed_everything

    task, prep = prepared(args)
    data = batches(prep, args)
    rows = []
    for batch in data:
        ids, mask = batch.student_kwargs["input_ids"], batch.student_kwargs["attention_mask"]
        for i in range(len(ids)):
            n = int(mask[i].sum())
            rows.append({"input_ids": ids[i, :n].tolist(), "labels": batch.target[i, :n].tolist()})

    def collate(examples):  # right-padded to the batch's longest text, as our split batches it
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.zeros(len(examples), width, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros(len(examples), width, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n], labels[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    seed_everything(0)
    student = prep.build_student()
    tokenizer = task.teacher()[1]  # (GKDTrainer reads its pad token)
    losses, ends = [], []

    class Recorder(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            ends.append(time.perf_counter())

    config = GKDConfig(output_dir=str(Path(args.work) / "trl"), lmbda=0.0, beta=args.beta, seq_kd=False,
                       use_cpu=True, bf16=False, report_to=[], optim="adamw_torch", weight_decay=0.0,
                       lr_scheduler_type="constant", learning_rate=args.lr, max_steps=len(data),
                       per_device_train_batch_size=args.batch_size, train_sampling_strategy="sequential",
                       save_strategy="no", logging_steps=10**6, dataloader_num_workers=0,
                       disable_dropout=True, max_length=None, seed=0, disable_tqdm=True)
    trainer = Recorder(model=student, teacher_model=prep.teacher, args=config, data_collator=collate,
                       train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                       callbacks=[Clock()])
    trainer.train()
    return {"losses": losses, "ends": ends, "tokens": [tokens_of(b) for b in data]}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    result = (run_ours if args.side == "ours" else run_peer)(args)
    result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result))


def tokens_per_second(result: dict, warmup: int) -> float:
    ends, tokens = result["ends"], result["tokens"]
    return sum(tokens[warmup:]) / (ends[-1] - ends[warmup - 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", default="tweets-300")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, help="task_options.limit (quick trials)")
    parser.add_argument("--cache-dir", help="task_options.cache_dir")
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--side", choices=("ours", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--work", default="runs/peer-lm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the clock starts at the end of a warm-up step)")
    if args.side:
        child(args)
        return 0
    results = {}
    for side in ("ours", "peer"):
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--side", side]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"the {side} side failed (exit code {done.returncode})")
        results[side] = json.loads(lines[-1].removeprefix("RESULT "))
    ours, peer = results["ours"], results["peer"]
    first = (ours["losses"][0], peer["losses"][0])
    gap = abs(first[0] - first[1]) / abs(first[1])
    speed = {side: tokens_per_second(r, args.warmup) for side, r in results.items()}
    row = {"setting": args.setting, "steps": args.steps, "batch_size": args.batch_size, "beta": args.beta,
           "threads": args.threads, "first_loss_ours": f"{first[0]:.7f}",
           "first_loss_peer": f"{first[1]:.7f}",
           "first_loss_gap": f"{gap:.2e}", "tokens_per_s_ours": f"{speed['ours']:.1f}",
           "tokens_per_s_peer": f"{speed['peer']:.1f}", "ratio": f"{speed['ours'] / speed['peer']:.3f}",
           "peak_gib_ours": f"{ours['peak_gib']:.2f}", "peak_gib_peer": f"{peer['peak_gib']:.2f}",
           "last_loss_ours": f"{ours['losses'][-1]:.5f}", "last_loss_peer": f"{peer['losses'][-1]:.5f}"}
    for key, value in row.items():
        print(f"{key:18} {value}")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, list(row))
            writer.writeheader()
            writer.writerow(row)
    if gap > TOLERANCE:
        print(f"first losses differ by {gap:.2e} (more than {TOLERANCE})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
