"""``logit-kd`` (Hinton et al. 2015). In the channel vocabulary: the teacher's message is
its output (soft labels, or a predicted rating) and the student matches it with its own."""

from __future__ import annotations

import torch
from pydantic import Field

from talkingmodels import losses
from talkingmodels.data import Batch
from talkingmodels.methods.base import Distiller, MethodConfig, OutputKind
from talkingmodels.methods.registry import register
from talkingmodels.states import OUTPUT_KINDS


def output_kd(student: torch.Tensor, teacher: torch.Tensor | losses.TopK, output: OutputKind,
              temperature: float, target: torch.Tensor | None = None) -> torch.Tensor:
    """KL at temperature ``temperature`` for class logits; for a causal LM the same per
    token, over the tokens with a real next-token ``target`` (labels, -100 ignored; the
    teacher's logits full or its top-k); MSE to the teacher's prediction for regression (a
    rating has no distribution to soften)."""
    if output == "causal-lm":
        return losses.token_kd_kl(student, teacher, target, temperature)
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
    outputs = OUTPUT_KINDS

    @classmethod
    def reads_teacher_output(cls, config: LogitKDConfig) -> bool:
        return config.weight > 0

    def logit_term(self, prediction: torch.Tensor, teacher_output, target: torch.Tensor) -> torch.Tensor:
        """w0 * KD of the student's prediction towards the teacher's output (``target``:
        the batch's targets, whose -100 labels a causal LM's KD skips)."""
        return losses.scaled(output_kd(prediction, teacher_output, self.pair.output,
                                       self.config.temperature, target), self.config.weight)

    def forward_train(self, batch: Batch):
        prediction, terms = super().forward_train(batch)
        terms["kd"] = self.logit_term(prediction, self.teacher_states(batch)["output"], batch.target)
        return prediction, terms
