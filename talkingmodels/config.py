"""The validated experiment schema (YAML -> an :class:`Experiment` with every name resolved
and every option checked), and one clear line for the first mistake in any pydantic model.

Tasks and methods are looked up when a config is resolved (a method may be the import path of
the user's own ``Distiller``; the ``custom`` task takes models and data by import path), so the
one-call API can use :func:`validate` without loading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from talkingmodels import distributed
from talkingmodels.errors import UserError

if TYPE_CHECKING:
    from talkingmodels.engine import TrainConfig
    from talkingmodels.tasks import Task


def describe(error: ValidationError, where: str, model: type[BaseModel] | None = None) -> str:
    """One line for the first problem pydantic found, naming the valid keys on a typo."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden" and model is not None:
        valid = ", ".join(model.model_fields)
        return f"{where}: unknown key {loc!r}; valid keys: {valid}"
    return f"{where}: {loc}: {first['msg']} (got {first.get('input')!r})"


def validate(model: type[BaseModel], data, where: str):
    """``model`` validated from ``data``; a :class:`UserError` of one line otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise UserError(describe(error, where, model)) from None


class MethodEntry(BaseModel):
    """One method of the grid: a registered name, an optional label (to run variants of
    one method side by side) and that method's own options."""

    model_config = ConfigDict(extra="allow")
    name: str
    label: str | None = None

    @property
    def options(self) -> dict:
        return dict(self.model_extra or {})


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    settings: list[str] | None = Field(None, min_length=1, description="default: the task's own")
    task_options: dict = Field(default_factory=dict)
    methods: list[MethodEntry] | None = Field(None, min_length=1, description="default: the task's")
    seeds: int | list[int] = Field(3, description="a count (0..N-1) or an explicit list")
    train: dict = Field(default_factory=dict, description="TrainConfig values over the task's")
    out: Path | None = None

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("seeds must be at least 1")
        if isinstance(value, list) and not value:
            raise ValueError("seeds must not be empty")
        return value

    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


@dataclass
class Experiment:
    """A config with every name resolved and every option validated."""

    config: ExperimentConfig
    task: Task
    settings: list[str]
    methods: list[tuple[str, type, object]]  # (label, class, validated method config)
    train: dict[str, TrainConfig]  # per setting
    seeds: list[int]


def resolve(config: ExperimentConfig) -> Experiment:
    from talkingmodels.engine import TrainConfig
    from talkingmodels.methods import get_method
    from talkingmodels.tasks import get_task

    task_cls = get_task(config.task)
    task = task_cls(validate(task_cls.Config, config.task_options, f"task_options ({config.task})"))
    settings = [task.check_setting(s) for s in (config.settings or task.default_settings)]
    entries = config.methods or [MethodEntry(name=label.split(":")[0], label=label, **opts)
                                 for label, opts in task.default_methods.items()]
    methods, labels = [], set()
    for index, entry in enumerate(entries):
        cls = get_method(entry.name)
        options = validate(cls.Config, {**task.method_options.get(entry.name, {}), **entry.options},
                           f"methods[{index}] ({entry.name})")
        label = entry.label or entry.name
        if label in labels:
            raise UserError(f"methods[{index}]: label {label!r} is used twice; give each variant "
                            "its own 'label'")
        labels.add(label)
        methods.append((label, cls, options))
    # The task's defaults (per setting where they differ), under the config's own values.
    train = {s: validate(TrainConfig, {**task.default_train, **task.setting_train.get(s, {}),
                                       **config.train}, "train") for s in settings}
    for cfg in train.values():  # a device or precision this machine lacks: before any work
        distributed.check_precision(distributed.resolve_device(cfg.device), cfg.mixed_precision)
    return Experiment(config, task, settings, methods, train, config.seed_list())


def load_config(path: Path, overrides: dict | None = None, train: dict | None = None) -> Experiment:
    """Read, validate and resolve a YAML experiment; every mistake is one UserError line.
    ``overrides`` replace top-level keys, ``train`` values are set over the config's own."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a YAML mapping with at least a 'task' key")
    data.update(overrides or {})
    if train:
        if not isinstance(data.get("train", {}), dict):
            raise UserError(f"config {path}: train must be a mapping of training options")
        data["train"] = {**data.get("train", {}), **train}
    return resolve(validate(ExperimentConfig, data, f"config {path}"))
