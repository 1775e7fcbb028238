"""Device, precision and processes, through Hugging Face accelerate.

Every process trains through one ``accelerate.Accelerator``, single-process runs included:
it places the models and batches on the device (``cpu``, ``cuda``, ``cuda:N``; ``auto`` is
CUDA when available), runs the forward passes under autocast for ``bf16`` / ``fp16`` mixed
precision (fp16 with a gradient scaler) and, under a launcher, wraps the training step in
DDP (NCCL on GPUs, gloo on the CPU).

Started by a launcher (``accelerate launch --multi_gpu --num_processes N -m talkingmodels
run CONFIG`` or ``torchrun --nproc_per_node N -m talkingmodels run CONFIG``), every process
runs the same grid, each on its own device. Each global batch is cut into one shard per
process and DDP averages the gradients, so all processes hold identical weights after every
step and take the same early-stopping decisions. Only the main process writes (checkpoints,
results, logs).
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

from talkingmodels.errors import UserError

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
PRECISIONS = ("no", "bf16", "fp16")


def launched() -> bool:
    """Whether this process is one of several started by a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _state():
    """accelerate's process state (it joins the process group under a launcher: NCCL on
    GPUs, gloo on a machine without CUDA, which accelerate must be told)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def resolve_device(device: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` as a device this machine has; a clear error
    for one it does not. Under a launcher each process uses its own GPU (``cuda``)."""
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise UserError(f"unknown device {device!r}; valid devices: auto, cpu, cuda, cuda:N")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device {device!r} is not available: this machine has no CUDA device "
                        "(valid devices here: auto, cpu)")
    count = torch.cuda.device_count()
    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    if index >= count:
        raise UserError(f"device {device!r} does not exist: this machine has {count} CUDA "
                        f"device(s) (valid: cpu, cuda, {', '.join(f'cuda:{i}' for i in range(count))})")
    return torch.device("cuda", index)


def check_precision(device: torch.device, mixed_precision: str) -> None:
    """A clear error for a precision the device cannot run."""
    if mixed_precision not in PRECISIONS:
        raise UserError(f"unknown mixed_precision {mixed_precision!r}; valid: {', '.join(PRECISIONS)}")
    if mixed_precision == "fp16" and device.type == "cpu":
        raise UserError("mixed_precision 'fp16' needs a CUDA device (valid on the CPU: no, bf16)")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"mixed_precision 'bf16' is not supported by {torch.cuda.get_device_name(device)} "
                        "(valid on it: no, fp16)")


_current: dict = {}


def accelerator(device: str = "auto", mixed_precision: str = "no"):
    """This process's Accelerator for ``device`` and ``mixed_precision``, built on first use
    and rebuilt when a later run asks for other settings (accelerate keeps one state per
    process; in a single process it is reset, under a launcher the process group stays)."""
    key = (device, mixed_precision)
    if _current.get("key") == key:
        return _current["acc"]
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    if launched() and device.startswith("cuda"):
        device = "cuda"  # each process on the GPU of its local rank
    target = resolve_device(device)
    check_precision(target, mixed_precision)
    if _current:
        AcceleratorState._reset_state(reset_partial_state=not launched())
    if target.type == "cuda" and not launched():
        torch.cuda.set_device(target)  # accelerate places a single process on the current GPU
    # Some methods leave parameters unused in a stage (fitnet's hint stage), which DDP must
    # be told about.
    acc = Accelerator(cpu=target.type == "cpu", mixed_precision=mixed_precision,
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    _current.update(key=key, acc=acc)
    return acc


def shutdown() -> None:
    """Tear the process group down before the interpreter exits: left to interpreter
    shutdown, gloo's threads can abort a process that has finished all its work."""
    if launched() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main() -> bool:
    return not launched() or _state().is_main_process


def shard() -> tuple[int, int]:
    """(this process's index, number of processes)."""
    if not launched():
        return (0, 1)
    state = _state()
    return (state.process_index, state.num_processes)


def barrier() -> None:
    if launched():
        _state().wait_for_everyone()


@contextlib.contextmanager
def main_first():
    """The main process runs the block first (e.g. building a cache), then the others."""
    if not launched():
        yield
    else:
        with _state().main_process_first():
            yield


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum or min of ``tensor`` over the processes (itself in a single process)."""
    if not launched():
        return tensor
    tensor = tensor.to(_state().device)  # NCCL reduces tensors on the GPU
    ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN}
    reduced = tensor.clone()
    torch.distributed.all_reduce(reduced, op=ops[op])
    return reduced
