"""The one training loop, shared by every method and task (and the teachers' pre-training).

Per stage of the method: an optimiser over the method's learnable parameters, epochs of
shuffled mini-batches (the order drawn from the run's seed), the sum of the method's
named loss terms, and after each epoch the validation metric of the student alone. With
model selection on, the best epoch's student is kept and training stops after
``patience`` epochs without improvement. The test metric is measured once, at the end.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from talkingmodels import distributed, taps
from talkingmodels.data import Split, Splits
from talkingmodels.errors import UserError
from talkingmodels.io import atomic_save


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(30, ge=1, description="epoch budget of the main stage")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    patience: int = Field(5, ge=1, description="epochs without validation gain before stopping")
    eval_batch_size: int = Field(8192, ge=1)


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    higher_is_better: bool

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


@dataclass
class FitResult:
    val: float  # validation metric of the selected student
    test: float
    best_epoch: int
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # one row per epoch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = 8192) -> torch.Tensor:
    """The model's outputs on a whole split, in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    outputs = [taps.prediction(model(*batch.student_inputs)) for batch in split.batches(batch_size)]
    model.train(was_training)
    return torch.cat(outputs)


@torch.no_grad()
def precompute_teacher(teacher: nn.Module, split: Split, layers: tuple[str, ...],
                       batch_size: int = 8192) -> None:
    """Store the frozen teacher's states at ``layers`` and its output for every example of
    ``split`` in ``split.teacher_cache``: the teacher is then never run again on it.
    Nothing to do when the task already filled the cache (e.g. from its disk cache)."""
    if all(key in split.teacher_cache for key in (*layers, "output")):
        return
    parts: dict[str, list[torch.Tensor]] = {}
    teacher.eval()
    for batch in split.batches(batch_size):
        with taps.capture(teacher, layers) as states:
            output = taps.prediction(teacher(*batch.teacher_inputs))
        for key, value in {**states, "output": output}.items():
            parts.setdefault(key, []).append(value)
    split.teacher_cache = {key: torch.cat(values) for key, values in parts.items()}


def evaluate(model: nn.Module, split: Split, metric: Metric, batch_size: int = 8192) -> float:
    return float(metric.fn(predict(model, split, batch_size), split.target))


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # foreach: one multi-tensor update instead of a Python loop over parameters, with the
    # same arithmetic (results stay bit for bit); on CPU torch defaults to the loop.
    # (fused=True is faster still, but rounds differently.)
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _state(method: nn.Module, optimizer, order: torch.Generator, run: dict,
           fingerprint: dict | None) -> dict:
    """Everything a checkpoint holds. The frozen teacher is left out: it never changes, and
    it can be large."""
    frozen = not method.config.unfreeze_teacher
    own = {k: v for k, v in method.state_dict().items() if not (frozen and k.startswith("teacher."))}
    return {"method": own, "optimizer": optimizer.state_dict(), "order": order.get_state(),
            "rng": _rng_state(), "run": run, "fingerprint": fingerprint}


def _changes(old, new, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix or "(value)"]
    return [change for key in sorted(set(old) | set(new), key=str)
            for change in _changes(old.get(key), new.get(key), f"{prefix}.{key}".lstrip("."))]


def load_checkpoint(path: Path, fingerprint: dict | None = None) -> dict:
    """A checkpoint's state, verified: readable, and written by a run with the same
    ``fingerprint`` (the settings that shape the run) when both have one."""
    try:
        saved = torch.load(path, weights_only=False)
    except Exception as exc:  # truncated or corrupted: never resume from it silently
        raise UserError(f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to "
                        "start this run again") from None
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {path} is not a talkingmodels checkpoint; delete it to start "
                        "this run again")
    if saved.get("fingerprint") is not None and fingerprint is not None:
        changed = _changes(saved["fingerprint"], fingerprint)
        if changed:
            raise UserError(f"checkpoint {path} was written by a run with other settings "
                            f"(changed: {', '.join(changed)}); use --force to start over")
    return saved


