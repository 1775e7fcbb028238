"""The one training loop, shared by every method and task (and the teachers' pre-training).

Per stage of the method: an optimiser over the method's learnable parameters, epochs of
shuffled mini-batches (a :class:`Split`'s order drawn from the run's seed, a DataLoader's
its own), the sum of the method's named loss terms, and after each epoch the validation
metric of the student alone. With model selection on, the best epoch's student is kept and
training stops after ``patience`` epochs without improvement. The test metric is measured
once, at the end. Device, mixed precision and processes come from one accelerate
Accelerator (:mod:`talkingmodels.distributed`); a run's state on disk, for exact resume, is
:mod:`talkingmodels.checkpoint`'s, and measuring a model on a split
:mod:`talkingmodels.inference`'s.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from talkingmodels import distributed, losses, taps
from talkingmodels.checkpoint import (
    Interrupted,
    loader_generators,
    order_state,
    restore,
    rng_state,
    save,
    set_order_state,
    set_rng_state,
    stop_requests,
)
from talkingmodels.data import Batch, as_loader, iterate
from talkingmodels.errors import UserError
from talkingmodels.inference import evaluate
from talkingmodels.losses import Metric
from talkingmodels.splits import Split, Splits

# What shapes how a run is computed but not what it learns: left out of cache keys.
RUNTIME_FIELDS = {"device", "mixed_precision", "teacher_dtype", "deterministic"}


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(30, ge=1, description="epoch budget of the main stage")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    patience: int = Field(5, ge=1, description="epochs without validation gain before stopping")
    eval_batch_size: int = Field(8192, ge=1)
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda or cuda:N")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast of the forward passes; fp16 with a gradient scaler (CUDA)")
    teacher_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the frozen teacher's weights held in this dtype")
    deterministic: bool = Field(False, description="deterministic algorithms on GPU runs (CPU "
                                "runs reproduce bit for bit anyway)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(distributed.DEVICE_PATTERN, value):
            raise ValueError(f"unknown device {value!r}; valid devices: auto, cpu, cuda, cuda:N")
        return value


@dataclass
class FitResult:
    val: float  # validation metric of the selected student
    test: float | None  # None without a test split
    best_epoch: int
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # one row per epoch


@dataclass(frozen=True)
class Stage:
    """A phase of training. ``epochs=None`` uses the run's epoch budget; ``select`` turns
    on early stopping / model selection on the validation metric."""

    name: str
    epochs: int | None = None
    select: bool = True


class Supervised(nn.Module):
    """The engine's plain supervised step: a model trained on its task loss alone (how a
    task pre-trains its teacher). Every distillation method extends it
    (:class:`talkingmodels.methods.base.Distiller`): ``forward_train(batch)`` returns the
    prediction and a dict of named, weighted loss terms, which the engine sums."""

    def __init__(self, student: nn.Module,
                 task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.student = student
        self.task_loss = task_loss
        self.stage = Stage("main")  # the stage being trained (the engine sets it)
        self.built = False
        self.output = None  # the task's output kind, where a method knows it (loss units)

    def setup(self, batch: Batch) -> None:
        """Build what depends on the data (a method's channel modules: their widths come from
        a probe pass): called once, with a first batch on the run's device, before the
        optimiser is made."""
        self.built = True

    def forward(self, *student_inputs: torch.Tensor) -> torch.Tensor:
        """Inference needs only the student."""
        return taps.prediction(self.student(*student_inputs))

    def forward_train(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prediction = taps.prediction(batch.run_student(self.student))
        return prediction, {"task": self.task_loss(prediction, batch.target)}

    def stages(self) -> list[Stage]:
        return [Stage("main")]

    def learnable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Submodules that never change (a frozen teacher): left out of checkpoints, held
        in ``teacher_dtype``."""
        return {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # foreach: one multi-tensor update instead of a Python loop over parameters, with the
    # same arithmetic (results stay bit for bit); on CPU torch defaults to the loop.
    # (fused=True is faster still, but rounds differently.)
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


class TrainStep(nn.Module):
    """``forward_train`` as a module's forward, so DDP can wrap it (DDP synchronises the
    gradients of what runs inside its own forward call)."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch):
        return self.method.forward_train(batch)


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """``torch.use_deterministic_algorithms`` (and the cuBLAS workspace it needs) for the
    block; the previous setting is restored afterwards."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def first_batch(data, batch_size: int) -> Batch:
    """A few examples of ``data`` to build a method from, without moving the global RNG or
    the loader's own generators (fetching a shuffled loader's first batch draws from them)."""
    if isinstance(data, Split):
        return data.batch(slice(0, 4))
    generators = loader_generators(data)
    saved = [g.get_state() for g in generators]
    with torch.random.fork_rng(devices=[]):
        batch = next(iterate(data, batch_size), None)
    for generator, state in zip(generators, saved, strict=True):
        generator.set_state(state)
    if batch is None:
        raise UserError("the training data yielded no batches")
    return batch


def place(method: Supervised, device: torch.device, teacher_dtype: str = "float32") -> None:
    """The method's modules on ``device``; frozen ones (the teacher) in ``teacher_dtype``."""
    method.to(device)
    dtype = getattr(torch, teacher_dtype)
    for module in method.frozen_modules().values():
        module.to(dtype=dtype)


def fit(method: Supervised, splits: Splits, metric: Metric, cfg: TrainConfig, seed: int,
        on_epoch: Callable[[dict], None] | None = None,
        checkpoint: Path | None = None,
        on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
        fingerprint: dict | None = None,
        distribute: bool = False,
        progress: bool = False) -> FitResult:
    """Train ``method`` (a :class:`Supervised` step or a Distiller) and return the selected
    student's metrics.

    ``splits`` holds the training, validation and (or None) test data: each a :class:`Split`
    or any iterable of batches (see :mod:`talkingmodels.data`). The method is built from the
    first training batch when it was not yet, on ``cfg.device``. ``method.student`` is left
    holding the selected weights, in eval mode. With ``checkpoint``, the full training state
    (method, optimiser, RNGs, data order, best-so-far) is written there after every epoch
    and, mid-epoch, on SIGINT/SIGTERM (then :class:`Interrupted` is raised); a run whose
    checkpoint exists continues from it, ending exactly as the uninterrupted run would (same
    seed, CPU), unless its ``fingerprint`` (the run's config) differs: that is an error.
    ``on_step(step, terms)`` sees every step's loss terms. With ``distribute`` under a
    launcher, training runs on DDP and only the main process writes the checkpoint.
    ``progress`` shows a bar of the epochs with the loss and validation metric.
    """
    start = time.perf_counter()
    acc = distributed.accelerator(cfg.device, cfg.mixed_precision)
    multi = distribute and distributed.launched()
    train = as_loader(splits.train, cfg.batch_size, shuffle=True)
    val = as_loader(splits.val, cfg.eval_batch_size, shuffle=False)
    test = None if splits.test is None else as_loader(splits.test, cfg.eval_batch_size, shuffle=False)
    order = torch.Generator().manual_seed(seed)
    run = {"stage": 0, "stage_epoch": 0, "epoch": 0, "stale": 0, "done": False,
           "best_val": None, "best_epoch": 0, "best_state": None, "history": []}
    with _deterministic(cfg.deterministic and acc.device.type == "cuda"):
        place(method, acc.device)
        if not method.built:
            method.setup(first_batch(train, cfg.batch_size).to(acc.device))
        place(method, acc.device, cfg.teacher_dtype)
        saved, partial = None, None
        if checkpoint is not None and Path(checkpoint).exists():
            saved = restore(Path(checkpoint), fingerprint, method, order, train, acc.scaler)
            run, partial = saved["run"], saved.get("partial")
        stages = method.stages()
        writes = checkpoint is not None and distributed.is_main()
        bar = tqdm(desc="epochs", unit="epoch", disable=not (progress and distributed.is_main()),
                   total=sum(stage.epochs or cfg.epochs for stage in stages), initial=run["epoch"])
        # A mid-epoch pause needs every process to stop at the same step: single process only.
        with stop_requests(checkpoint is not None and not multi) as stop, bar:
            for index in range(run["stage"], len(stages)):
                stage = stages[index]
                method.stage = stage
                step = acc.prepare_model(TrainStep(method)) if multi else TrainStep(method)
                optimizer = make_optimizer(method.learnable_parameters(), cfg)
                if saved is not None and index == saved["run"]["stage"]:
                    optimizer.load_state_dict(saved["optimizer"])
                else:
                    run.update(stage=index, stage_epoch=0, stale=0, done=False)
                budget = stage.epochs or cfg.epochs
                while not run["done"] and run["stage_epoch"] < budget:
                    if partial is None:  # else: finish the epoch that was interrupted
                        run["epoch"] += 1
                        run["stage_epoch"] += 1
                    row = train_epoch(method, step, train, cfg, optimizer, order, run, stage.name,
                                      partial, stop, on_step, acc if multi else None, acc)
                    partial = None
                    if "paused" in row:
                        save(Path(checkpoint), method, optimizer, order, train, run, fingerprint,
                             acc.scaler, partial=row["paused"])
                        raise Interrupted(f"interrupted in epoch {run['epoch']}; the run's state is "
                                          f"in {checkpoint}: run the same command with --resume to "
                                          "continue it")
                    val_metric = evaluate(method.student, val, metric, cfg.eval_batch_size, acc.autocast)
                    row[f"val_{metric.name}"] = val_metric
                    run["history"].append(row)
                    if stage.select:
                        if run["best_val"] is None or metric.better(val_metric, run["best_val"]):
                            run.update(best_val=val_metric, best_epoch=run["epoch"], stale=0,
                                       best_state=copy.deepcopy(method.student.state_dict()))
                        else:
                            run["stale"] += 1
                            run["done"] = run["stale"] >= cfg.patience
                    if writes:
                        save(Path(checkpoint), method, optimizer, order, train, run, fingerprint,
                             acc.scaler)
                    bar.update(1 + (budget - run["stage_epoch"] if run["done"] else 0))
                    bar.set_postfix({"loss": sum(v for k, v in row.items() if k.startswith("loss_")),
                                     metric.name: val_metric}, refresh=False)
                    if on_epoch:
                        on_epoch(row)
        if multi:
            acc.free_memory()  # the Accelerator keeps a reference to every model it prepared
        if run["best_state"] is None:
            raise UserError("the method has no stage with model selection; nothing to report")
        method.student.load_state_dict(run["best_state"])
        method.eval()
        result = None if test is None else evaluate(method.student, test, metric,
                                                     cfg.eval_batch_size, acc.autocast)
    return FitResult(run["best_val"], result, run["best_epoch"], run["epoch"],
                     time.perf_counter() - start, run["history"])


class NumericalFault(Exception):
    """A loss term became NaN or infinite; the message names the term, epoch and step."""


def train_step(step, batch: Batch, optimizer, acc=None, share: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """One optimisation step on ``batch``: the summed loss terms of ``step`` (a
    :class:`TrainStep`, DDP-wrapped or not) back-propagated, under the Accelerator's
    autocast and gradient scaler when ``acc`` is given; the terms, detached. ``share``: this
    process's part of the global batch's loss units times the process count (DDP averages
    the processes' gradients; weighed by it, they add up to the gradient of the mean over
    the whole batch, as one process computes it, when the shards hold unequal numbers of
    tokens); the terms come back weighed alike."""
    with acc.autocast() if acc is not None else contextlib.nullcontext():
        _, terms = step(batch)
    if share is not None:
        terms = {name: value * share for name, value in terms.items()}
    optimizer.zero_grad(set_to_none=True)
    loss = losses.total(terms.values())
    scaler = acc.scaler if acc is not None else None
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:  # fp16: scaled gradients; a step with overflowed gradients is skipped
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return {name: value.detach() for name, value in terms.items()}


def _share(method, batch: Batch, shard: tuple[int, int]) -> torch.Tensor | None:
    """This process's share of the global batch's loss units (tokens of a causal LM, else
    examples) times the process count; None where it is exactly 1 (equal shards of examples:
    nothing to reweigh, and no collective to wait on)."""
    output = getattr(method, "output", None)
    if output != "causal-lm":
        return None  # (examples: the shards of a batch differ by one at most, in its last batch)
    units = losses.loss_units(batch.target, output).float()
    return units * shard[1] / distributed.all_reduce(units).clamp(min=1)


def train_epoch(method, step, data, cfg: TrainConfig, optimizer, order: torch.Generator,
                run: dict, stage: str, partial: dict | None = None, stop: dict | None = None,
                on_step=None, ddp=None, acc=None) -> dict:
    """One pass over the shuffled training data; the mean of each loss term.

    ``step`` is the method's training forward (DDP-wrapped when ``ddp`` is set: then this
    process trains on its shard of every global batch). Non-finite terms are tracked with
    tensor ops (the first bad step per term) and checked once at the end of the epoch, so
    the loop never waits on a per-step host sync. When ``stop["stop"]`` turns true the pass
    pauses at the next step boundary and returns ``{"paused": ...}``, what ``partial``
    needs to finish this same epoch later: the epoch's data order is replayed and the steps
    already done are skipped.
    """
    method.train()
    device = acc.device if acc is not None else torch.device("cpu")
    if partial is not None:  # replay the epoch's data order, then continue the paused RNGs
        paused = rng_state()
        set_order_state(order, data, partial["order_start"])
    start_state = order_state(order, data)
    sums: dict[str, torch.Tensor] = dict(partial["sums"]) if partial else {}
    first_bad: dict[str, torch.Tensor] = dict(partial["first_bad"]) if partial else {}
    steps = partial["steps"] if partial else 0
    shard = distributed.shard() if ddp is not None else (0, 1)
    batches = iterate(data, cfg.batch_size, order, shard)
    if partial is not None:
        for _ in itertools.islice(batches, steps):  # the steps already done
            pass
        set_rng_state(paused)  # go on with the RNGs where the pause left them
    while True:
        # (asked before the next batch is fetched: a loader that draws from the global RNG
        # then fetches it from the saved state when the run resumes)
        if stop is not None and stop["stop"]:
            return {"paused": {"order_start": start_state, "steps": steps, "sums": sums,
                               "first_bad": first_bad}}
        batch = next(batches, None)
        if batch is None:
            break
        batch = batch.to(device)
        terms = train_step(step, batch, optimizer, acc, None if ddp is None else _share(method, batch, shard))
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.float()
            seen = first_bad.get(name, torch.full((), -1, device=value.device))
            first_bad[name] = torch.where((seen < 0) & ~torch.isfinite(value), steps, seen)
        steps += 1
        if on_step is not None:
            on_step(run.get("step", 0) + steps, terms)
    if steps == 0:
        raise UserError("the training data yielded no batches")
    run["step"] = run.get("step", 0) + steps
    if ddp is not None:  # every process must see the same faults and mean losses
        sums = {k: distributed.all_reduce(torch.as_tensor(v)) / shard[1] for k, v in sums.items()}
        never = 2**62
        first_bad = {k: distributed.all_reduce(torch.where(v < 0, never, v), "min")
                     for k, v in first_bad.items()}
        first_bad = {k: torch.where(v == never, -1, v) for k, v in first_bad.items()}
    faults = {name: int(step) for name, step in first_bad.items() if int(step) >= 0}
    if faults:
        name = min(faults, key=faults.get)
        raise NumericalFault(f"loss term {name!r} became non-finite at step {faults[name] + 1} "
                             f"of epoch {run['epoch']} ({stage} stage)")
    row = {"epoch": run["epoch"], "stage": stage}
    row.update({f"loss_{k}": float(v) / steps for k, v in sums.items()})
    return row
