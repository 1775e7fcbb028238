"""The interface every distillation method implements (after mdistiller's Distiller).

A method holds the student, the frozen teacher and its own extra modules. The engine
calls ``forward_train(batch)``, which returns the student's prediction and a dict of
named, already weighted loss terms; the engine sums them. A method never knows which
task it runs on: everything task-specific arrives in a :class:`ModelPair`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from talkingmodels import taps
from talkingmodels.data import Batch
from talkingmodels.errors import UserError

OutputKind = Literal["regression", "classification"]


@dataclass
class ModelPair:
    """What a task hands to a method: the two models, their tapped layers, the task loss."""

    student: nn.Module
    teacher: nn.Module
    student_layers: tuple[str, str]  # (l, h): l runs before h
    teacher_layers: tuple[str, str]
    output: OutputKind
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Stage:
    """A phase of training. ``epochs=None`` uses the run's epoch budget; ``select`` turns
    on early stopping / model selection on the validation metric."""

    name: str
    epochs: int | None = None
    select: bool = True


class MethodConfig(BaseModel):
    """Options every method accepts. Subclasses add their own; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    unfreeze_teacher: bool = False


def feature_dim(state: torch.Tensor) -> int:
    """Width of a hidden state: channels for images (batch, C, H, W), else the last dim."""
    return state.shape[1] if state.dim() == 4 else state.shape[-1]


def pooled(state: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One vector per example: the mean over the positions of an image state (batch, C, H, W)
    or over the tokens of a sequence state (batch, tokens, dim), only the real ones when a
    ``mask`` (batch, tokens) is given (:meth:`Distiller.pooled_states` builds it from the
    batch's lengths); other states are flattened. Differentiable: the text models pool with it too."""
    if state.dim() == 4:
        return state.mean(dim=(2, 3))
    if state.dim() == 3:
        if mask is None:
            return state.mean(dim=1)
        weights = mask.unsqueeze(-1).to(state.dtype)
        return (state * weights).sum(1) / weights.sum(1).clamp(min=1)
    return state.flatten(1)


def token_mask(batch: Batch, state: torch.Tensor) -> torch.Tensor | None:
    """(batch, tokens) mask of the real tokens of a sequence state, from the batch's
    lengths; None for states that are not token sequences or batches without lengths."""
    if batch.lengths is None or state.dim() != 3:
        return None
    return torch.arange(state.shape[1], device=state.device) < batch.lengths.to(state.device)[:, None]


def supports(cls: type[Distiller], output: OutputKind) -> bool:
    """Whether the method class ``cls`` applies to a task whose student predicts ``output``."""
    return output in cls.outputs


class Distiller(nn.Module):
    """Base class: plain supervised training of the student (the ``scratch`` method)."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # The output kinds the method has a meaning for (class-distribution methods need logits).
    outputs: ClassVar[tuple[OutputKind, ...]] = ("regression", "classification")

    def __init__(self, pair: ModelPair, config: MethodConfig, example: Batch):
        if not supports(type(self), pair.output):
            name = getattr(self, "name", type(self).__name__)
            raise UserError(f"method {name!r} does not apply to a task with {pair.output} outputs "
                            f"(it needs {' or '.join(self.outputs)} outputs)")
        super().__init__()
        self.pair = pair
        self.config = config
        self.student = pair.student
        self.teacher = pair.teacher
        self.teacher.requires_grad_(config.unfreeze_teacher)
        self.stage = "main"

    # ----------------------------------------------------------------- training API
    def forward(self, *student_inputs: torch.Tensor) -> torch.Tensor:
        """Inference needs only the student."""
        return taps.prediction(self.student(*student_inputs))

    def forward_train(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prediction = taps.prediction(self.student(*batch.student_inputs))
        return prediction, {"task": self.pair.task_loss(prediction, batch.target)}

    def stages(self) -> list[Stage]:
        return [Stage("main")]

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

    def extra_parameter_count(self) -> int:
        """Trainable parameters a method adds beyond the student (its training-time cost)."""
        own = {id(p) for p in self.student.parameters()} | {id(p) for p in self.teacher.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in own)

    # ----------------------------------------------------------------- helpers
    def student_states(self, batch: Batch, layers: tuple[str, ...]):
        """Student prediction and its states at ``layers`` (with gradients)."""
        with taps.capture(self.student, layers) as states:
            prediction = taps.prediction(self.student(*batch.student_inputs))
        return prediction, states

    def teacher_states(self, batch: Batch, layers: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Teacher states at ``layers`` and its prediction under key ``"output"``.

        Served from the batch's teacher cache when the task precomputed them; else one
        forward pass of the teacher, without an autograd graph when it is frozen.
        """
        wanted = (*layers, "output")
        cached = not self.config.unfreeze_teacher  # an unfrozen teacher changes every step
        if cached and all(key in batch.teacher_cache for key in wanted):
            return {key: batch.teacher_cache[key] for key in wanted}
        with torch.set_grad_enabled(self.config.unfreeze_teacher and torch.is_grad_enabled()):
            with taps.capture(self.teacher, layers) as states:
                output = taps.prediction(self.teacher(*batch.teacher_inputs))
        return {**states, "output": output}

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

    @staticmethod
    def state_dims(model: nn.Module, layers: tuple[str, str], inputs: tuple) -> dict[str, int]:
        """Feature widths of ``model`` at its (l, h) layers, by role, from one probe pass.
        Also checks that l runs before h."""
        taps.check_order(model, *layers, *inputs)
        with torch.no_grad(), taps.capture(model, layers) as states:
            model(*inputs)
        return {role: feature_dim(states[name]) for role, name in zip(("l", "h"), layers, strict=False)}


