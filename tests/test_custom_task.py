"""The custom task on a saved Hugging Face DatasetDict: the user's models by import path read
the dataset's columns by keyword."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from torch import nn

from talkingmodels import cli


class Net(nn.Module):
    """Reads the dataset's column ``features`` by keyword."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, 2)

    def forward(self, features):
        return self.head(self.layers(features))


def test_a_saved_hugging_face_dataset_trains_through_the_command_line(tmp_path):
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 20, generator=g)
    y = (x[:, :5].sum(1) > 0).long()
    parts = {name: datasets.Dataset.from_dict({"features": x[rows].tolist(), "labels": y[rows].tolist()})
             for name, rows in (("train", slice(0, 200)), ("validation", slice(200, 250)),
                                ("test", slice(250, 300)))}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "data"))
    config = {"task": "custom", "seeds": 1, "train": {"epochs": 15, "lr": 0.01, "batch_size": 32},
              "methods": [{"name": "scratch"}, {"name": "td", "message_dim": 4}],
              "task_options": {"teacher": {"class": "tests.test_custom_task:Net", "args": {"width": 32}},
                               "student": {"class": "tests.test_custom_task:Net", "args": {"width": 8}},
                               "data": {"hf_dataset": str(tmp_path / "data")},
                               "student_layers": ["layers.1", "layers.3"],
                               "teacher_layers": ["layers.1", "layers.3"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"scratch", "td"} and all(r["status"] == "ok" for r in rows.values())
    assert float(rows["scratch"]["value"]) > 0.7  # the student learned from the dataset's columns
    # a folder without the splits is one clear error
    datasets.DatasetDict({"train": parts["train"]}).save_to_disk(str(tmp_path / "partial"))
    config["task_options"]["data"] = {"hf_dataset": str(tmp_path / "partial")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out2")]) == 2
