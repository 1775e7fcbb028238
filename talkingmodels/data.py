"""Batches, and the data a user can hand the engine: any iterable of batches.

* :class:`Batch` is one mini-batch, each model's inputs (positional and by keyword), the
  targets and the rows of a frozen teacher's cache.
* Anything that yields batches is accepted as it is: a ``torch.utils.data.DataLoader``
  over a map-style or iterable dataset, a Hugging Face ``datasets.Dataset`` (wrapped in a
  DataLoader with :func:`collate`), or any re-iterable of batches. A batch is a tuple
  ``(inputs..., target)`` or a dict in Hugging Face style (``input_ids``, ``attention_mask``,
  ..., ``labels``) whose other keys are passed to the models by keyword.
* The fast in-memory path, a :class:`~talkingmodels.splits.Split` of tensors, is in
  :mod:`talkingmodels.splits`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch

from talkingmodels.errors import UserError
from talkingmodels.states import TopK

LABEL_KEYS = ("labels", "label")  # where a dict batch keeps its targets


class LazyRows(Mapping):
    """A batch's rows of a split's teacher cache, each entry gathered when first read: a
    method that needs only the teacher's output does not pay for copying its states."""

    def __init__(self, source: Mapping[str, torch.Tensor], take: Callable[[torch.Tensor], torch.Tensor]):
        self._source, self._take, self._rows = source, take, {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._rows:
            self._rows[key] = self._take(self._source[key])
        return self._rows[key]

    def __contains__(self, key) -> bool:
        return key in self._source

    def __iter__(self):
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def teacher_cached(holder, layers) -> bool:
    """Whether ``holder`` (a :class:`Split` or :class:`Batch`) has the frozen teacher's
    states at ``layers`` and its output in its ``teacher_cache``."""
    return all(key in holder.teacher_cache for key in (*layers, "output"))


def _move(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


@dataclass
class Batch:
    """One mini-batch. Each model gets its own inputs (a task may resize or normalise
    differently for the teacher), positional and by keyword; ``teacher_cache`` holds
    precomputed teacher outputs (states by layer name, ``"output"``) when they are cached."""

    student_inputs: tuple[torch.Tensor, ...]
    teacher_inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor
    teacher_cache: Mapping[str, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None  # the examples' rows in their split (memory-bank methods)
    lengths: torch.Tensor | None = None  # real tokens per example, for batches of sequences
    student_kwargs: dict = field(default_factory=dict)
    teacher_kwargs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.target)

    def run_student(self, model):
        return model(*self.student_inputs, **self.student_kwargs)

    def run_teacher(self, model):
        return model(*self.teacher_inputs, **self.teacher_kwargs)

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``; cached teacher rows are moved when a method reads them
        (``index`` stays where it is: memory-bank methods draw on the CPU)."""
        if all(t.device == torch.device(device) for t in (self.target, *self.student_inputs)):
            return self
        return replace(
            self,
            student_inputs=tuple(_move(x, device) for x in self.student_inputs),
            teacher_inputs=tuple(_move(x, device) for x in self.teacher_inputs),
            target=self.target.to(device),
            teacher_cache=LazyRows(self.teacher_cache, lambda x: x.to(device)),
            lengths=_move(self.lengths, device),
            student_kwargs={k: _move(v, device) for k, v in self.student_kwargs.items()},
            teacher_kwargs={k: _move(v, device) for k, v in self.teacher_kwargs.items()})

    def shard(self, index: int, count: int) -> Batch:
        """Every ``count``-th example from the ``index``-th on: process ``index``'s part of
        a global batch (see :meth:`Split.batches`)."""
        return self if count == 1 else self.rows(slice(index, None, count))

    def rows(self, index: torch.Tensor | slice) -> Batch:
        """The examples ``index`` (a slice or an index tensor) of the batch, every per-example
        tensor (inputs, target, cached teacher rows, lengths) cut alike."""

        def take(x):  # (an index on the GPU still cuts the CPU-side index of the rows)
            if isinstance(x, TopK):
                return x[index.to(x.device) if isinstance(index, torch.Tensor) else index]
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                return x
            return x[index.to(x.device) if isinstance(index, torch.Tensor) else index]

        return replace(
            self, student_inputs=tuple(take(x) for x in self.student_inputs),
            teacher_inputs=tuple(take(x) for x in self.teacher_inputs), target=take(self.target),
            teacher_cache=LazyRows(self.teacher_cache, take), index=take(self.index),
            lengths=take(self.lengths),
            student_kwargs={k: take(v) for k, v in self.student_kwargs.items()},
            teacher_kwargs={k: take(v) for k, v in self.teacher_kwargs.items()})


def _right_padded_lengths(mask) -> torch.Tensor | None:
    """Real tokens per row of a (batch, tokens) attention mask when every row's real tokens
    come first (right padding), else None (the pooling then uses every position)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    lengths = mask.sum(1)
    expected = torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]
    return lengths if bool((mask.bool() == expected).all()) else None


def to_batch(item) -> Batch:
    """One batch from a loader as a :class:`Batch` (both models get the same inputs)."""
    if isinstance(item, Batch):
        return item
    batch = _from_loader(item)
    rows = len(batch.target) if batch.target.dim() else 0
    for name, x in {**{f"input {i}": x for i, x in enumerate(batch.student_inputs)},
                    **{f"input {k!r}": v for k, v in batch.student_kwargs.items()}}.items():
        if isinstance(x, torch.Tensor) and x.dim() and len(x) != rows:
            raise UserError(f"a batch's {name} has {len(x)} rows but its targets have {rows}; "
                            "inputs and targets must have one row per example")
    return batch


def _from_loader(item) -> Batch:
    if isinstance(item, Mapping):
        key = next((k for k in LABEL_KEYS if k in item), None)
        if key is None:
            raise UserError(f"a dict batch needs its targets under 'labels' (or 'label'); this "
                            f"batch has the keys: {', '.join(map(str, item))}")
        kwargs = {k: v for k, v in item.items() if k not in LABEL_KEYS}
        return Batch((), (), torch.as_tensor(item[key]), lengths=_right_padded_lengths(
            kwargs.get("attention_mask")), student_kwargs=kwargs, teacher_kwargs=kwargs)
    if isinstance(item, (tuple, list)):
        if len(item) < 2 or not all(isinstance(x, torch.Tensor) for x in item):
            kinds = ", ".join(type(x).__name__ for x in item)
            raise UserError(f"a tuple batch must be (inputs..., target), at least two tensors; "
                            f"got {len(item)} item(s) ({kinds})")
        inputs, target = tuple(item[:-1]), item[-1]
        return Batch(inputs, inputs, target)
    raise UserError(f"a batch must be a tuple (inputs..., target), a dict with 'labels' or a "
                    f"Batch; got {type(item).__name__}")


def collate(rows: list) -> dict | tuple:
    """Hugging Face-style rows (dicts) or tuples into one batch: tensors and numbers are
    stacked, 1-D sequences of different lengths right-padded with 0 (``attention_mask``
    too, so padding is marked); text columns are dropped (the models read token ids)."""
    if isinstance(rows[0], Mapping):
        out = {}
        for key in rows[0]:
            values = [row[key] for row in rows]
            if isinstance(values[0], str) or (isinstance(values[0], list) and values[0]
                                              and isinstance(values[0][0], str)):
                continue
            out[key] = _stack([torch.as_tensor(v) for v in values])
        return out
    return tuple(_stack([torch.as_tensor(v) for v in column]) for column in zip(*rows, strict=True))


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    if all(v.shape == values[0].shape for v in values):
        return torch.stack(values)
    if all(v.dim() == 1 for v in values):
        return torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=0)
    raise UserError(f"cannot collate examples of shapes {sorted({tuple(v.shape) for v in values})}")


