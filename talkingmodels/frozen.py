"""What a task needs around a frozen pre-trained teacher: a linear-probe head for the
downstream labels, and the teacher's states cached on disk.

A frozen teacher with a deterministic input transform gives the same states for the same
inputs in every run, so a task computes them once per data set (states at the tapped
layers ``l`` and ``h`` and the pooled features the probe reads) and every method and seed
reuses them; only TD's interpretation step still runs teacher layers while training.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import mmap
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from talkingmodels import losses, taps
from talkingmodels.io import atomic_write
from talkingmodels.probes import libc
from talkingmodels.splits import TokenStates, TokenTopK
from talkingmodels.states import TopK

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def release_pages(tensor: torch.Tensor) -> None:
    """Give the pages of ``tensor``, a read-only view of a memory-mapped cache file, back to
    the operating system (Linux ``madvise(MADV_DONTNEED)``; elsewhere nothing happens). The
    file is mapped privately and never written, so the next read pages the same bytes in
    again from the file (usually still in the page cache). Only for mapped caches: on
    ordinary memory this would zero the tensor."""
    page = mmap.PAGESIZE
    storage = tensor.untyped_storage()
    # whole pages: the file is mapped from a page boundary and to the end of its last page
    start = storage.data_ptr() // page * page
    end = -(-(storage.data_ptr() + storage.nbytes()) // page) * page
    if (c := libc()) is not None and hasattr(mmap, "MADV_DONTNEED"):
        c.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def _states(stored: dict, layers: tuple[str, ...], n: int, dtype: torch.dtype) -> dict:
    """A cache file's content as states: packed token states (a ``"lengths"`` entry) as
    :class:`~talkingmodels.splits.TokenStates`; checked against what was asked (a wrong row
    count, dtype or token count raises)."""
    lengths = stored.get("lengths")  # (a task packs every token state it stores)
    result = {"features": stored["features"]}
    for layer in layers:
        value = stored[layer]
        if value.dtype != dtype:
            raise ValueError(f"{layer} is {value.dtype}, not {dtype}")
        if lengths is not None:
            value = TokenStates(value, lengths, int(stored["width"]), release=release_pages)
        result[layer] = value
    if any(len(value) != n for value in result.values()):
        raise ValueError("unexpected row count")
    return result


# safetensors' names of the dtypes a cache holds
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}
ALIGN, PAD = 64, "__pad__"  # where a cache file's tensors start; the name of the padding


@torch.no_grad()
def _captured(teacher: nn.Module, layers: tuple[str, ...], key: str,
              runs: Iterable[tuple[int, torch.Tensor | None, Callable[[], torch.Tensor]]],
              cast: torch.dtype | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor], set[str]]]:
    """(first row, {name: value}, the names of packed token states) per batch of ``runs``
    ((first row, the batch's real tokens per sequence or None, a call running the teacher
    on it)): the teacher's states at ``layers`` (cast to ``cast`` if given; token states
    packed: the batch's real tokens, in order) and what the call returns, under ``key``, in
    its own dtype."""
    teacher.eval()
    for start, lengths, run in runs:
        with taps.capture(teacher, layers) as states:
            out = run()  # (a dict: several outputs by name, e.g. a top-k's values and indices)
        outputs = out if isinstance(out, dict) else {key: out}
        values, tokens = {}, set()
        for name, value in {**{layer: states[layer] for layer in layers}, **outputs}.items():
            value = value.cpu()
            # (per-token outputs, a causal LM's, are packed too; pooled ones are 2-D)
            if lengths is not None and value.dim() == 3:
                value = value[torch.arange(value.shape[1]) < lengths.cpu()[:, None]]
                tokens.add(name)
            values[name] = value if name in outputs or cast is None else value.to(cast)
        yield start, values, tokens


def _write(path: Path, batches: Iterator[tuple[int, dict[str, torch.Tensor], set[str]]], n: int,
           lengths: torch.Tensor | None, width: int | None) -> None:
    """Write the states of ``batches`` (first row, {name: value}, packed names; in order, the
    ``n`` rows of a split) each straight to its place in the file as it comes (safetensors
    layout: a JSON header of names, dtypes, shapes and byte ranges, then the data),
    atomically. No more than one batch's states is ever held in memory (holding the split's
    whole states while they fill cost the text bench 0.7 GiB). Packed token states keep the
    split's ``lengths`` and padded ``width`` beside them, and their names in the metadata."""
    first_start, first, tokens = next(batches)
    # packed token states: where each sentence's tokens start, and the split's lengths and
    # padded width to unpack them (TokenStates)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]) if tokens else None
    small = {"lengths": lengths.clone(), "width": torch.tensor(width)} if tokens else {}
    shapes = {**{name: tuple(value.shape) for name, value in small.items()},
              **{name: (int(offsets[-1]) if name in tokens else n, *value.shape[1:])
                 for name, value in first.items()}}
    dtypes = {name: value.dtype for name, value in {**small, **first}.items()}
    # Every tensor starts on a 64-byte boundary, as in torch's own files: a matrix product's
    # rounding can depend on where its input lies, so the same states at another alignment
    # could give other results. (safetensors allows no gaps: padding is a tensor of its own.)
    header, position = {"__metadata__": {"packed": json.dumps(sorted(tokens))}}, 0
    for name in shapes:
        if gap := -position % ALIGN:
            header[f"{PAD}{position}"] = {"dtype": "U8", "shape": [gap],
                                          "data_offsets": [position, position + gap]}
            position += gap
        size = math.prod(shapes[name]) * dtypes[name].itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtypes[name]], "shape": list(shapes[name]),
                        "data_offsets": [position, position + size]}
        position += size
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # (the data starts on a boundary too)
    base = 8 + len(text)

    def at(name: str, row: int) -> int:  # the byte where row `row` of `name` goes
        row_bytes = math.prod(shapes[name][1:]) * dtypes[name].itemsize
        return base + header[name]["data_offsets"][0] + row * row_bytes

    def write(handle):
        handle.write(len(text).to_bytes(8, "little") + text)
        handle.truncate(base + position)  # the file at its final size; the data fills it
        for name, value in small.items():
            handle.seek(at(name, 0))
            handle.write(_raw(value))
        for start, values, _ in itertools.chain([(first_start, first, tokens)], batches):
            for name, value in values.items():
                handle.seek(at(name, int(offsets[start]) if name in tokens else start))
                handle.write(_raw(value))

    atomic_write(path, write)


