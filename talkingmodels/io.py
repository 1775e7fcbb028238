"""Atomic file writes: a reader (or a run resumed after a crash) sees the old file or the
new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _replace(tmp: Path, path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, rename."""
    path = Path(path)
    _replace(path.with_name(path.name + ".tmp"), path, lambda handle: torch.save(obj, handle))


def atomic_write(path: Path, write) -> None:
    """``write(handle)`` into a temporary file (opened "wb"), fsync, rename."""
    path = Path(path)
    _replace(path.with_name(path.name + ".tmp"), path, write)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    _replace(path.with_name(path.name + ".tmp"), path, lambda handle: handle.write(text.encode()))


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG of 256 colours (a plot's lines and text need no more; a
    third of the size of matplotlib's RGBA file, the same to the eye), written atomically:
    the committed reports' plots stay small."""
    from io import BytesIO  # (the standard library's)

    from PIL import Image

    buffer = BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    image = Image.open(buffer).convert("RGB").quantize(256)
    atomic_write(path, lambda handle: image.save(handle, format="png", optimize=True))
