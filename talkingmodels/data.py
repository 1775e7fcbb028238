"""In-memory data splits and batches shared by every task, method and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """One mini-batch. Each model gets its own inputs (a task may resize or normalise
    differently for the teacher); ``teacher_cache`` holds precomputed teacher outputs
    (states by layer name, ``"output"``) when the task caches the frozen teacher."""

    student_inputs: tuple[torch.Tensor, ...]
    teacher_inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor
    teacher_cache: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Split:
    """A data split held as tensors; rows are examples."""

    student_inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor
    teacher_inputs: tuple[torch.Tensor, ...] | None = None  # None: same as the student's
    teacher_cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.target)

    def batch(self, index: torch.Tensor | slice) -> Batch:
        student = tuple(x[index] for x in self.student_inputs)
        teacher = student if self.teacher_inputs is None else tuple(x[index] for x in self.teacher_inputs)
        cache = {key: value[index] for key, value in self.teacher_cache.items()}
        return Batch(student, teacher, self.target[index], cache)

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
        index, count = shard
        for start in range(0, n, batch_size):
            yield self.batch(order[start : start + batch_size][index::count])


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
