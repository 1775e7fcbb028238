"""The vision task: Fashion-MNIST (the Debian package's files), the frozen EfficientNet-Lite0
teacher with a linear probe, its on-disk state cache, and every method on spatial states.

Small settings keep it quick: 64 training images, 32 validation, 64 test, a 32 px teacher.
"""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from talkingmodels import runner
from talkingmodels.engine import TrainConfig, fit
from talkingmodels.errors import UserError
from talkingmodels.methods import METHODS
from talkingmodels.models import efficientnet_lite
from talkingmodels.tasks.vision import FashionVision, SmallCNN, StudentSpec, VisionConfig, find_data
from tests.conftest import train_one_epoch

SMALL = {"val_size": 32, "test_size": 64, "teacher_image_size": 32, "download": False}


def task(tmp_path, **options) -> FashionVision:
    return FashionVision(VisionConfig(**{**SMALL, "cache_dir": tmp_path / "cache", **options}))


@pytest.fixture
def teacher_calls(monkeypatch) -> list[int]:
    """Counts the images the backbone sees."""
    calls: list[int] = []
    features = efficientnet_lite.EfficientNetLite0.features

    def counted(self, x):
        calls.append(len(x))
        return features(self, x)

    monkeypatch.setattr(efficientnet_lite.EfficientNetLite0, "features", counted)
    return calls


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return task(tmp_path_factory.mktemp("vision")).prepare("fashion-64")


def test_splits(tmp_path):
    vision = task(tmp_path)
    small, smaller = vision.prepare("fashion-64"), vision.prepare("fashion-32")
    train, val, test = small.splits.train, small.splits.val, small.splits.test
    assert (len(train), len(val), len(test)) == (64, 32, 64)
    assert train.student_inputs[0].shape == (64, 1, 28, 28)
    assert 0 <= float(train.student_inputs[0].min()) and float(train.student_inputs[0].max()) <= 1
    assert set(train.target.tolist()) <= set(range(10))
    # nested subsets; validation images disjoint from the training images
    assert torch.equal(smaller.splits.train.student_inputs[0], train.student_inputs[0][:32])
    rows = {tuple(x.flatten().tolist()) for x in train.student_inputs[0]}
    assert not rows & {tuple(x.flatten().tolist()) for x in val.student_inputs[0]}
    assert vision.train_size("fashion") == 10_000 and vision.train_size("fashion-1k") == 1_000
    assert vision.train_size("fashion-2k") == 2_000


def test_the_teacher_is_frozen_and_probed(prepared):
    teacher = prepared.teacher
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    cache = prepared.splits.train.teacher_cache
    assert cache["backbone._blocks.10"].shape == (64, 112, 2, 2)  # 32 px: stride 16
    assert cache["backbone._blocks.15"].shape == (64, 320, 1, 1)
    with torch.no_grad():
        online = teacher(prepared.splits.train.student_inputs[0])
    assert torch.allclose(online, cache["output"], atol=1e-4)  # the cache is the teacher's
    # the probe fits its training images far better than chance
    assert (cache["output"].argmax(1) == prepared.splits.train.target).float().mean() > 0.5
    assert 0.1 < prepared.teacher_metric <= 1


def test_cache_is_reused_and_invalidated(tmp_path, teacher_calls):
    first = task(tmp_path).prepare("fashion-64")
    assert sum(teacher_calls) == 64 + 32 + 64  # train, val, test: computed once
    teacher_calls.clear()
    again = task(tmp_path).prepare("fashion-64")  # a new task object: from disk only
    assert teacher_calls == []
    for key, value in first.splits.train.teacher_cache.items():
        assert torch.equal(value, again.splits.train.teacher_cache[key])
    # another layer is another cache of the training states (validation and test images
    # only need the pooled features); another preprocessing is another cache of everything
    task(tmp_path, teacher_layers=("backbone._blocks.7", "backbone._blocks.15")).prepare("fashion-64")
    assert sum(teacher_calls) == 64
    teacher_calls.clear()
    task(tmp_path, teacher_image_size=48).prepare("fashion-64")
    assert sum(teacher_calls) == 64 + 32 + 64


def test_corrupt_cache_is_rebuilt_not_used(tmp_path, teacher_calls, capsys):
    first = task(tmp_path).prepare("fashion-64")
    # (copied before the files are damaged in place: their pages are mapped, not read)
    before = {key: value.clone() for key, value in first.splits.train.teacher_cache.items()}
    files = sorted((tmp_path / "cache" / "teacher-states").glob("*.safetensors"))
    assert len(files) == 3
    for path in files:
        path.write_bytes(path.read_bytes()[:200])  # truncated
    teacher_calls.clear()
    again = task(tmp_path).prepare("fashion-64")
    assert "unreadable" in capsys.readouterr().err
    assert sum(teacher_calls) == 64 + 32 + 64
    for key, value in before.items():
        assert torch.allclose(value, again.splits.train.teacher_cache[key])


