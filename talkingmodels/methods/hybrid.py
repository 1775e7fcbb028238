"""``hybrid``: logit KD and feature distillation together (the paper's strongest baseline)."""

from __future__ import annotations

from talkingmodels.data import Batch
from talkingmodels.methods.feature_kd import FeatureKDConfig, FeatureMatching
from talkingmodels.methods.logit_kd import LogitKD, LogitKDConfig
from talkingmodels.methods.registry import register


class HybridConfig(LogitKDConfig, FeatureKDConfig):
    pass


@register("hybrid")
class Hybrid(FeatureMatching, LogitKD):
    """Logit KD and feature distillation together (the paper's strongest baseline)."""

    Config = HybridConfig

    def forward_train(self, batch: Batch):
        prediction, feature, teacher = self.feature_forward(batch)
        return prediction, {
            "task": self.pair.task_loss(prediction, batch.target),
            "kd": self.logit_term(prediction, teacher["output"], batch.target),
            "feature": feature,
        }
