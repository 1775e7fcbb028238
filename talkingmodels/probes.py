"""What a run measures about itself besides its metric: the peak resident memory of a block
of code, and TensorBoard curves of every loss term."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import sys
from pathlib import Path


def _high_water_mark(reset: bool = False) -> float:
    """This process's peak resident memory in GiB: on Linux the kernel's high-water mark
    (VmHWM), which ``reset`` sets back to the current size; elsewhere the peak so far
    (ru_maxrss: KiB on Linux, bytes on macOS), which cannot be set back."""
    status = Path("/proc/self/status")
    if status.is_file():
        line = next((x for x in status.read_text().splitlines() if x.startswith("VmHWM:")), None)
        if line is not None:
            peak = int(line.split()[1]) / 1024**2  # kB
            if reset:
                with contextlib.suppress(OSError):
                    Path("/proc/self/clear_refs").write_text("5")
            return peak
    import resource

    scale = 1024**3 if sys.platform == "darwin" else 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


@functools.cache
def libc():
    """glibc, loaded once (None where there is none: then nothing is handed back)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_memory() -> None:
    """Hand freed memory back to the operating system: collect unreachable objects, then
    (glibc) trim the C heap. Freed tensors of a few MB are kept in the heap by the C
    allocator for reuse, so without it a long grid's process grows by each run's leftovers
    (text: 0.35 GiB over a domain's six runs)."""
    gc.collect()
    if (c := libc()) is not None and hasattr(c, "malloc_trim"):
        c.malloc_trim(0)


class PeakMemory:
    """The peak resident memory (``peak``, GiB) of this process over a block of code: a
    bench, one of its pieces, one run (worker processes: see :meth:`include`). The
    high-water mark is set back on entering, so that a block gets its own peak, not an
    earlier one's; blocks nest (an enclosing block keeps the peaks that its inner blocks
    set back)."""

    _open: list[PeakMemory] = []

    def __enter__(self) -> PeakMemory:
        self.peak = 0.0
        self._fold(reset=True)
        PeakMemory._open.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self._fold()
        PeakMemory._open.remove(self)

    @staticmethod
    def include(peak: float) -> None:
        """Count another process's peak (GiB; a worker's) in every open block: a block's
        peak is then that of its largest process."""
        for block in PeakMemory._open:
            block.peak = max(block.peak, peak)

    @staticmethod
    def _fold(reset: bool = False) -> None:
        mark = _high_water_mark(reset)
        for block in PeakMemory._open:  # (on entering, only the enclosing blocks are open)
            block.peak = max(block.peak, mark)


class TensorBoardLog:
    """Per-step loss terms and per-epoch losses and metrics of one run, as TensorBoard
    scalars. The writer opens at the first step, dropping any events a killed earlier
    attempt logged from that step on (so a resumed run's curves have no duplicates)."""

    def __init__(self, folder: Path | None):
        self.folder, self.writer = folder, None

    def _open(self, step: int):
        if self.writer is None and self.folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder), purge_step=step)
        return self.writer

    def step(self, step: int, terms: dict) -> None:
        if (writer := self._open(step)) is not None:
            for name, value in terms.items():
                writer.add_scalar(f"step/loss_{name}", value, step)

    def epoch(self, row: dict) -> None:
        if (writer := self._open(row["epoch"])) is not None:
            for name, value in row.items():
                if name not in ("epoch", "stage"):
                    writer.add_scalar(f"epoch/{name}", value, row["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
