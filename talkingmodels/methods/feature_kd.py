"""``feature-kd``: the student's state at ``h`` is mapped by an encoder (a regressor) onto
the teacher's state at ``h`` and matched with MSE: one-way communication in state space."""

from __future__ import annotations

import torch
from pydantic import Field

from talkingmodels import losses
from talkingmodels.channel import ChannelKind, Encoder, to_grid
from talkingmodels.data import Batch
from talkingmodels.methods.base import Distiller, MethodConfig
from talkingmodels.methods.registry import register
from talkingmodels.states import OUTPUT_KINDS, token_mask


class FeatureKDConfig(MethodConfig):
    feature_weight: float = Field(1.0, ge=0, description="weight of the feature term")
    layer: str = Field("h", pattern="^(l|h)$", description="which tapped pair to match")
    regressor: ChannelKind = "linear"


class FeatureMatching:
    """Mixin: a regressor from the student's layer to the teacher's, and the matching loss."""

    needs_layers = True

    def build(self, batch: Batch) -> None:
        super().build(batch)
        role = self.config.layer
        s_dim = self.state_dims(batch, "student")[role]
        t_dim = self.state_dims(batch, "teacher")[role]
        self.regressor = Encoder({role: s_dim}, t_dim, self.config.regressor)

    def layer_names(self) -> tuple[str, str]:
        index = 0 if self.config.layer == "l" else 1
        return self.pair.student_layers[index], self.pair.teacher_layers[index]

    def feature_forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The student's prediction, the weighted feature-matching term and the teacher's
        outputs (so a caller needing the teacher's prediction does not run it again)."""
        s_name, t_name = self.layer_names()
        prediction, states = self.student_states(batch, (s_name,))
        teacher = self.teacher_states(batch, (t_name,))
        term = self.feature_term(states[s_name], teacher[t_name], token_mask(batch, teacher[t_name]))
        return prediction, term, teacher

    def feature_term(self, student: torch.Tensor, teacher: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted MSE between the regressed student state and the teacher's state
        (over real tokens only, given the ``mask`` of a batch of sentences)."""
        mapped = to_grid(self.regressor(student, self.config.layer), teacher)
        return self.config.feature_weight * losses.mse(mapped, teacher, mask)


@register("feature-kd")
class FeatureKD(FeatureMatching, Distiller):
    """Task loss + MSE between the regressed student state and the teacher state at h."""

    Config = FeatureKDConfig
    outputs = OUTPUT_KINDS

    def forward_train(self, batch: Batch):
        prediction, feature, _ = self.feature_forward(batch)
        return prediction, {"task": self.pair.task_loss(prediction, batch.target), "feature": feature}
