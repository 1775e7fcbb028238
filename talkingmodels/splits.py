"""The fast in-memory path: a :class:`Split` holds a data split as tensors (batches gathered
by index, sentences of similar length grouped and cut to their longest, a frozen teacher's
states and outputs cached per row), and :class:`TokenStates` / :class:`TokenTopK` hold a
cache's per-token rows packed without their padding. What else the engine accepts, and the
:class:`~talkingmodels.data.Batch` a Split hands out, are in :mod:`talkingmodels.data`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from talkingmodels.data import Batch, LazyRows
from talkingmodels.errors import UserError
from talkingmodels.states import TopK


class TokenStates:
    """Per-token states of a split's sentences, packed: only the real tokens are stored
    (``values``: all sentences' real tokens one after another, (tokens, dim)), so a cache
    holds no padding. ``rows(index, keep)`` hands a batch's rows back as a (batch, keep, dim)
    tensor, zero at padding positions (losses on token states average over real tokens, so
    what padding holds never matters).

    ``release``: called with ``values`` after every batch of rows is handed out. A
    memory-mapped cache passes a function that gives the pages just read back to the
    operating system: an epoch reads every row once, and without it the whole file would
    stay resident until the run ends (0.65 GiB for the text bench's largest split)."""

    def __init__(self, values: torch.Tensor, lengths: torch.Tensor, width: int,
                 release: Callable[[torch.Tensor], None] | None = None):
        if int(lengths.sum()) != len(values):
            raise ValueError(f"{len(values)} packed tokens, but the lengths sum to {int(lengths.sum())}")
        self.values, self.lengths, self.width = values, lengths, int(width)
        self.offsets = lengths.cumsum(0) - lengths
        self.release = release

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), self.width, self.values.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def dim(self) -> int:
        return 3

    def rows(self, index: torch.Tensor | slice, keep: int | None = None) -> torch.Tensor:
        """Sentences ``index`` as (len(index), keep, dim), right-padded with zeros (``keep``:
        the padded width, by default the split's)."""
        lengths, offsets = self.lengths[index], self.offsets[index]
        positions = torch.arange(self.width if keep is None else keep)
        real = positions < lengths[:, None]
        out = self.values.new_zeros(len(lengths), len(positions), self.values.shape[1])
        out[real] = self.values[(offsets[:, None] + positions)[real]]
        if self.release is not None:
            self.release(self.values)
        return out

    __getitem__ = rows


class TokenTopK:
    """A split's packed top-k teacher distributions (see :class:`TokenStates`): per real
    token, the ``k`` largest log-probabilities and their token ids; ``rows(index, keep)``
    hands a batch's rows back as a :class:`~talkingmodels.states.TopK` (batch, keep, k)."""

    def __init__(self, log_probs: TokenStates, indices: TokenStates, tail: str = "renormalise"):
        self.log_probs, self.indices, self.tail = log_probs, indices, tail

    def __len__(self) -> int:
        return len(self.log_probs)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.log_probs.shape

    def dim(self) -> int:
        return 3

    def rows(self, index: torch.Tensor | slice, keep: int | None = None) -> TopK:
        return TopK(self.log_probs.rows(index, keep), self.indices.rows(index, keep), self.tail)

    __getitem__ = rows


def _as_tuple(inputs) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


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
    student_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)  # passed by keyword
    teacher_kwargs: dict[str, torch.Tensor] | None = None  # None: same as the student's

    # Shuffled sentences are sorted by length within groups of this many batches (as
    # Hugging Face's LengthGroupedSampler does): batches of similar lengths, still random.
    GROUP_BATCHES = 50

    def __post_init__(self):
        self.student_inputs = _as_tuple(self.student_inputs)  # Split(x, y) means Split((x,), y)
        if self.teacher_inputs is not None:
            self.teacher_inputs = _as_tuple(self.teacher_inputs)
        n = len(self.target)
        named = {**{f"input {i}": x for i, x in enumerate(self.student_inputs)},
                 **{f"teacher input {i}": x for i, x in enumerate(self.teacher_inputs or ())},
                 **{f"input {k!r}": v for k, v in {**self.student_kwargs,
                                                    **(self.teacher_kwargs or {})}.items()},
                 **({"lengths": self.lengths} if self.lengths is not None else {})}
        for name, tensor in named.items():
            if not isinstance(tensor, torch.Tensor):
                raise UserError(f"Split: {name} must be a tensor, got {type(tensor).__name__}")
            if len(tensor) != n:
                raise UserError(f"Split: {name} has {len(tensor)} rows but the target has {n}; "
                                "inputs and targets must have one row per example")

    def __len__(self) -> int:
        return len(self.target)

    def batch(self, index: torch.Tensor | slice) -> Batch:
        sequences = self.lengths is not None
        lengths = self.lengths[index] if sequences else None
        padded = self.student_inputs[0].shape[1] if sequences and self.student_inputs else None
        if sequences and padded is None:
            padded = next(iter(self.student_kwargs.values())).shape[1]
        keep = int(lengths.max()) if sequences else None

        def take(x):  # per-token tensors lose the padding columns past `keep`
            if isinstance(x, (TokenStates, TokenTopK)):
                return x.rows(index, keep)
            if sequences and x.dim() > 1 and x.shape[1] == padded:
                return x[index, :keep]
            return x[index]

        student = tuple(take(x) for x in self.student_inputs)
        teacher = student if self.teacher_inputs is None else tuple(take(x) for x in self.teacher_inputs)
        s_kwargs = {k: take(v) for k, v in self.student_kwargs.items()}
        t_kwargs = s_kwargs if self.teacher_kwargs is None else {
            k: take(v) for k, v in self.teacher_kwargs.items()}
        cache = LazyRows(self.teacher_cache, take)
        rows = index if isinstance(index, torch.Tensor) else torch.arange(len(self))[index]
        # (a causal LM's labels (n, seq) lose the padding columns too)
        return Batch(student, teacher, take(self.target), cache, rows, lengths, s_kwargs, t_kwargs)

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

    @classmethod
    def from_batches(cls, batches: Iterable[Batch]) -> Split:
        """One split from a pass over batches (e.g. a DataLoader, unshuffled): their rows
        concatenated; sequences of different lengths right-padded to the longest."""
        parts = list(batches)
        if not parts:
            raise UserError("the data yielded no batches")

        def cat(tensors):
            if tensors[0].dim() > 1 and len({t.shape[1] for t in tensors}) > 1:
                width = max(t.shape[1] for t in tensors)
                tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]))
                           for t in tensors]
            return torch.cat(tensors)

        first = parts[0]

        def joined(get):  # one tensor per position or key, over every batch
            if isinstance(get(first), dict):
                return {k: cat([get(b)[k] for b in parts]) for k in get(first)}
            return tuple(cat([get(b)[i] for b in parts]) for i in range(len(get(first))))

        shared = first.teacher_inputs is first.student_inputs
        return cls(joined(lambda b: b.student_inputs), cat([b.target for b in parts]),
                   None if shared else joined(lambda b: b.teacher_inputs),
                   lengths=cat([b.lengths for b in parts]) if first.lengths is not None else None,
                   student_kwargs=joined(lambda b: b.student_kwargs),
                   teacher_kwargs=None if first.teacher_kwargs is first.student_kwargs
                   else joined(lambda b: b.teacher_kwargs))


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
