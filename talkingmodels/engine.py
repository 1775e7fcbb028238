"""The one training loop, shared by every method and task (and the teachers' pre-training).

Per stage of the method: an optimiser over the method's learnable parameters, epochs of
shuffled mini-batches (the order drawn from the run's seed), the sum of the method's
named loss terms, and after each epoch the validation metric of the student alone. With
model selection on, the best epoch's student is kept and training stops after
``patience`` epochs without improvement. The test metric is measured once, at the end.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from talkingmodels import taps
from talkingmodels.data import Split, Splits
from talkingmodels.errors import UserError


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
    outputs = [model(*batch.student_inputs) for batch in split.batches(batch_size)]
    model.train(was_training)
    return torch.cat(outputs)


@torch.no_grad()
def precompute_teacher(teacher: nn.Module, split: Split, layers: tuple[str, ...],
                       batch_size: int = 8192) -> None:
    """Store the frozen teacher's states at ``layers`` and its output for every example of
    ``split`` in ``split.teacher_cache``: the teacher is then never run again on it."""
    parts: dict[str, list[torch.Tensor]] = {}
    teacher.eval()
    for batch in split.batches(batch_size):
        with taps.capture(teacher, layers) as states:
            output = teacher(*batch.teacher_inputs)
        for key, value in {**states, "output": output}.items():
            parts.setdefault(key, []).append(value)
    split.teacher_cache = {key: torch.cat(values) for key, values in parts.items()}


def evaluate(model: nn.Module, split: Split, metric: Metric, batch_size: int = 8192) -> float:
    return float(metric.fn(predict(model, split, batch_size), split.target))


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(method: nn.Module, splits: Splits, metric: Metric, cfg: TrainConfig, seed: int,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train ``method`` (a Distiller) and return the selected student's metrics.

    ``method.student`` is left holding the selected weights.
    """
    start = time.perf_counter()
    order = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    best_val, best_epoch, best_state = None, 0, None
    epoch = 0
    for stage in method.stages():
        method.stage = stage.name
        optimizer = make_optimizer(method.learnable_parameters(), cfg)
        budget = stage.epochs or cfg.epochs
        stale = 0
        for _ in range(budget):
            epoch += 1
            method.train()
            sums: dict[str, torch.Tensor] = {}
            steps = 0
            for batch in splits.train.batches(cfg.batch_size, order):
                _, terms = method.forward_train(batch)
                loss = sum(terms.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.detach()
                steps += 1
            row = {"epoch": epoch, "stage": stage.name}
            row.update({f"loss_{k}": float(v) / steps for k, v in sums.items()})
            bad = [k for k, v in row.items() if k.startswith("loss_") and not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"non-finite {bad[0]} in epoch {epoch} ({stage.name} stage)")
            val = evaluate(method.student, splits.val, metric, cfg.eval_batch_size)
            row[f"val_{metric.name}"] = val
            history.append(row)
            if on_epoch:
                on_epoch(row)
            if not stage.select:
                continue
            if best_val is None or metric.better(val, best_val):
                best_val, best_epoch, stale = val, epoch, 0
                best_state = copy.deepcopy(method.student.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    if best_state is None:
        raise UserError("the method has no stage with model selection; nothing to report")
    method.student.load_state_dict(best_state)
    test = evaluate(method.student, splits.test, metric, cfg.eval_batch_size)
    return FitResult(best_val, test, best_epoch, epoch, time.perf_counter() - start, history)
