"""Our ``logit-kd`` step against torchdistill's KD step, side by side in one run.

    python benchmarks/peer_kd.py [--tasks vision,text] [--setting TASK=SETTING]
        [--teacher cached|online] [--steps 200] [--warmup 10] [--block 2] [--threads 1]
        [--csv FILE] [--data-dir [TASK=]DIR]

torchdistill (an optional benchmark dependency: ``pip install -c constraints.txt -e ".[peer]"``,
pinned at 1.1.5) is the peer. For each task, in one process:

- The task is prepared as the bench prepares it (``resolve(validate(ExperimentConfig, ...))``,
  ``task.prepare``, ``precompute_teacher``), on its first bench setting or ``--setting``.
- **Ours**: the ``logit-kd`` method with the task's options for it (``weight`` w0,
  ``temperature`` T), built by ``build_method`` (seed 0), stepped by the engine's own
  ``train_step`` (the method's forward, the summed loss's backward, the optimiser step) with
  ``make_optimizer`` and the task's training defaults (optimiser, learning rate, weight decay,
  batch size).
- **Peer**: torchdistill's own single-stage ``DistillationBox``, driven through its
  forward/backward/step path exactly as torchdistill's example scripts drive it
  (``pre_epoch_process``, then per batch ``forward_process`` and ``post_forward_process``:
  backward, ``optimizer.step``, ``zero_grad``), with no dataset config (``dataset_dict={}``;
  the batches are handed in). Its criterion is ``WeightedSumLoss`` over one term, their
  ``KDLoss`` (``losses/mid_level.py``) on the models' outputs (module path ``.``); its
  optimiser is built by the box from the same key and keyword arguments as ours (Adam or
  AdamW, ``lr``, ``weight_decay``, ``foreach=True``). The student is a second one built
  with the same seed (its initial weights are checked equal to ours), the teacher the same
  frozen module. Inputs go through torchdistill's built-in forward processes
  (``forward_batch_only`` for one image tensor, ``forward_batch_only_as_kwargs`` for the
  text models' ``input_ids`` and ``attention_mask``).

The loss is the same function on both sides. Ours: ``CE(s, y) + w0 * T^2 *
KL(softmax(t/T) || softmax(s/T))`` (KL summed over classes, mean over the batch:
``reduction="batchmean"``). torchdistill's ``KDLoss``: ``alpha * CE(s, y) + beta * T^2 *
KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T))``, so ``alpha = 1``, ``beta = w0``,
``temperature = T``, ``reduction = "batchmean"`` (its cross-entropy then takes the mean, as
ours). Beware: ``KDLoss`` multiplies by ``T^2`` only when ``alpha`` is non-zero and targets
are given (with ``alpha`` 0 or None it returns the bare KL), so the mapping must keep
``alpha = 1``. The first step's losses of both sides are compared (relative difference at
most ``TOLERANCE`` = 1e-6; they differ only in rounding: ours takes the KL against the
teacher's log-probabilities, ``log_target=True``, torchdistill against its probabilities);
the script exits with code 1 if they differ by more.

``--teacher cached``: the frozen teacher's outputs come from the training split's teacher
cache, as the bench trains; our method reads them from the batch (``batch.teacher_cache``),
and torchdistill's box gets the same rows through its ``supp_dict`` and a teacher forward
process registered with its ``register_forward_proc_func`` that returns them (the box still
calls it under ``no_grad``, as it calls a frozen teacher). ``--teacher online``: the cache
is emptied and both sides run the teacher on every batch (ours in ``teacher_states``, the
box in ``get_teacher_output``).

Timing: both sides draw the same batches in the same order (the task's training split, its
batch size, an order generator seeded 0; each side its own copy of the stream), and each
keeps its own torch RNG state (the text student's dropout), so both train the same student
the same way. ``warmup`` steps of each are run first (the first of them gives the first-step
losses), then ``steps`` steps of each in blocks of ``block`` steps, alternating ours and the
peer (ours first in even rounds, the peer first in odd ones) so that the machine's noise
hits both alike (with blocks of 10 steps instead of 2, a busy machine once moved the ratio on
vision online to 0.88; with blocks of 2 the same run gave 1.00). A block's batches are drawn
before its clock starts. samples/s of a block is its examples over its wall time; the median
over blocks is reported per side, and the ratio ours / peer (above 1: ours is faster).

MovieLens is left out: its student predicts a rating (regression), and ``logit-kd`` there is
an MSE to the teacher's prediction; torchdistill's ``KDLoss`` is a softmax over class logits,
which has no meaning for one rating, so there is no peer step to compare with.

torchvision: torchdistill imports it (its model zoo), and PyPI's torchvision wheels are
built against CUDA torch. Next to the CPU build of torch (this project's pin) their C++
operators cannot load, and torchvision 0.28's import then fails on an unguarded
``register_fake("torchvision::nms")`` (and ``qnms``). When (and only when) that library does
not load, this script declares the schemas of those two operators, without kernels, before
importing torchdistill, so that the import works; nothing on torchdistill's KD path calls a
torchvision operator.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import itertools
import math
import os
import statistics
import sys
import time
from pathlib import Path

TASKS = ("vision", "text")
TOLERANCE = 1e-6  # relative difference allowed between the first-step losses
COLUMNS = ("task", "setting", "teacher", "ours_samples_per_s", "peer_samples_per_s", "ratio",
           "first_loss_ours", "first_loss_peer")
INSTALL = 'pip install -c constraints.txt -e ".[peer]"'
CACHED_PROC = "talkingmodels_cached_teacher_output"
_torchvision_schemas = None  # see _declare_torchvision_ops


def cpu_model() -> str:
    """step_time.py's CPU name (one definition for every benchmark script)."""
    spec = importlib.util.spec_from_file_location("step_time", Path(__file__).with_name("step_time.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cpu_model()


def _declare_torchvision_ops() -> None:
    """Let torchvision import where its C++ operators cannot load (see the docstring)."""
    global _torchvision_schemas
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or _torchvision_schemas is not None:
        return
    import torch

    library = next(Path(spec.origin).parent.glob("_C*.so"), None)
    try:
        if library is not None:
            torch.ops.load_library(str(library))
            return  # the real operators are there
    except (OSError, RuntimeError):
        pass
    _torchvision_schemas = torch.library.Library("torchvision", "DEF")  # alive as long as this
    for name in ("nms", "qnms"):
        _torchvision_schemas.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def import_torchdistill():
    """The torchdistill package, or None when it is not installed."""
    if importlib.util.find_spec("torchdistill") is None:
        return None
    _declare_torchvision_ops()
    import torchdistill
    from torchdistill.core.interfaces.registry import register_forward_proc_func

    @register_forward_proc_func(key=CACHED_PROC)
    def cached_teacher_output(model, sample_batch, targets=None, supp_dict=None, **kwargs):
        """The frozen teacher's output for the batch, read from the cache (``supp_dict``)."""
        return supp_dict["teacher_output"]

    return torchdistill


class Side:
    """One training loop (ours or the peer's): its step, its own copy of the batch stream
    and its own torch RNG state."""

    def __init__(self, name: str, step, batches, rng_state):
        self.name, self.step, self.batches, self.rng = name, step, batches, rng_state
        self.first_loss: float | None = None
        self.rates: list[float] = []

    def run(self, count: int, timed: bool) -> None:
        import torch

        batches = list(itertools.islice(self.batches, count))
        torch.set_rng_state(self.rng)
        start = time.perf_counter()
        for batch in batches:
            loss = self.step(batch)
            if self.first_loss is None:
                self.first_loss = float(loss)
        seconds = time.perf_counter() - start
        self.rng = torch.get_rng_state()
        if timed:
            self.rates.append(sum(len(batch) for batch in batches) / seconds)


def _endless(split, batch_size: int):
    """The split's shuffled batches, epoch after epoch, in an order seeded 0."""
    import torch

    order = torch.Generator().manual_seed(0)
    while True:
        yield from split.batches(batch_size, order)


def _input_adapter(model, batch):
    """torchdistill's built-in forward process for the model's inputs, and how to hand a
    batch to it: one tensor as it is (``forward_batch_only``), several by the model's
    parameter names (``forward_batch_only_as_kwargs``)."""
    if len(batch.student_inputs) == 1 and not batch.student_kwargs:
        return "forward_batch_only", lambda b: b.student_inputs[0]
    names = list(inspect.signature(model.forward).parameters)[: len(batch.student_inputs)]
    return "forward_batch_only_as_kwargs", lambda b: {**dict(zip(names, b.student_inputs, strict=True)),
                                                      **b.student_kwargs}


def _peer_box(prepared, student, cfg, weight: float, temperature: float, cached: bool, batch):
    """torchdistill's DistillationBox for Hinton KD with our options; (box, adapter)."""
    import torch
    from torchdistill.core.distillation import DistillationBox

    proc, adapt = _input_adapter(student, batch)
    teacher_proc = CACHED_PROC
    if not cached:  # the box hands the teacher the student's sample batch
        names = [list(inspect.signature(m.forward).parameters)[: len(batch.student_inputs)]
                 for m in (student, prepared.teacher)]
        if (batch.teacher_inputs is not batch.student_inputs or batch.teacher_kwargs is not
                batch.student_kwargs or (proc.endswith("kwargs") and names[0] != names[1])):
            raise ValueError("the teacher's inputs differ from the student's; torchdistill's box "
                             "hands both models the same sample batch")
        teacher_proc = proc
    kd = {"key": "KDLoss", "kwargs": {
        "student_module_path": ".", "student_module_io": "output",
        "teacher_module_path": ".", "teacher_module_io": "output",
        # ours: CE + w0 * T^2 * KL(batchmean); KDLoss: alpha * CE + beta * T^2 * KL(batchmean)
        "temperature": temperature, "alpha": 1.0, "beta": weight, "reduction": "batchmean"}}
    train_config = {
        "num_epochs": 1,
        "teacher": {"forward_proc": teacher_proc, "requires_grad": False},
        "student": {"forward_proc": proc, "requires_grad": True},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {
            "sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}}},
        "optimizer": {"key": {"adam": "Adam", "adamw": "AdamW"}[cfg.optimizer], "kwargs": {
            "lr": cfg.lr, "weight_decay": cfg.weight_decay, "foreach": True}},
    }
    box = DistillationBox(prepared.teacher, student, {}, train_config, torch.device("cpu"), None,
                          False, 1)
    return box, adapt


def compare(task: str, setting: str | None = None, teacher: str = "cached", steps: int = 200,
            warmup: int = 10, block: int = 2, task_options: dict | None = None) -> dict:
    """Ours against torchdistill's KD on one task: a row of ``COLUMNS`` (plus the batch size,
    the step counts and the relative difference of the first-step losses, ``first_loss_rel``)."""
    import torch

    from talkingmodels import engine, inference
    from talkingmodels.config import ExperimentConfig, resolve, validate
    from talkingmodels.runner import build_method
    from talkingmodels.tasks import get_task

    if teacher not in ("cached", "online"):
        raise ValueError(f"teacher must be cached or online, not {teacher!r}")
    if get_task(task).output != "classification":
        raise ValueError(f"{task}: its student predicts a {get_task(task).output} output; torchdistill's "
                         "KDLoss is a softmax over class logits and does not apply")
    if import_torchdistill() is None:
        raise RuntimeError(f"torchdistill is not installed: {INSTALL}")
    exp = resolve(validate(ExperimentConfig, {
        "task": task, "settings": [setting] if setting else None, "task_options": task_options or {},
        "methods": [{"name": "logit-kd"}], "seeds": 1}, "peer_kd"))
    setting = exp.settings[0]
    prepared = exp.task.prepare(setting)
    train = prepared.splits.train
    cached = teacher == "cached"
    if cached:  # as the bench does: the frozen teacher's states and outputs computed once
        inference.precompute_teacher(prepared.teacher, train, prepared.teacher_layers)
    else:  # nothing cached: both sides run the teacher on every batch
        train.teacher_cache = {}
    cfg = exp.train[setting]
    _, cls, options = exp.methods[0]

    # ours
    distiller = build_method(prepared, cls, options, seed=0)
    distiller.train()
    step = engine.TrainStep(distiller)
    optimizer = engine.make_optimizer(distiller.learnable_parameters(), cfg)

    def ours_step(batch):
        return sum(engine.train_step(step, batch, optimizer).values())

    # the peer: the same student (same seed), the same frozen teacher
    engine.seed_everything(0)
    student = prepared.build_student()
    ours_init, peer_init = distiller.student.state_dict(), student.state_dict()
    assert ours_init.keys() == peer_init.keys() and all(
        torch.equal(ours_init[k], peer_init[k]) for k in ours_init), "the students start differently"
    box, adapt = _peer_box(prepared, student, cfg, options.weight, options.temperature, cached,
                           train.batch(slice(0, 2)))
    mine = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    theirs = {k: v for k, v in box.optimizer.param_groups[0].items() if k != "params"}
    assert type(box.optimizer) is type(optimizer) and mine == theirs, (mine, theirs)
    box.pre_epoch_process(epoch=0)  # the student in training mode, as their loop starts an epoch

    def peer_step(batch):
        supp = {"teacher_output": batch.teacher_cache["output"]} if cached else {}
        loss = box.forward_process(adapt(batch), batch.target, supp)
        box.post_forward_process(loss)
        return loss.detach()

    torch.manual_seed(0)
    rng = torch.get_rng_state()
    ours = Side("ours", ours_step, _endless(train, cfg.batch_size), rng)
    peer = Side("torchdistill", peer_step, _endless(train, cfg.batch_size), rng.clone())
    ours.run(warmup, timed=False)
    peer.run(warmup, timed=False)
    for round_ in range(math.ceil(steps / block)):
        for side in (ours, peer) if round_ % 2 == 0 else (peer, ours):
            side.run(block, timed=True)
    ours_rate, peer_rate = statistics.median(ours.rates), statistics.median(peer.rates)
    return {"task": task, "setting": setting, "teacher": teacher,
            "ours_samples_per_s": ours_rate, "peer_samples_per_s": peer_rate,
            "ratio": ours_rate / peer_rate,
            "first_loss_ours": ours.first_loss, "first_loss_peer": peer.first_loss,
            "first_loss_rel": abs(ours.first_loss - peer.first_loss) / abs(ours.first_loss),
            "batch_size": cfg.batch_size, "steps": block * math.ceil(steps / block),
            "warmup": warmup}


def write_csv(path: str | Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help="classification tasks (movielens is regression: KDLoss does not apply)")
    parser.add_argument("--setting", action="append", default=[], metavar="TASK=SETTING",
                        help="the setting to time a task on (default: its first bench setting)")
    parser.add_argument("--teacher", choices=("cached", "online"), default="cached",
                        help="cached: the teacher's outputs from the bench's cache; online: the "
                        "teacher runs on every batch")
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each side")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps of each side")
    parser.add_argument("--block", type=int, default=2,
                        help="steps per timed block (short blocks: machine noise hits both sides alike)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", help="write the rows here (columns: " + ", ".join(COLUMNS) + ")")
    parser.add_argument("--data-dir", action="append", default=[], metavar="[TASK=]DIR",
                        help="a task's data folder (its data_dir option); without TASK= for every task")
    args = parser.parse_args()
    if min(args.steps, args.warmup, args.block, args.threads) < 1:
        parser.error("--steps, --warmup, --block and --threads must be at least 1")
    torchdistill = import_torchdistill()
    if torchdistill is None:
        print(f"error: torchdistill is not installed; {INSTALL}", file=sys.stderr)
        sys.exit(2)
    import torch

    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    from talkingmodels.tasks import get_task

    for task in tasks:
        try:
            output = get_task(task).output
        except Exception as exc:  # an unknown name: the registry's own message
            parser.error(str(exc))
        if output != "classification":
            print(f"error: {task}: its student predicts a {output} output (logit-kd there is an MSE to "
                  "the teacher's prediction); torchdistill's KDLoss is a softmax over class logits and "
                  "does not apply. Use --tasks vision,text", file=sys.stderr)
            sys.exit(2)
    settings = dict(s.split("=", 1) for s in args.setting)
    data_dirs = {}
    for item in args.data_dir:
        task, _, folder = item.rpartition("=") if "=" in item else ("", "", item)
        for name in [task] if task else tasks:
            data_dirs[name] = folder
    rows = []
    for task in tasks:
        options = {"data_dir": data_dirs[task]} if task in data_dirs else {}
        row = compare(task, settings.get(task), args.teacher, args.steps, args.warmup, args.block, options)
        rows.append(row)
        print(f"  {task} ({row['setting']}), teacher {args.teacher}: ours {row['ours_samples_per_s']:.0f}, "
              f"torchdistill {row['peer_samples_per_s']:.0f} samples/s", file=sys.stderr)
    print(f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
          f"torchdistill {torchdistill.__version__}; teacher {args.teacher}; median samples/s over "
          f"blocks of {args.block} steps ({rows[0]['steps']} steps of each side, alternating, after "
          f"{args.warmup} warm-up steps)")
    print("| task (setting) | teacher | batch | ours samples/s | torchdistill samples/s "
          "| ours / torchdistill | first loss ours | first loss torchdistill | relative difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} ({r['setting']}) | {r['teacher']} | {r['batch_size']} "
              f"| {r['ours_samples_per_s']:.0f} | {r['peer_samples_per_s']:.0f} | {r['ratio']:.2f} "
              f"| {r['first_loss_ours']:.7f} | {r['first_loss_peer']:.7f} | {r['first_loss_rel']:.1e} |")
    if args.csv:
        write_csv(args.csv, rows)
        print(f"wrote {args.csv}")
    unequal = [r for r in rows if not r["first_loss_rel"] <= TOLERANCE]
    for r in unequal:
        print(f"FAIL: {r['task']}: the first-step losses differ (ours {r['first_loss_ours']!r}, "
              f"torchdistill {r['first_loss_peer']!r}; relative {r['first_loss_rel']:.2e} > {TOLERANCE})",
              file=sys.stderr)
    if unequal:
        sys.exit(1)
    print(f"first-step losses equal on every task (relative difference <= {TOLERANCE})")


if __name__ == "__main__":
    main()
