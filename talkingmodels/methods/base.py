"""The interface every distillation method implements (after mdistiller's Distiller).

A method holds the student, the frozen teacher and its own extra modules. The engine
calls ``setup(batch)`` once with a first batch (a method builds its modules from the
widths it sees there), then ``forward_train(batch)``, which returns the student's
prediction and a dict of named, already weighted loss terms; the engine sums them. A
method never knows which task it runs on: everything task-specific arrives in a
:class:`~talkingmodels.states.ModelPair`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from talkingmodels import taps
from talkingmodels.data import Batch, teacher_cached
from talkingmodels.engine import Stage, Supervised
from talkingmodels.errors import UserError
from talkingmodels.states import ModelPair, OutputKind, feature_dim, pooled, token_mask, vocabulary

__all__ = ["Distiller", "MethodConfig", "ModelPair", "Stage", "not_applicable", "supports"]


class MethodConfig(BaseModel):
    """Options every method accepts. Subclasses add their own; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    unfreeze_teacher: bool = False
    # A method's own (l, h) instead of the task's, for a grid over layer pairs: the teacher's
    # states there are computed on every step (a task caches its own layers' only).
    student_layers: tuple[str, str] | None = Field(
        None, description="(l, h) of the student this method reads instead of the task's")
    teacher_layers: tuple[str, str] | None = Field(
        None, description="(l, h) of the teacher this method reads instead of the task's")


def supports(cls: type[Distiller], output: OutputKind) -> bool:
    """Whether the method class ``cls`` applies to a task whose student predicts ``output``."""
    return output in cls.outputs


def not_applicable(cls: type[Distiller], config: MethodConfig, output: OutputKind,
                   classes: int | None = None) -> str | None:
    """Why a benchmark grid records an n/a row instead of a run of ``cls`` with ``config`` on
    a task with ``output`` outputs (and ``classes`` classes), or None: the method has no
    meaning there, or it provably computes what another method does (a duplicate run would
    count as one more comparison)."""
    if not supports(cls, output):
        return f"needs {' or '.join(cls.outputs)} outputs"
    return cls.same_as(config, classes)


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    """A teacher held in bf16 hands its states on in float32 (a no-op for float32)."""
    return tensor.float() if tensor.is_floating_point() else tensor