class TrainStep(nn.Module):
    """``forward_train`` as a module's forward, so DDP can wrap it (DDP synchronises the
    gradients of what runs inside its own forward call)."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch):
        return self.method.forward_train(batch)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the run's state was saved at a step boundary."""


@contextlib.contextmanager
def _stop_requests(enabled: bool):
    """While training with a checkpoint, SIGINT/SIGTERM only ask the loop to stop at the
    next step boundary (so the state it saves is consistent)."""
    flag = {"stop": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def ask(_signum, _frame):
        flag["stop"] = True

    for sig in previous:
        signal.signal(sig, ask)
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fit(method: nn.Module, splits: Splits, metric: Metric, cfg: TrainConfig, seed: int,
        on_epoch: Callable[[dict], None] | None = None,
        checkpoint: Path | None = None,
        on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
        fingerprint: dict | None = None,
        distribute: bool = False) -> FitResult:
    """Train ``method`` (a Distiller) and return the selected student's metrics.

    ``method.student`` is left holding the selected weights. With ``checkpoint``, the full
    training state (method, optimiser, RNGs, data order, best-so-far) is written there after
    every epoch and, mid-epoch, on SIGINT/SIGTERM (then :class:`Interrupted` is raised); a run
    whose checkpoint exists continues from it, ending exactly as the uninterrupted run would
    (same seed, CPU), unless its ``fingerprint`` (the run's config) differs: that is an error.
    ``on_step(step, terms)`` sees every step's loss terms. With ``distribute`` and a process
    group (see :mod:`talkingmodels.distributed`), training runs on DDP and only the main
    process writes the checkpoint.
    """
    start = time.perf_counter()
    order = torch.Generator().manual_seed(seed)
    run = {"stage": 0, "stage_epoch": 0, "epoch": 0, "stale": 0, "done": False,
           "best_val": None, "best_epoch": 0, "best_state": None, "history": []}
    saved, partial = None, None
    if checkpoint is not None and Path(checkpoint).exists():
        saved = load_checkpoint(Path(checkpoint), fingerprint)
        keys = method.load_state_dict(saved["method"], strict=False)
        if keys.unexpected_keys or any(not k.startswith("teacher.") for k in keys.missing_keys):
            raise UserError(f"checkpoint {checkpoint} belongs to another model or method")
        order.set_state(saved["order"])
        _set_rng_state(saved["rng"])
        run, partial = saved["run"], saved.get("partial")
    stages = method.stages()
    acc = distributed.accelerator() if distribute else None
    writes = checkpoint is not None and (acc is None or acc.is_main_process)
    # A mid-epoch pause needs every process to stop at the same step: single process only.
    with _stop_requests(checkpoint is not None and acc is None) as stop:
        for index in range(run["stage"], len(stages)):
            stage = stages[index]
            method.stage = stage.name
            step = TrainStep(method) if acc is None else acc.prepare_model(TrainStep(method))
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
                row = train_epoch(method, step, splits, cfg, optimizer, order, run, stage.name,
                                   partial, stop, on_step, acc)
                partial = None
                if "paused" in row:
                    atomic_save({**_state(method, optimizer, order, run, fingerprint),
                                 "partial": row["paused"]}, Path(checkpoint))
                    raise Interrupted(f"interrupted in epoch {run['epoch']}; the run's state is "
                                      f"in {checkpoint}: run the same command with --resume to "
                                      "continue it")
                val = evaluate(method.student, splits.val, metric, cfg.eval_batch_size)
                row[f"val_{metric.name}"] = val
                run["history"].append(row)
                if stage.select:
                    if run["best_val"] is None or metric.better(val, run["best_val"]):
                        run.update(best_val=val, best_epoch=run["epoch"], stale=0,
                                   best_state=copy.deepcopy(method.student.state_dict()))
                    else:
                        run["stale"] += 1
                        run["done"] = run["stale"] >= cfg.patience
                if writes:
                    atomic_save(_state(method, optimizer, order, run, fingerprint), Path(checkpoint))
                if on_epoch:
                    on_epoch(row)
    if run["best_state"] is None:
        raise UserError("the method has no stage with model selection; nothing to report")
    method.student.load_state_dict(run["best_state"])
    test = evaluate(method.student, splits.test, metric, cfg.eval_batch_size)
    return FitResult(run["best_val"], test, run["best_epoch"], run["epoch"],
                     time.perf_counter() - start, run["history"])


class NumericalFault(Exception):
    """A loss term became NaN or infinite; the message names the term, epoch and step."""


def train_step(step, batch, optimizer) -> dict[str, torch.Tensor]:
    """One optimisation step on ``batch``: the summed loss terms of ``step`` (a
    :class:`TrainStep`, DDP-wrapped or not) back-propagated; the terms, detached."""
    _, terms = step(batch)
    optimizer.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    optimizer.step()
    return {name: value.detach() for name, value in terms.items()}


def train_epoch(method, step, splits: Splits, cfg: TrainConfig, optimizer, order: torch.Generator,
                 run: dict, stage: str, partial: dict | None = None, stop: dict | None = None,
                 on_step=None, acc=None) -> dict:
    """One pass over the shuffled training split; the mean of each loss term.

    ``step`` is the method's training forward (DDP-wrapped when ``acc`` is set: then this
    process trains on its shard of every global batch). Non-finite terms are tracked with
    tensor ops (the first bad step per term) and checked once at the end of the epoch, so
    the loop never waits on a per-step host sync. When ``stop["stop"]`` turns true the pass
    pauses at the next step boundary and returns ``{"paused": ...}``, what ``partial``
    needs to finish this same epoch later.
    """
    method.train()
    if partial is not None:  # replay the epoch's data order, skip the steps already done
        order.set_state(partial["order_start"])
    order_start = order.get_state()
    sums: dict[str, torch.Tensor] = dict(partial["sums"]) if partial else {}
    first_bad: dict[str, torch.Tensor] = dict(partial["first_bad"]) if partial else {}
    steps = partial["steps"] if partial else 0
    shard = distributed.shard() if acc is not None else (0, 1)
    for batch in itertools.islice(splits.train.batches(cfg.batch_size, order, shard), steps, None):
        if stop is not None and stop["stop"]:
            return {"paused": {"order_start": order_start, "steps": steps, "sums": sums,
                               "first_bad": first_bad}}
        terms = train_step(step, batch, optimizer)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
            seen = first_bad.get(name, torch.tensor(-1))
            first_bad[name] = torch.where((seen < 0) & ~torch.isfinite(value),
                                          torch.tensor(steps), seen)
        steps += 1
        if on_step is not None:
            on_step(run.get("step", 0) + steps, terms)
    run["step"] = run.get("step", 0) + steps
    if acc is not None:  # every process must see the same faults and mean losses
        sums = {k: distributed.all_reduce(torch.as_tensor(v)) / shard[1] for k, v in sums.items()}
        never = torch.tensor(2**62)
        first_bad = {k: distributed.all_reduce(torch.where(v < 0, never, v), "min")
                     for k, v in first_bad.items()}
        first_bad = {k: torch.where(v == never, torch.tensor(-1), v) for k, v in first_bad.items()}
    faults = {name: int(step) for name, step in first_bad.items() if int(step) >= 0}
    if faults:
        name = min(faults, key=faults.get)
        raise NumericalFault(f"loss term {name!r} became non-finite at step {faults[name] + 1} "
                             f"of epoch {run['epoch']} ({stage} stage)")
    row = {"epoch": run["epoch"], "stage": stage}
    row.update({f"loss_{k}": float(v) / steps for k, v in sums.items()})
    return row