def _raw(value: torch.Tensor):
    """A tensor's bytes in memory order (any dtype, bfloat16 included), as a buffer that
    ``write`` takes without another copy."""
    return value.contiguous().reshape(-1).view(torch.uint8).numpy()


def _read(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a cache file (safetensors), as read-only views of one private memory
    mapping of the file, and under ``"__packed__"`` the names of its packed token states; a
    file that is not whole (truncated, a header that does not match its data) raises
    ValueError."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length <= size - 8:
            raise ValueError("no safetensors header")
        header = json.loads(handle.read(length))
    packed = json.loads((header.pop("__metadata__", None) or {}).get("packed", "[]"))
    dtypes = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
    data = size - 8 - length
    if max((entry["data_offsets"][1] for entry in header.values()), default=0) != data:
        raise ValueError(f"the header describes another data size than the file's {data} bytes")
    flat = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    tensors = {}
    for name, entry in header.items():
        if name.startswith(PAD):
            continue
        begin, end = entry["data_offsets"]
        tensors[name] = flat[8 + length + begin: 8 + length + end].view(dtypes[entry["dtype"]]).view(
            entry["shape"])
    return {**tensors, "__packed__": packed}


def cached_states(path: Path, teacher: nn.Module, inputs: tuple[torch.Tensor, ...],
                  layers: tuple[str, ...], features: Callable[..., torch.Tensor], what: str = "",
                  batch_size: int = 250, lengths: torch.Tensor | None = None,
                  dtype: str = "float32") -> dict:
    """The teacher's states at ``layers`` and ``features(*inputs)`` (under key
    ``"features"``) for every row of ``inputs``: read from ``path`` when it holds them,
    else computed in batches and written there atomically. A file that cannot be read or
    holds something else is recomputed, never used.

    The file (safetensors) is written batch by batch as the states are computed, and
    memory-mapped, not read: only the rows a batch gathers are paged in, and
    the pages stay the operating system's to drop. The states are stored in ``dtype``
    (``float16`` halves them; the pooled features stay float32 for the probe). Given
    ``lengths`` (real tokens per right-padded sentence), token states are stored packed,
    real tokens only (:class:`~talkingmodels.splits.TokenStates`)."""
    n, cast = len(inputs[0]), CACHE_DTYPES[dtype]
    if path.is_file():
        try:
            return _states(_read(path), layers, n, cast)
        except Exception as exc:
            print(f"teacher cache {path} is unreadable ({exc}); recomputing", file=sys.stderr)
    print(f"computing the teacher's states on {n} {what} examples (cached afterwards)", file=sys.stderr)
    runs = ((start, None if lengths is None else lengths[start: start + batch_size],
             lambda batch=tuple(x[start: start + batch_size] for x in inputs): features(*batch))
            for start in range(0, n, batch_size))
    _write(path, _captured(teacher, layers, "features", runs, cast), n, lengths, inputs[0].shape[1])
    return _states(_read(path), layers, n, cast)


def _teacher_runs(teacher: nn.Module, split, batch_size: int, on_output: Callable | None = None):
    """(first row, real tokens per sequence or None, the teacher's output on it) per batch of
    ``split``, in order (see :func:`_captured`); ``on_output(output, batch)`` sees each."""
    device = next(teacher.parameters(), torch.empty(0)).device

    def run(batch):
        output = taps.prediction(batch.run_teacher(teacher))
        if on_output is not None:
            on_output(output, batch)
        return output

    start = 0
    for batch in split.batches(batch_size):
        yield start, batch.lengths, lambda batch=batch: run(batch.to(device))
        start += len(batch)


def write_teacher_cache(path: Path, teacher: nn.Module, split, layers: tuple[str, ...],
                        batch_size: int, top_k: int | None = None, tail: str = "renormalise",
                        dtype: str = "float32", on_output: Callable | None = None) -> dict:
    """The frozen teacher's states at ``layers`` and its output for every example of
    ``split``, computed in batches of ``batch_size`` and written batch by batch to ``path``
    (safetensors; token states of sequences stored without padding), then read back
    memory-mapped: what ``split.teacher_cache`` takes. The split's states are never all in
    memory at once. ``top_k``: a causal LM's output is stored as its ``top_k`` most likely
    next tokens per position (log-probabilities and token ids, a
    :class:`~talkingmodels.splits.TokenTopK` with ``tail``) instead of its logits. ``dtype``:
    the states' (and the top-k log-probabilities') dtype on disk (float16 halves them).
    ``on_output(output, batch)`` sees the teacher's output on each batch (a task measures
    the teacher's own metric in the same pass)."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True)
    width = None if split.lengths is None else int(split.lengths.max())
    cast = CACHE_DTYPES[dtype]
    runs = _teacher_runs(teacher, split, batch_size, on_output)
    if top_k is not None:
        runs = ((start, lengths, lambda run=run: _top_k(run(), top_k, cast)) for start, lengths, run in runs)
    _write(path, _captured(teacher, layers, "output", runs, None if dtype == "float32" else cast),
           len(split), split.lengths, width)
    return read_teacher_cache(path, tail)


def _top_k(logits: torch.Tensor, k: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    top = TopK.of(logits, k)
    return {"output": top.log_probs.to(dtype), "output_indices": top.indices.to(torch.int32)}


def read_teacher_cache(path: Path, tail: str = "renormalise") -> dict:
    """A file :func:`write_teacher_cache` wrote, memory-mapped, as a split's teacher cache."""
    stored = _read(path)
    packed, lengths, width = stored.pop("__packed__"), stored.pop("lengths", None), stored.pop("width", None)
    cache = {name: TokenStates(value, lengths, int(width), release=release_pages) if name in packed
             else value for name, value in stored.items()}
    if "output_indices" in cache:  # a top-k cache: the two halves are one distribution
        indices = cache.pop("output_indices")
        output = cache["output"]
        cache["output"] = (TokenTopK(output, indices, tail) if isinstance(output, TokenStates)
                           else TopK(output, indices, tail))
    return cache


def attach_probe(teacher: nn.Module, splits, layers: tuple[str, str],
                 outputs: Callable[[str, object, tuple[str, ...]], dict], classes: int) -> float:
    """The end of a frozen-teacher task's ``prepare()``: the teacher's states and pooled
    features on each split (``outputs(part, split, layers)``, ``part`` one of train, val,
    test; cached on disk by the task), a linear probe for the downstream labels fitted on
    the training split (its strength chosen on validation) and attached as ``teacher.probe``,
    the teacher frozen, and the training split's teacher cache filled (the states at
    ``layers`` and the probe's logits). Returns the probe's test accuracy."""
    pool = outputs("train", splits.train, layers)
    val = outputs("val", splits.val, ())
    test = outputs("test", splits.test, ())
    probe, _ = fit_probe(pool["features"], splits.train.target, val["features"], splits.val.target,
                         classes=classes)
    teacher.probe = probe
    teacher.eval().requires_grad_(False)
    with torch.no_grad():
        splits.train.teacher_cache = {layers[0]: pool[layers[0]], layers[1]: pool[layers[1]],
                                      "output": probe(pool["features"])}
        return float(losses.accuracy(probe(test["features"]), splits.test.target))


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, l2: float, classes: int) -> nn.Linear:
    """Multinomial logistic regression with an L2 penalty, by full-batch L-BFGS from zero
    (a convex problem: deterministic, no learning rate to tune)."""
    probe = nn.Linear(x.shape[1], classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def fit_probe(train: torch.Tensor, train_y: torch.Tensor, val: torch.Tensor, val_y: torch.Tensor,
              classes: int = 10) -> tuple[nn.Linear, float]:
    """A multinomial logistic regression on standardised features (L-BFGS, full batch),
    its L2 strength picked on the validation split. Returns the probe as one Linear on
    the raw features (the standardisation folded in) and its L2 strength."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    z_train, z_val = (train - mean) / std, (val - mean) / std
    best = None
    for l2 in (1e-4, 1e-3, 1e-2):
        probe = _logistic_regression(z_train, train_y, l2, classes)
        with torch.no_grad():
            score = float(losses.accuracy(probe(z_val), val_y))
        if best is None or score > best[0]:
            best = (score, l2, probe)
    _, l2, probe = best
    folded = nn.Linear(train.shape[1], classes)
    with torch.no_grad():
        folded.weight.copy_(probe.weight / std)
        folded.bias.copy_(probe.bias - (probe.weight * (mean / std)).sum(1))
    return folded, l2
