"""Batches, and the data a user can hand the engine: any iterable of batches.

* :class:`Split` holds a split as tensors: the fast in-memory path (batches gathered by
  index, sentences of similar length grouped, a frozen teacher's states cached per row).
* Anything else that yields batches is accepted as it is: a ``torch.utils.data.DataLoader``
  over a map-style or iterable dataset, a Hugging Face ``datasets.Dataset`` (wrapped in a
  DataLoader with :func:`collate`), or any re-iterable of batches. A batch is a tuple
  ``(inputs..., target)`` or a dict in Hugging Face style (``input_ids``, ``attention_mask``,
  ..., ``labels``) whose other keys are passed to the models by keyword.
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
    if isinstance(data, Split):
        yield from data.batches(batch_size, generator, shard)
        return
    for item in data:
        yield to_batch(item).shard(*shard)


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
