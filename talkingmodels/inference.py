"""A model run over whole splits without training: its predictions and targets, a metric
of them (streamed batch by batch where the metric sums), and the frozen teacher's states
and output computed once per split into its cache. The training loop that calls these after
each epoch is in :mod:`talkingmodels.engine`."""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn

from talkingmodels import taps
from talkingmodels.data import as_loader, iterate, teacher_cached
from talkingmodels.errors import UserError
from talkingmodels.losses import Metric
from talkingmodels.splits import Split
from talkingmodels.states import TopK


def device_of(model: nn.Module) -> torch.device:
    return next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device


@torch.no_grad()
def predictions(model: nn.Module, data, batch_size: int = 8192,
                autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs and the targets on every batch of ``data``, in order and in eval
    mode (its mode is restored), gathered on the CPU in float32 (run on the model's device)."""
    was_training = model.training
    model.eval()
    device, outputs, targets = device_of(model), [], []
    for batch in iterate(as_loader(data, batch_size, shuffle=False), batch_size):
        batch = batch.to(device)
        with autocast():
            output = taps.prediction(batch.run_student(model))
        outputs.append(output.float().cpu())
        targets.append(batch.target.cpu())
    model.train(was_training)
    if not outputs:
        raise UserError("the evaluation data yielded no batches")
    return torch.cat(outputs), torch.cat(targets)


def predict(model: nn.Module, data, batch_size: int = 8192) -> torch.Tensor:
    """The model's outputs on a whole split, in eval mode (its mode is restored)."""
    return predictions(model, data, batch_size)[0]


def evaluate(model: nn.Module, data, metric: Metric, batch_size: int = 8192,
             autocast=contextlib.nullcontext) -> float:
    """``metric`` of the model on ``data`` (in eval mode; its mode is restored). A streamed
    metric (``metric.totals``) is summed batch by batch, in float64, on the model's device."""
    if metric.totals is None:
        return float(metric.fn(*predictions(model, data, batch_size, autocast)))
    was_training = model.training
    model.eval()
    device, sums = device_of(model), None
    try:
        with torch.no_grad():
            for batch in iterate(as_loader(data, batch_size, shuffle=False), batch_size):
                batch = batch.to(device)
                with autocast():
                    output = taps.prediction(batch.run_student(model))
                part = metric.totals(output.float(), batch.target).double()
                sums = part if sums is None else sums + part
    finally:
        model.train(was_training)
    if sums is None:
        raise UserError("the evaluation data yielded no batches")
    return float(metric.finish(sums))


@torch.no_grad()
def precompute_teacher(teacher: nn.Module, split: Split, layers: tuple[str, ...],
                       batch_size: int = 8192, top_k: int | None = None, tail: str = "renormalise") -> None:
    """Store the frozen teacher's states at ``layers`` and its output for every example of
    ``split`` in ``split.teacher_cache`` (on the CPU; run on the teacher's device): the
    teacher is then never run again on it. Nothing to do when the task already filled the
    cache (e.g. from its disk cache). ``top_k``: a causal LM's output is kept as its
    ``top_k`` most likely next tokens per position (a :class:`TopK` with ``tail``)."""
    if teacher_cached(split, layers):
        return
    device = device_of(teacher)

    def run(batch):
        output = taps.prediction(batch.run_teacher(teacher))
        if top_k is None:
            return output
        top = TopK.of(output, top_k)
        return {"output": top.log_probs, "output_indices": top.indices}

    cache = taps.collect(teacher, layers, (batch.to(device) for batch in split.batches(batch_size)), run,
                         "output", width=None if split.lengths is None else int(split.lengths.max()))
    if top_k is not None:
        cache["output"] = TopK(cache["output"], cache.pop("output_indices"), tail)
    split.teacher_cache = cache
