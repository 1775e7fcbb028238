"""``custom``: the user's own teacher, student and data, named in the config.

```yaml
task: custom
task_options:
  teacher: {class: "my_pkg.nets:Teacher", args: {width: 128}, weights: teacher.safetensors}
  student: {class: "my_pkg.nets:Student", args: {width: 16}}
  data: {function: "my_pkg.data:loaders", args: {batch_size: 32}}   # -> (train, val, test)
  student_layers: [mix1, mix2]
  teacher_layers: [layers.1, layers.3]
  output: classification          # or regression, or causal-lm (next-token logits, labels)
  metric: accuracy                # or rmse, perplexity, next_token_accuracy, or an import path
                                  # of a talkingmodels Metric
```

``data`` is a function returning ``(train, val, test)``, each anything ``distill`` takes
(DataLoaders, Hugging Face datasets, Splits), or ``{hf_dataset: FOLDER}``: a Hugging Face
``DatasetDict`` saved with ``save_to_disk`` (splits ``train``, ``validation`` or ``val``,
``test``). The teacher is frozen; its test metric is reported where its output fits the task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from talkingmodels import losses
from talkingmodels.errors import UserError
from talkingmodels.plugins import ModelSpec, import_object
from talkingmodels.splits import Splits
from talkingmodels.tasks.base import Prepared, Task, TaskConfig
from talkingmodels.tasks.registry import register


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    function: str | None = Field(None, description="import path of a function returning "
                                 "(train, val, test)")
    args: dict = Field(default_factory=dict)
    hf_dataset: Path | None = Field(None, description="a DatasetDict folder (save_to_disk)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.function is None) == (self.hf_dataset is None):
            raise ValueError("give the data as either 'function' or 'hf_dataset'")
        return self


class CustomConfig(TaskConfig):
    teacher: ModelSpec
    student: ModelSpec
    data: DataSpec
    student_layers: list[str] | None = Field(None, min_length=2, max_length=2)
    teacher_layers: list[str] | None = Field(None, min_length=2, max_length=2)
    output: Literal["classification", "regression", "causal-lm"] = "classification"
    metric: str | None = Field(None, description="accuracy, rmse, perplexity, next_token_accuracy, "
                               "or the import path of a talkingmodels.losses.Metric; default: "
                               "accuracy / rmse / perplexity by output")


def _hf_splits(folder: Path):
    try:
        import datasets
    except ImportError:
        raise UserError("data.hf_dataset needs the datasets package: pip install datasets") from None
    if not folder.exists():
        raise UserError(f"data.hf_dataset {folder} does not exist")
    parts = datasets.load_from_disk(str(folder))
    names = {"train": "train", "val": "validation" if "validation" in parts else "val", "test": "test"}
    missing = [name for name in names.values() if name not in parts]
    if missing:
        raise UserError(f"data.hf_dataset {folder} lacks the split(s) {', '.join(missing)}; it has: "
                        f"{', '.join(parts)}")
    return tuple(parts[name] for name in names.values())


@register("custom")
class Custom(Task):
    """The user's own models and data, by import path (see the module's docstring)."""

    Config = CustomConfig
    metric = losses.ACCURACY  # (each config's own is set on the instance)
    default_settings = ("default",)
    default_methods = {"scratch": {}, "logit-kd": {}, "td": {}}
    benchmark = False

    def __init__(self, config: CustomConfig):
        super().__init__(config)
        self.output = config.output
        self.metric = self._metric(config)
        if config.data_dir is not None:
            raise UserError("task 'custom' reads its data through task_options.data, not data_dir")

    @staticmethod
    def _metric(config: CustomConfig) -> losses.Metric:
        name = config.metric or losses.TASKS[config.output][1].name
        if name in losses.METRICS:
            return losses.METRICS[name]
        metric = import_object(name, "metric")
        if not isinstance(metric, losses.Metric):
            raise UserError(f"metric {name!r} is not a talkingmodels.losses.Metric (name, fn, "
                            f"higher_is_better); valid names: {', '.join(losses.METRICS)}")
        return metric

    def settings(self) -> list[str]:
        return list(self.default_settings)

    def prepare(self, setting: str) -> Prepared:
        from talkingmodels.inference import evaluate

        self.check_setting(setting)
        cfg = self.config
        cfg.student.build("student")  # a mistake in the student shows before any teacher work
        teacher = cfg.teacher.build("teacher").eval().requires_grad_(False)
        data = cfg.data
        if data.function is not None:
            function = import_object(data.function, "data function")
            try:
                parts = function(**data.args)
            except TypeError as exc:
                raise UserError(f"data function {data.function!r} cannot be called with args "
                                f"{data.args}: {exc}") from None
            if not (isinstance(parts, (tuple, list)) and len(parts) == 3):
                raise UserError(f"data function {data.function!r} must return (train, val, test)")
        else:
            parts = _hf_splits(data.hf_dataset)
        splits = Splits(*parts)
        try:  # the teacher's own test metric, where its output fits the task
            teacher_metric = evaluate(teacher, splits.test, self.metric)
        except (RuntimeError, ValueError, IndexError, TypeError):
            teacher_metric = float("nan")
        layers = {side: None if names is None else tuple(names)
                  for side, names in (("student", cfg.student_layers), ("teacher", cfg.teacher_layers))}
        return Prepared(setting=setting, splits=splits, teacher=teacher, teacher_metric=teacher_metric,
                        build_student=lambda: cfg.student.build("student"),
                        student_layers=layers["student"], teacher_layers=layers["teacher"],
                        task_loss=losses.TASKS[cfg.output][0],
                        output=cfg.output)
