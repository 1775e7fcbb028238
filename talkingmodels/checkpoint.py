"""A run's training state on disk, for exact resume: what a checkpoint holds (the method's
own weights, the optimiser, the data order of a Split or a DataLoader, the CPU and CUDA
RNGs, the run's progress and best-so-far), writing it atomically, reading it back verified
(readable, written by a run with the same settings, of the same model), and the SIGINT /
SIGTERM requests that make the training loop (:mod:`talkingmodels.engine`) save it at a step
boundary."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from talkingmodels.errors import UserError
from talkingmodels.io import atomic_save


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loader_generators(data) -> list[torch.Generator]:
    """The generators a DataLoader draws its order from (its own, its sampler's), besides the
    global one: a checkpoint saves their states, so a resumed run sees the same order."""
    found = []
    for owner in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None),
                  getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def order_state(order: torch.Generator, data) -> dict:
    """Where the data order stands: the Split order's generator, a loader's generators and
    the global RNG (a loader without a generator of its own draws from it)."""
    return {"order": order.get_state(), "loader": [g.get_state() for g in loader_generators(data)],
            "rng": rng_state()}


def set_order_state(order: torch.Generator, data, state: dict) -> None:
    order.set_state(state["order"])
    for generator, saved in zip(loader_generators(data), state["loader"], strict=False):
        generator.set_state(saved)
    set_rng_state(state["rng"])


def save(path: Path, method, optimizer, order: torch.Generator, data, run: dict,
         fingerprint: dict | None, scaler, **extra) -> None:
    """Write everything a checkpoint holds to ``path``, atomically (``extra``: a paused
    epoch's ``partial``). Frozen modules (the teacher) are left out: they never change, and
    they can be large."""
    frozen = tuple(f"{name}." for name in method.frozen_modules())
    own = {k: v for k, v in method.state_dict().items() if not k.startswith(frozen or ("\0",))}
    atomic_save({"method": own, "optimizer": optimizer.state_dict(), "order": order.get_state(),
                 "loader": [g.get_state() for g in loader_generators(data)],
                 "rng": rng_state(), "run": run, "fingerprint": fingerprint,
                 "scaler": scaler.state_dict() if scaler is not None else None, **extra}, path)


def changes(old, new, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix or "(value)"]
    return [change for key in sorted(set(old) | set(new), key=str)
            for change in changes(old.get(key), new.get(key), f"{prefix}.{key}".lstrip("."))]


def load_checkpoint(path: Path, fingerprint: dict | None = None) -> dict:
    """A checkpoint's state, verified: readable, and written by a run with the same
    ``fingerprint`` (the settings that shape the run) when both have one."""
    try:
        saved = torch.load(path, weights_only=False)
    except Exception as exc:  # truncated or corrupted: never resume from it silently
        raise UserError(f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to "
                        "start this run again") from None
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {path} is not a talkingmodels checkpoint; delete it to start "
                        "this run again")
    if saved.get("fingerprint") is not None and fingerprint is not None:
        changed = changes(saved["fingerprint"], fingerprint)
        if changed:
            raise UserError(f"checkpoint {path} was written by a run with other settings "
                            f"(changed: {', '.join(changed)}); use --force to start over")
    return saved

def restore(path: Path, fingerprint: dict | None, method, order: torch.Generator, data,
            scaler) -> dict:
    """Load the checkpoint at ``path`` into the method (its own weights), the data order and
    the RNGs, and the gradient scaler; the saved state (its ``run``, ``optimizer`` and
    ``partial`` are for the loop)."""
    saved = load_checkpoint(path, fingerprint)
    keys = method.load_state_dict(saved["method"], strict=False)
    frozen = tuple(f"{name}." for name in method.frozen_modules()) or ("\0",)
    if keys.unexpected_keys or any(not k.startswith(frozen) for k in keys.missing_keys):
        raise UserError(f"checkpoint {path} belongs to another model or method")
    set_order_state(order, data, saved)
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    return saved


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the run's state was saved at a step boundary."""


@contextlib.contextmanager
def stop_requests(enabled: bool):
    """While training with a checkpoint, SIGINT/SIGTERM only ask the loop to stop at the
    next step boundary (so the state it saves is consistent)."""
    flag = {"stop": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def ask(_signum, _frame):
        flag["stop"] = True

    for sig in previous:
        signal.signal(sig, ask)
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
