"""In-memory data splits and batches shared by every task, method and the engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


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


@dataclass
class Batch:
    """One mini-batch. Each model gets its own inputs (a task may resize or normalise
    differently for the teacher); ``teacher_cache`` holds precomputed teacher outputs
    (states by layer name, ``"output"``) when the task caches the frozen teacher."""

    student_inputs: tuple[torch.Tensor, ...]
    teacher_inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor
    teacher_cache: Mapping[str, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None  # the examples' rows in their split (memory-bank methods)
    lengths: torch.Tensor | None = None  # real tokens per example, for batches of sequences


@dataclass
class Split:
    """A data split held as tensors; rows are examples.

    ``lengths`` marks a split of padded sequences (the real tokens per example; the inputs'
    second dimension is the padded length). Its shuffled batches then group sentences of
    similar length, and every batch drops the padding columns past its longest sentence,
    from the inputs and from the per-token teacher states alike: compute is spent on real
    tokens, not padding.
    """

    student_inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor
    teacher_inputs: tuple[torch.Tensor, ...] | None = None  # None: same as the student's
    teacher_cache: dict[str, torch.Tensor] = field(default_factory=dict)
    lengths: torch.Tensor | None = None

    # Shuffled sentences are sorted by length within groups of this many batches (as
    # Hugging Face's LengthGroupedSampler does): batches of similar lengths, still random.
    GROUP_BATCHES = 50

    def __len__(self) -> int:
        return len(self.target)

    def batch(self, index: torch.Tensor | slice) -> Batch:
        sequences = self.lengths is not None
        lengths = self.lengths[index] if sequences else None
        padded = self.student_inputs[0].shape[1] if sequences else None
        keep = int(lengths.max()) if sequences else None

        def take(x):  # per-token tensors lose the padding columns past `keep`
            if sequences and x.dim() > 1 and x.shape[1] == padded:
                return x[index, :keep]
            return x[index]

        student = tuple(take(x) for x in self.student_inputs)
        teacher = student if self.teacher_inputs is None else tuple(take(x) for x in self.teacher_inputs)
        cache = LazyRows(self.teacher_cache, take)
        rows = index if isinstance(index, torch.Tensor) else torch.arange(len(self))[index]
        return Batch(student, teacher, self.target[index], cache, rows, lengths)

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                shard: tuple[int, int] = (0, 1)):
        """Mini-batches in a random order drawn from ``generator`` (in order if None).

        With ``shard=(k, n)`` only every n-th example of each batch from the k-th on: the
        part of the global batch that process k of n trains on (the order is the same in
        every process, since every process seeds ``generator`` alike).
        """
        n = len(self)
        if generator is None:
            for start in range(0, n, batch_size):
                yield self.batch(slice(start, start + batch_size))
            return
        order = torch.randperm(n, generator=generator)
        groups = list(order.split(batch_size))
        if self.lengths is not None:
            grouped = order.split(batch_size * self.GROUP_BATCHES)
            # stable sort, longest first, so that the order depends on the generator only
            order = torch.cat([g[self.lengths[g].argsort(descending=True, stable=True)] for g in grouped])
            groups = list(order.split(batch_size))
            groups = [groups[i] for i in torch.randperm(len(groups), generator=generator)]
        index, count = shard
        for rows in groups:
            yield self.batch(rows[index::count])


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
