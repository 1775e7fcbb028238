"""A stored student as a deployable file: safetensors weights, or an ONNX graph.

``talkingmodels export RUN_DIR RUN_ID --format safetensors|onnx --out FILE``: the run's task
is rebuilt from the options the store recorded (``tasks.json``), its student architecture
built for the run's setting and loaded with the run's selected weights
(``students/RUN_ID.safetensors``). ONNX needs the ``onnx`` extra (onnx, onnxscript; ONNX
Runtime to run the graph); its inputs are the student's, with a dynamic batch dimension (and
a dynamic token dimension on sequence inputs).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch
from torch import nn

from talkingmodels.errors import UserError

FORMATS = ("safetensors", "onnx")


def save_weights(model: nn.Module, path: Path) -> Path:
    """``model``'s weights as safetensors, written atomically (a temporary file, renamed)."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_model

    load_model(model, str(path), strict=True)
    return model.eval()


def to_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path,
            sequence: bool = False) -> Path:
    """``model`` (in eval mode) as an ONNX graph with inputs ``input_0``, ``input_1``, ... and
    output ``output``; the batch dimension is dynamic, and the token dimension of 2-D inputs
    when ``sequence``."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs the onnx extra: pip install 'talkingmodels[onnx]'") from None
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    shapes = tuple({0: batch, **({1: tokens} if sequence and x.dim() == 2 else {})} for x in inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model.eval(), inputs, str(path), dynamo=True, dynamic_shapes=shapes,
                      input_names=[f"input_{i}" for i in range(len(inputs))],
                      output_names=["output"], verbose=False)
    return path


def _run_row(store: Path, run_id: str) -> dict:
    from talkingmodels.store import run_id_of

    results = store / "results.csv"
    if not results.is_file():
        raise UserError(f"no results.csv in {store}; run an experiment there first")
    with open(results, newline="") as handle:
        rows = {run_id_of(r["setting"], r["method"], r["seed"]): r for r in csv.DictReader(handle)
                if r.get("status", "ok") == "ok"}
    if run_id not in rows:
        valid = ", ".join(sorted(rows)[:8]) + (", ..." if len(rows) > 8 else "")
        raise UserError(f"unknown run {run_id!r} in {store}; finished runs: {valid}")
    return rows[run_id]


def stored_student(store: Path, run_id: str):
    """(the run's student with its selected weights, an example batch of the run's test
    split, whether its inputs are token sequences)."""
    from talkingmodels.config import validate
    from talkingmodels.store import read_tasks
    from talkingmodels.tasks import get_task

    store = Path(store)
    row = _run_row(store, run_id)
    weights = store / "students" / f"{run_id}.safetensors"
    if not weights.is_file():
        raise UserError(f"run {run_id!r} has no stored weights ({weights} is missing)")
    options = read_tasks(store).get(row["task"], {}).get("options", {})
    cls = get_task(row["task"])
    prepared = cls(validate(cls.Config, options, f"task_options ({row['task']})")).prepare(row["setting"])
    student = prepared.build_student()
    try:
        load_weights(student, weights)
    except RuntimeError as exc:
        raise UserError(f"the weights of run {run_id!r} do not fit the task's student: "
                        f"{str(exc).splitlines()[0]}") from None
    from talkingmodels.data import as_loader
    from talkingmodels.engine import first_batch

    batch = first_batch(as_loader(prepared.splits.test, 8, shuffle=False), 8)
    return student, batch, batch.lengths is not None


def export_run(store: Path, run_id: str, fmt: str, out: Path) -> Path:
    """Write the stored student of ``run_id`` to ``out`` as ``fmt`` (safetensors or onnx)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    from talkingmodels.store import check_rows  # (the store reads pandas: the bench extra's)

    check_rows(Path(store))  # (a store written twice: which copy's student is this?)
    student, batch, sequence = stored_student(Path(store), run_id)
    if fmt == "safetensors":
        return save_weights(student, Path(out))
    return to_onnx(student, batch.student_inputs, Path(out), sequence)
