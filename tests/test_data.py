"""Splits and batches: padded sequences batched by length without their padding, teacher
cache rows gathered on demand, example rows carried along."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from talkingmodels.data import LazyRows
from talkingmodels.splits import Split


def padded_split(n: int = 300, width: int = 12, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).long()
    ids = torch.randint(1, 100, (n, width), generator=g) * mask
    cache = {"layer": torch.randn(n, width, 4, generator=g), "output": torch.randn(n, 2, generator=g)}
    return Split((ids, mask), torch.randint(0, 2, (n,), generator=g), teacher_cache=cache,
                 lengths=lengths)


def test_batches_drop_the_padding_past_their_longest_sentence():
    split = padded_split()
    seen = []
    for batch in split.batches(16, torch.Generator().manual_seed(1)):
        ids, mask = batch.student_inputs
        longest = int(split.lengths[batch.index].max())
        assert ids.shape[1] == mask.shape[1] == longest  # no column of padding only
        assert batch.teacher_cache["layer"].shape[1] == longest  # per-token states alike
        assert batch.teacher_cache["output"].shape == (len(batch.index), 2)  # not per token
        assert torch.equal(ids, split.student_inputs[0][batch.index, :longest])
        seen += batch.index.tolist()
    assert sorted(seen) == list(range(len(split)))  # every example once per epoch


def test_length_grouping_is_random_but_seeded_and_saves_padding():
    split = padded_split()

    def epoch(seed):
        return [b.index.tolist() for b in split.batches(16, torch.Generator().manual_seed(seed))]

    assert epoch(3) == epoch(3)
    assert epoch(3) != epoch(4)
    grouped = sum(int(split.lengths[torch.tensor(b)].max()) * len(b) for b in epoch(3))
    plain = Split(split.student_inputs, split.target)  # no lengths: every batch full width
    assert grouped < 0.8 * sum(len(b.target) * 12 for b in plain.batches(16, torch.Generator()))


def test_a_split_without_lengths_batches_as_before():
    """Fixed-size inputs: the shuffled order is randperm's, unchanged (bench results stay)."""
    x = torch.arange(10).float()[:, None]
    split = Split((x,), torch.zeros(10))
    batches = [b.index.tolist() for b in split.batches(4, torch.Generator().manual_seed(0))]
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    assert batches == [order[0:4], order[4:8], order[8:10]]


def test_cache_rows_are_gathered_only_when_read():
    calls = []
    source = {"a": torch.arange(6.0), "b": torch.arange(6.0) * 2}

    def take(value):
        calls.append(value)
        return value[torch.tensor([1, 3])]

    rows = LazyRows(source, take)
    assert "a" in rows and "b" in rows and "c" not in rows and not calls  # no gathering
    assert torch.equal(rows["b"], torch.tensor([2.0, 6.0]))
    assert rows["b"] is rows["b"] and len(calls) == 1  # gathered once
    assert sorted(rows) == ["a", "b"] and len(rows) == 2


def _rss_file_mib() -> float:
    """This process's resident pages of mapped files (Linux), MiB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssFile:")[1].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_a_mapped_token_cache_gives_its_pages_back_while_an_epoch_reads_it(tmp_path):
    """Reading every row of a memory-mapped token cache (an epoch) keeps only the last
    batch's pages resident, and the rows read after a release are still exact. (Batches of
    4 sentences: a file just written may be paged in 2 MiB at a time.)"""
    from talkingmodels import frozen

    n, width, dim = 2048, 16, 512  # 64 MiB of float32 states, every token real
    values = torch.randn(n * width, dim, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "cache.safetensors"
    save_file({"states": values, "lengths": torch.full((n,), width), "width": torch.tensor(width),
               "features": torch.zeros(n, 1)}, path)
    mapped = frozen._states(frozen._read(path), ("states",), n, torch.float32)["states"]
    expected = values.view(n, width, dim)
    # (the first gather pages in parts of torch's own libraries: measured from after it)
    assert torch.equal(mapped.rows(torch.arange(4)), expected[:4])
    frozen.release_pages(mapped.values)
    before, grown = _rss_file_mib(), 0.0
    for rows in torch.randperm(n, generator=torch.Generator().manual_seed(1)).split(4):
        assert torch.equal(mapped.rows(rows), expected[rows])
        grown = max(grown, _rss_file_mib() - before)
    assert grown < 24, f"{grown:.0f} MiB of the 64 MiB file stayed resident"
