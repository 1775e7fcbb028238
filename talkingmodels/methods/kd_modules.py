"""``kd-modules``: the parameter-matched control for TD.

``hybrid`` (logit KD + feature KD through a regressor) plus exactly TD's channel (an
encoder and a decoder for each model, same ``message_dim``, ``channel``,
``channel_hidden``), trained with TD's consistency terms L_MC and L_SC only: no question,
no interpretation by the teacher, no answer. Whatever TD gains over this method cannot come
from its extra parameters alone. With TD's defaults (L_MC at ``h`` only) the projection of
the student's encoder at ``l`` serves only TD's question, so here it stays as initialised
(``mc_layers: [l, h]`` trains it too).
"""

from __future__ import annotations

from talkingmodels.data import Batch
from talkingmodels.methods.hybrid import Hybrid, HybridConfig
from talkingmodels.methods.registry import register
from talkingmodels.methods.td import ChannelConfig, Consistency
from talkingmodels.states import token_mask


class KDModulesConfig(HybridConfig, ChannelConfig):
    pass


@register("kd-modules")
class KDModules(Consistency, Hybrid):
    """Control: hybrid plus TD's channel modules trained by L_MC and L_SC (no interaction)."""

    Config = KDModulesConfig

    def forward_train(self, batch: Batch):
        s_low, s_high = self.pair.student_layers
        t_low, t_high = self.pair.teacher_layers
        prediction, states = self.student_states(batch, (s_low, s_high))
        teacher = self.teacher_states(batch, (t_low, t_high))
        s_name, t_name = self.layer_names()
        mask = token_mask(batch, states[s_high])  # real tokens (None: not sentences)
        terms = {"task": self.pair.task_loss(prediction, batch.target),
                 "kd": self.logit_term(prediction, teacher["output"], batch.target),
                 "feature": self.feature_term(states[s_name], teacher[t_name], mask)}
        terms.update(self.consistency_terms(states[s_low], states[s_high],
                                            teacher[t_low], teacher[t_high], mask))
        return prediction, terms
