"""A stored student leaves the runs store as a deployable file: safetensors weights that load
into the task's student, and an ONNX graph whose outputs equal the student's (ONNX Runtime)."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from talkingmodels import cli
from talkingmodels.export import stored_student


@pytest.fixture(scope="module")
def store(task_options, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    config = {"task": "movielens", "settings": ["dense"], "seeds": 1, "methods": [{"name": "td"}],
              "train": {"epochs": 2, "batch_size": 64}, "task_options": copy.deepcopy(task_options)}
    (folder / "exp.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(folder / "exp.yaml"), "--out", str(folder / "out")]) == 0
    return folder / "out"


def test_safetensors_export_loads_into_the_tasks_student(store, tmp_path):
    assert cli.main(["export", str(store), "dense__td__0", "--out", str(tmp_path / "w.safetensors")]) == 0
    student, batch, _ = stored_student(store, "dense__td__0")
    fresh, _, _ = stored_student(store, "dense__td__0")
    for parameter in fresh.parameters():  # forget the weights, then load the exported ones
        torch.nn.init.zeros_(parameter)
    from talkingmodels.export import load_weights

    load_weights(fresh, tmp_path / "w.safetensors")
    assert torch.equal(fresh(*batch.student_inputs), student(*batch.student_inputs))
    assert not student.training


def test_onnx_runtime_gives_the_students_outputs(store, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "student.onnx"
    assert cli.main(["export", str(store), "dense__td__0", "--format", "onnx", "--out", str(path)]) == 0
    student, _, _ = stored_student(store, "dense__td__0")
    session = ort.InferenceSession(str(path))
    g = torch.Generator().manual_seed(0)
    users, items = torch.randint(0, 60, (37,), generator=g), torch.randint(0, 80, (37,), generator=g)
    names = [i.name for i in session.get_inputs()]
    (onnx_out,) = session.run(None, dict(zip(names, (users.numpy(), items.numpy()), strict=True)))
    with torch.no_grad():
        expected = student(users, items).numpy()
    assert onnx_out.shape == expected.shape == (37,)  # a batch size the export never saw
    assert abs(onnx_out - expected).max() < 1e-5


def test_export_mistakes_are_one_line(store, tmp_path, capsys):
    code = cli.main(["export", str(store), "dense__tdd__0", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown run 'dense__tdd__0'" in err and "dense__td__0" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "x").exists()
    assert cli.main(["export", str(tmp_path), "dense__td__0", "--out", str(tmp_path / "x")]) == 2
    assert "no results.csv" in capsys.readouterr().err


def test_the_store_keeps_safetensors_and_the_task_options(store, task_options):
    assert (store / "students" / "dense__td__0.safetensors").is_file()
    import json

    recorded = json.loads((store / "tasks.json").read_text())["movielens"]
    assert recorded["options"]["data_dir"] == task_options["data_dir"]
    assert recorded["settings"] == ["dense"] and recorded["methods"] == ["td"]
    student, _, _ = stored_student(store, "dense__td__0")
    assert sum(p.numel() for p in student.parameters()) > 0