def test_missing_and_malformed_data(tmp_path, monkeypatch):
    from talkingmodels.tasks import vision

    folder = tmp_path / "fm"
    shutil.copytree(find_data(VisionConfig(download=False), tmp_path), folder)  # the real files
    monkeypatch.setattr(vision, "SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(UserError, match="Fashion-MNIST not found.*nowhere.*dataset-fashion-mnist"):
        find_data(VisionConfig(download=False), tmp_path / "c")
    # a folder the user named is never silently replaced by the packaged data
    monkeypatch.undo()
    with pytest.raises(UserError, match="data_dir .*empty does not exist"):
        find_data(VisionConfig(data_dir=tmp_path / "empty", download=False), tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="data_dir .*empty does not hold Fashion-MNIST"):
        find_data(VisionConfig(data_dir=tmp_path / "empty"), tmp_path / "c")
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-10]))  # truncated
    with pytest.raises(UserError, match="malformed Fashion-MNIST file .*t10k-labels.*checksum"):
        task(tmp_path, data_dir=folder).prepare("fashion-64")


def test_settings_are_checked(tmp_path):
    vision = task(tmp_path)
    with pytest.raises(UserError, match="'fashion-x'.*fashion-1k"):
        vision.check_setting("fashion-x")
    with pytest.raises(UserError, match="'fashion-60k' asks for 60000 training images; at most 59968"):
        vision.check_setting("fashion-60k")


def test_tiny_settings_train_a_ten_times_smaller_student_on_the_same_data(tmp_path):
    """The capacity gap: "-tiny" on any setting keeps its images and shrinks the student."""
    vision = task(tmp_path)
    assert vision.check_setting("fashion-64-tiny") == "fashion-64-tiny"
    assert vision.train_size("fashion-1k-tiny") == 1_000
    plain, tiny = vision.prepare("fashion-64"), vision.prepare("fashion-64-tiny")
    assert torch.equal(plain.splits.train.student_inputs[0], tiny.splits.train.student_inputs[0])
    sizes = [sum(p.numel() for p in prep.build_student().parameters()) for prep in (plain, tiny)]
    assert 8 < sizes[0] / sizes[1] < 13
    with pytest.raises(UserError, match="'fashion-x-tiny'.*SETTING-tiny"):
        vision.check_setting("fashion-x-tiny")


def test_student_size_and_layers():
    student = SmallCNN(StudentSpec())
    assert 0.05e6 < sum(p.numel() for p in student.parameters()) < 0.3e6
    assert student(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_on_spatial_states(prepared, name):
    result, teacher_unchanged, student_moved = train_one_epoch(prepared, name, FashionVision.metric, 32)
    # one epoch of a few batches is no test of learning (the end-to-end test below is): every
    # weight of the student must have trained, the teacher none, and the result be a number
    assert student_moved and teacher_unchanged
    assert 0 < result.test <= 1 and 0 < result.val <= 1


def test_td_learns_on_fashion(tmp_path):
    prepared = task(tmp_path, test_size=500).prepare("fashion-512")
    cls = METHODS["td"]
    method = runner.build_method(prepared, cls, cls.Config(), seed=0)
    result = fit(method, prepared.splits, FashionVision.metric,
                 TrainConfig(epochs=4, batch_size=64, lr=2e-3), seed=0)
    assert result.test > 0.6  # chance is 0.1


def test_the_probe_is_fitted_on_training_images_only(tmp_path, probe_fits):
    """The teacher's probe sees the training split's features and labels only (its strength
    chosen on validation); the test images are never given to it."""
    prepared = task(tmp_path).prepare("fashion-64")
    ((train, train_y, val, val_y),) = probe_fits
    splits = prepared.splits
    assert torch.equal(train_y, splits.train.target) and len(train) == len(splits.train)
    assert torch.equal(val_y, splits.val.target) and len(val) == len(splits.val)
    with torch.no_grad():
        images = splits.train.student_inputs[0]
        teacher = prepared.teacher
        assert torch.allclose(train, teacher.backbone.features(teacher.prep(images)), atol=1e-5)


def test_a_run_records_per_class_test_and_validation_accuracy(prepared):
    """The report chooses "undistillable" classes on validation and scores them on test: a
    run's row carries both per-class accuracies."""
    import json

    from talkingmodels.analysis import class_accuracy
    from talkingmodels.inference import predict

    student = prepared.build_student().eval()
    row = runner.representation(prepared, student, {}, batch_size=64)
    for column, split in (("class_metric", prepared.splits.test), ("class_metric_val", prepared.splits.val)):
        expected = class_accuracy(predict(student, split), split.target)
        assert json.loads(row[column]) == {str(c): round(v, 6) for c, v in expected.items()}


def test_the_teachers_test_states_are_computed_in_small_batches(prepared, monkeypatch):
    """The teacher's pooled test states (for CKA) run in batches of at most 64: a large
    teacher's activations on a 512-example batch were the text bench's memory peak."""
    from talkingmodels import analysis

    sizes, pooled = {}, analysis.pooled_states

    def recording(model, layer, split, side="student", batch_size=1024):
        sizes[side] = batch_size
        return pooled(model, layer, split, side, batch_size)

    monkeypatch.setattr(analysis, "pooled_states", recording)
    runner.representation(prepared, prepared.build_student().eval(), {}, batch_size=512)
    assert sizes == {"teacher": runner.TEACHER_BATCH, "student": 512} and runner.TEACHER_BATCH <= 64
