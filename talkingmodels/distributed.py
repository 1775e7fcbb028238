"""Multi-process training on PyTorch DDP through Hugging Face accelerate (gloo on CPU).

Started by a launcher (``accelerate launch --multi_gpu --num_processes N -m talkingmodels
run CONFIG`` or ``torchrun --nproc_per_node N -m talkingmodels run CONFIG``), every process
runs the same grid. Each global batch is cut into one shard per process and DDP averages
the gradients, so all processes hold identical weights after every step and take the same
early-stopping decisions. Only the main process writes (checkpoints, results, logs).
Without a launcher (``WORLD_SIZE`` unset or 1) nothing here is used.
"""

from __future__ import annotations

import contextlib
import os
from functools import cache

import torch


@cache
def accelerator():
    """The process group's Accelerator, or None in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # cpu=True: the engine keeps its tensors on the CPU (gloo backend). Some methods leave
    # parameters unused in a stage (fitnet's hint stage), which DDP must be told about.
    return Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def shutdown() -> None:
    """Tear the process group down before the interpreter exits: left to interpreter
    shutdown, gloo's threads can abort a process that has finished all its work."""
    if accelerator() is not None and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main() -> bool:
    acc = accelerator()
    return acc is None or acc.is_main_process


def shard() -> tuple[int, int]:
    """(this process's index, number of processes)."""
    acc = accelerator()
    return (0, 1) if acc is None else (acc.process_index, acc.num_processes)


def barrier() -> None:
    if accelerator() is not None:
        accelerator().wait_for_everyone()


@contextlib.contextmanager
def main_first():
    """The main process runs the block first (e.g. building a cache), then the others."""
    acc = accelerator()
    if acc is None:
        yield
    else:
        with acc.main_process_first():
            yield


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum or min of ``tensor`` over the processes (itself in a single process)."""
    if accelerator() is None:
        return tensor
    tensor = tensor.clone()
    ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN}
    torch.distributed.all_reduce(tensor, op=ops[op])
    return tensor
