"""The interface of a benchmark task: its data, its teacher, its student, its metric.

A task never knows which method trains its student; it hands the engine a
:class:`Prepared` setting and the runner (:mod:`talkingmodels.runner`) does the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from talkingmodels import losses
from talkingmodels.errors import UserError
from talkingmodels.losses import Metric
from talkingmodels.splits import Splits
from talkingmodels.states import OutputKind


class TaskConfig(BaseModel):
    """Options every task accepts; subclasses add their own. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    data_dir: Path | None = None
    cache_dir: Path | None = None


class FrozenTeacherConfig(TaskConfig):
    """Options of a task whose frozen teacher's states are cached on disk."""

    cache_dtype: Literal["float32", "float16"] = Field(
        "float32", description="dtype of the cached teacher states (float16 halves the cache "
        "and the memory it maps; the probe's features stay float32)")


@dataclass
class Prepared:
    """One setting of a task, ready to train students on."""

    setting: str
    splits: Splits
    teacher: nn.Module  # frozen, in eval mode
    teacher_metric: float  # the teacher's metric on this setting's test split
    build_student: Callable[[], nn.Module]
    student_layers: tuple[str, str]
    teacher_layers: tuple[str, str]
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    output: OutputKind




class Task:
    name: ClassVar[str]
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    metric: ClassVar[Metric]
    output: ClassVar[OutputKind]
    default_settings: ClassVar[tuple[str, ...]]
    default_train: ClassVar[dict] = {}  # TrainConfig values for this task's students
    setting_train: ClassVar[dict[str, dict]] = {}  # ... and per setting, where they differ
    # Runs of tiny models: a grid defaults to one run per core, one thread each.
    tiny_models: ClassVar[bool] = False
    # The bench grid: label -> method options (the paper's baselines and TD by default).
    default_methods: ClassVar[dict[str, dict]] = {
        "scratch": {}, "logit-kd": {}, "feature-kd": {}, "fitnet": {}, "hybrid": {}, "td": {}}
    # Names of the classes by index, for the report's per-class tables (classification).
    class_names: ClassVar[tuple[str, ...]] = ()
    # This task's defaults for a method's options, under whatever a config gives (where a
    # method's general default does not suit the task's size, e.g. a shorter hint stage).
    method_options: ClassVar[dict[str, dict]] = {}
    # Where the ablation suite runs (suites.py): the cheaper settings of a costly task.
    ablation_settings: ClassVar[tuple[str, ...] | None] = None  # None: default_settings
    # Where the research suite runs: the settings TD's premise is about (capacity gap, little
    # data, logits weaker than features); () for a task without them.
    research_settings: ClassVar[tuple[str, ...]] = ()
    # Whether `bench` runs it (a task of fixed data and models; `custom` is the user's own).
    benchmark: ClassVar[bool] = True
    # The capacity-gap settings: any setting + "-NAME" trains the student with these fields
    # of the task's student spec replaced, e.g. "tiny" (about 10x smaller) or "wide" ({}: none).
    student_sizes: ClassVar[dict[str, dict]] = {}

    def __init__(self, config: TaskConfig):
        self.config = config

    def settings(self) -> list[str]:
        """Every valid setting name."""
        raise NotImplementedError

    def check_setting(self, setting: str) -> str:
        core, tiny = self.split_tiny(setting)
        valid = self.settings()
        lookup = {s.lower(): s for s in valid}
        if core.lower() not in lookup:
            raise UserError(f"unknown {self.name} setting {setting!r}; valid settings: {', '.join(valid)}")
        return lookup[core.lower()] + tiny

    def split_tiny(self, setting: str) -> tuple[str, str]:
        """(the setting without its student-size suffix, the suffix ("-tiny", "-wide") or ""):
        a capacity-gap setting is its plain setting's data with another student."""
        for size in self.student_sizes:
            if setting.lower().endswith(f"-{size}"):
                return setting[: -len(size) - 1], f"-{size}"
        return setting, ""

    def student_spec(self, spec: BaseModel, setting: str) -> BaseModel:
        """The student's spec for ``setting``: the configured one, or on a "-NAME" setting
        the same with ``student_sizes[NAME]``'s fields."""
        suffix = self.split_tiny(setting)[1]
        if not suffix:
            return spec
        return type(spec).model_validate({**spec.model_dump(), **self.student_sizes[suffix[1:]]})

    def tiny_text(self) -> list[str]:
        """How ``settings()`` lists the capacity-gap settings ([] without other sizes)."""
        return [f"SETTING-{size} (any setting with the student's "
                f"{', '.join(f'{k} {v}' for k, v in fields.items())})"
                for size, fields in self.student_sizes.items()]

    def prepare(self, setting: str) -> Prepared:
        raise NotImplementedError

    def release(self) -> None:
        """Let go of what ``prepare`` loaded (models, data): the main process of a ``--jobs``
        grid does before its workers prepare their own. A task keeps what it loads on the
        instance and a fresh instance holds none of it, so a fresh start is the release."""
        self.__init__(self.config)

    def samples(self, model: nn.Module) -> dict[str, str] | None:
        """What ``model`` (a trained student or the teacher) makes of the task's fixed
        prompts, for the report (tasks that generate text); None: nothing to show."""
        return None

    def cache_dir(self) -> Path:
        if self.config.cache_dir is not None:
            return Path(self.config.cache_dir)
        if os.environ.get("TALKINGMODELS_CACHE"):
            return Path(os.environ["TALKINGMODELS_CACHE"])
        return Path.home() / ".cache" / "talkingmodels"


def search_data(data_dir: Path | None, defaults: list[Path], folder: str,
                holds: Callable[[Path], Path | None], what: str) -> tuple[Path | None, str]:
    """Where a task's files are: the first place, or its subfolder ``folder``, for which
    ``holds(directory)`` gives a path, among the ``data_dir`` a user named (alone: a named
    folder without the files is an error, never a silent fallback to other data), else
    ``$TALKINGMODELS_DATA`` and the task's own ``defaults``. Returns that path (None when
    nothing holds the files) and the places looked in, for the task's own message."""
    env = os.environ.get("TALKINGMODELS_DATA")
    places = [Path(data_dir)] if data_dir is not None else ([Path(env)] if env else []) + defaults
    for base in places:
        for directory in (base, base / folder):
            if (found := holds(directory)) is not None:
                return found, ", ".join(map(str, places))
    if data_dir is not None:
        state = "does not exist" if not Path(data_dir).exists() else f"does not hold {what}"
        raise UserError(f"data_dir {data_dir} {state}; point data_dir at the folder with the "
                        "files, or leave it out to use the packaged or cached copy")
    return None, ", ".join(map(str, places))


def sized_setting(setting: str, names) -> tuple[str, int | None] | None:
    """A setting ``NAME`` or ``NAME-N`` / ``NAME-Nk`` (train on N examples) with NAME one of
    ``names``: (NAME, N, or None for the plain name); None when it is neither."""
    match = re.fullmatch(rf"({'|'.join(map(re.escape, names))})(?:-([1-9]\d*)(k?))?", setting)
    if match is None:
        return None
    name, digits, thousands = match.groups()
    return name, (int(digits) * (1000 if thousands else 1) if digits else None)


def config_key(*parts) -> str:
    """A short stable hash of JSON-able parts: the cache key of a derived artefact."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ClassificationTask(Task):
    """A task whose student predicts class logits, scored by accuracy."""

    metric = losses.ACCURACY
    output = "classification"
