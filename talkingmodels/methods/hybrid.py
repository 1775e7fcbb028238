"""``hybrid``: logit KD and feature distillation together (the paper's strongest baseline)."""

from __future__ import annotations

from talkingmodels.data import Batch
from talkingmodels.methods.base import Distiller
from talkingmodels.methods.feature_kd import FeatureKDConfig, FeatureMatching
from talkingmodels.methods.logit_kd import LogitKD, LogitKDConfig
from talkingmodels.methods.registry import register


class HybridConfig(LogitKDConfig, FeatureKDConfig):
    pass


@register("hybrid")
class Hybrid(FeatureMatching, LogitKD):
    """Logit KD and feature distillation together (the paper's strongest baseline)."""

    Config = HybridConfig

    def __init__(self, pair, config, example):
        Distiller.__init__(self, pair, config, example)
        self.build_regressor(example)

    def forward_train(self, batch: Batch):
        s_name, t_name = self.layer_names()
        prediction, states = self.student_states(batch, (s_name,))
        teacher = self.teacher_states(batch, (t_name,))
        return prediction, {
            "task": self.pair.task_loss(prediction, batch.target),
            "kd": self.logit_term(prediction, batch),
            "feature": self.feature_term(states[s_name], teacher[t_name]),
        }