def is_hf_dataset(data) -> bool:
    """A Hugging Face ``datasets.Dataset`` (recognised without importing ``datasets``)."""
    return type(data).__module__.split(".")[0] == "datasets" and hasattr(data, "with_format")


def as_loader(data, batch_size: int, shuffle: bool, generator: torch.Generator | None = None):
    """What the engine iterates: a :class:`Split` or any iterable of batches as it is; a
    Hugging Face or map-style ``Dataset`` in a DataLoader with :func:`collate`."""
    from talkingmodels.splits import Split  # (splits builds on this module's Batch)

    if isinstance(data, Split):
        return data
    hf = is_hf_dataset(data)
    if hf or (isinstance(data, torch.utils.data.Dataset)
              and not isinstance(data, torch.utils.data.IterableDataset)):
        return torch.utils.data.DataLoader(data.with_format("torch") if hf else data,
                                           batch_size=batch_size, shuffle=shuffle,
                                           collate_fn=collate, generator=generator)
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise UserError(f"data must be a Split, a DataLoader, a Dataset or an iterable of "
                        f"batches; got {type(data).__name__}")
    if isinstance(data, Iterator):
        raise UserError(f"data must be re-iterable (one pass per epoch): got a one-shot "
                        f"{type(data).__name__}; pass a DataLoader or a list of batches")
    return data


def iterate(data, batch_size: int, generator: torch.Generator | None = None,
            shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
    """The batches of ``data`` (see :func:`as_loader`) as :class:`Batch` es; a Split's in
    an order drawn from ``generator``, a loader's in its own order."""
    from talkingmodels.splits import Split

    if isinstance(data, Split):
        yield from data.batches(batch_size, generator, shard)
        return
    for item in data:
        yield to_batch(item).shard(*shard)