class Distiller(Supervised):
    """Base class: plain supervised training of the student (the ``scratch`` method)."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # The output kinds the method has a meaning for (class-distribution methods need logits).
    outputs: ClassVar[tuple[OutputKind, ...]] = ("regression", "classification")
    # Whether the method reads the models' hidden states at their (l, h) layers.
    needs_layers: ClassVar[bool] = False

    @classmethod
    def reads_teacher_output(cls, config: MethodConfig) -> bool:
        """Whether this configuration matches the teacher's output distribution (its logits):
        then the two models' vocabularies, or classes, must be the same."""
        return False

    @classmethod
    def same_as(cls, config: MethodConfig, classes: int | None) -> str | None:
        """Where this configuration provably computes the same loss as another method on a
        task of ``classes`` classes: the reason (e.g. "identical to logit-kd ..."), else None."""
        return None

    def __init__(self, pair: ModelPair, config: MethodConfig):
        name = getattr(self, "name", type(self).__name__)
        if not supports(type(self), pair.output):
            raise UserError(f"method {name!r} does not apply to a task with {pair.output} outputs "
                            f"(it needs {' or '.join(self.outputs)} outputs)")
        own = {f"{side}_layers": tuple(layers) for side in ("student", "teacher")
               if (layers := getattr(config, f"{side}_layers")) is not None}
        if own and not self.needs_layers:
            raise UserError(f"method {name!r} reads no hidden states: {' and '.join(own)} "
                            "do not apply to it")
        pair = replace(pair, **own)
        if self.needs_layers:  # named layers are checked before anything runs
            for side, model, layers in (("student", pair.student, pair.student_layers),
                                        ("teacher", pair.teacher, pair.teacher_layers)):
                if layers is None or len(layers) != 2:
                    names = ", ".join(taps.module_names(model)[:6])
                    raise UserError(f"method {name!r} reads hidden states: give {side}_layers as "
                                    f"two module names (l, h) of the {side} (its first: {names})")
                for layer in layers:
                    taps.get_module(model, layer)
        sizes = vocabulary(pair.student), vocabulary(pair.teacher)
        if self.reads_teacher_output(config) and None not in sizes and sizes[0] != sizes[1]:
            raise UserError(f"method {name!r} matches the teacher's output distribution, but the "
                            f"student's vocabulary has {sizes[0]} tokens and the teacher's {sizes[1]}; "
                            "use models of one tokenizer, or a method on hidden states only "
                            "(feature-kd, td with weight 0)")
        super().__init__(pair.student, pair.task_loss)
        self.output = pair.output
        self.pair = pair
        self.config = config
        self.teacher = pair.teacher
        self.teacher.requires_grad_(config.unfreeze_teacher)

    # ----------------------------------------------------------------- training API
    def setup(self, batch: Batch) -> None:
        if not self.built:
            self.build(batch)
        super().setup(batch)

    def build(self, batch: Batch) -> None:
        """Build the method's own modules from a first batch (their widths come from a probe
        pass of the models); subclasses extend it."""

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen teacher always runs in eval mode (no dropout, fixed BN statistics).
        self.teacher.train(mode and self.config.unfreeze_teacher)
        return self

    def learnable_parameters(self) -> list[nn.Parameter]:
        """Student, extra modules, and the teacher only when it is unfrozen."""
        teacher = {id(p) for p in self.teacher.parameters()}
        params = [p for p in self.parameters() if id(p) not in teacher]
        if self.config.unfreeze_teacher:
            params += list(self.teacher.parameters())
        return params

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {} if self.config.unfreeze_teacher else {"teacher": self.teacher}

    def extra_parameter_count(self) -> int:
        """Trainable parameters a method adds beyond the student (its training-time cost)."""
        own = {id(p) for p in self.student.parameters()} | {id(p) for p in self.teacher.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in own)

    # ----------------------------------------------------------------- helpers
    def student_states(self, batch: Batch, layers: tuple[str, ...]):
        """Student prediction and its states at ``layers`` (with gradients)."""
        with taps.capture(self.student, layers) as states:
            prediction = taps.prediction(batch.run_student(self.student))
        return prediction, states

    def _teacher_dtype(self) -> torch.dtype:
        return next(self.teacher.parameters(), torch.empty(0)).dtype

    def run_teacher(self, batch: Batch):
        """The teacher on the batch's teacher inputs, float inputs cast to its dtype."""
        dtype = self._teacher_dtype()
        if dtype == torch.float32:
            return batch.run_teacher(self.teacher)

        def cast(x):
            return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        return self.teacher(*map(cast, batch.teacher_inputs),
                            **{k: cast(v) for k, v in batch.teacher_kwargs.items()})

    def teacher_between(self, low: str, high: str | None, state: torch.Tensor,
                        batch: Batch, teacher: nn.Module | None = None) -> torch.Tensor:
        """The teacher's own layers after ``low`` up to ``high`` (None: its output) run on
        ``state`` (:func:`taps.run_between`), in the teacher's dtype; float32 out. ``teacher``:
        another model of the teacher's architecture in its place (a diagnostic's twin)."""
        state = state.to(self._teacher_dtype())
        return _as_float(taps.run_between(self.teacher if teacher is None else teacher, low, high, state,
                                          *batch.teacher_inputs, **batch.teacher_kwargs))

    def teacher_states(self, batch: Batch, layers: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Teacher states at ``layers`` and its prediction under key ``"output"`` (float32).

        Served from the batch's teacher cache when the task precomputed them; else one
        forward pass of the teacher, without an autograd graph when it is frozen.
        """
        cached = not self.config.unfreeze_teacher  # an unfrozen teacher changes every step
        if cached and teacher_cached(batch, layers):
            return {key: _as_float(batch.teacher_cache[key]) for key in (*layers, "output")}
        if cached and layers and "output" in batch.teacher_cache:
            # States at a method's own layers, not cached: the teacher runs up to them only,
            # and the target stays the cached one (e.g. a causal LM's top-k), so that the
            # layers are all that differs.
            with torch.no_grad():
                states = taps.states_until(self.teacher, layers, lambda: self.run_teacher(batch))
            output = batch.teacher_cache["output"]
        else:
            with torch.set_grad_enabled(self.config.unfreeze_teacher and torch.is_grad_enabled()):
                with taps.capture(self.teacher, layers) as states:
                    output = taps.prediction(self.run_teacher(batch))
        return {key: _as_float(value) for key, value in {**states, "output": output}.items()}

    def pooled_states(self, batch: Batch):
        """For relational methods: the student's prediction, both models' states at ``h``
        pooled to one vector per example (student, teacher), and the teacher's outputs.
        Token sequences pool over each sentence's real tokens: a mean over padding would
        make a sentence's vector depend on the lengths of the others in its batch."""
        s_name, t_name = self.pair.student_layers[1], self.pair.teacher_layers[1]
        prediction, states = self.student_states(batch, (s_name,))
        teacher = self.teacher_states(batch, (t_name,))
        student, teacher_h = (pooled(state, token_mask(batch, state))
                              for state in (states[s_name], teacher[t_name]))
        return prediction, student, teacher_h, teacher

    def state_dims(self, batch: Batch, side: str) -> dict[str, int]:
        """Feature widths of the ``side`` model (``"student"`` or ``"teacher"``) at its (l, h)
        layers, by role, from one probe pass on ``batch``. Also checks that l runs before h."""
        model, layers = ((self.student, self.pair.student_layers) if side == "student"
                         else (self.teacher, self.pair.teacher_layers))
        inputs, kwargs = ((batch.student_inputs, batch.student_kwargs) if side == "student"
                          else (batch.teacher_inputs, batch.teacher_kwargs))
        try:
            taps.check_order(model, *layers, *inputs, **kwargs)
        except (TypeError, RuntimeError) as exc:  # the batch does not fit the model
            raise UserError(f"the {side} ({type(model).__name__}) cannot run on a batch of the "
                            f"data: {str(exc).splitlines()[0]}") from None
        with torch.no_grad(), taps.capture(model, layers) as states:
            model(*inputs, **kwargs)
        return {role: feature_dim(states[name]) for role, name in zip(("l", "h"), layers, strict=True)}
