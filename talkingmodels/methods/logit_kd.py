"""``logit-kd`` (Hinton et al. 2015). In the channel vocabulary: the teacher's message is
its output (soft labels, or a predicted rating) and the student matches it with its own."""

from __future__ import annotations

import torch
from pydantic import Field

from talkingmodels import losses
from talkingmodels.data import Batch
from talkingmodels.methods.base import Distiller, MethodConfig, OutputKind
from talkingmodels.methods.registry import register


def output_kd(student: torch.Tensor, teacher: torch.Tensor, output: OutputKind,
              temperature: float) -> torch.Tensor:
    """KL at temperature ``temperature`` for class logits; MSE to the teacher's prediction
    for regression (a rating has no distribution to soften)."""
    if output == "classification":
        return losses.kd_kl(student, teacher, temperature)
    return losses.mse(student, teacher)


class LogitKDConfig(MethodConfig):
    weight: float = Field(1.0, ge=0, description="w0: weight of the KD term")
    temperature: float = Field(4.0, gt=0, description="softmax temperature (classification)")


@register("logit-kd")
class LogitKD(Distiller):
    """Task loss + w0 * KD towards the teacher's output (Hinton et al. 2015)."""

    Config = LogitKDConfig

    def logit_term(self, prediction: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        """w0 * KD of the student's prediction towards the teacher's output."""
        return losses.scaled(output_kd(prediction, teacher_output, self.pair.output,
                                       self.config.temperature), self.config.weight)

    def forward_train(self, batch: Batch):
        prediction, terms = super().forward_train(batch)
        terms["kd"] = self.logit_term(prediction, self.teacher_states(batch)["output"])
        return prediction, terms
