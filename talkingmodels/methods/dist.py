"""``dist``: DIST, "Knowledge Distillation from A Stronger Teacher" (Huang et al., NeurIPS 2022).

Instead of matching the teacher's class probabilities exactly (KL), the student matches
their relations: per example, the Pearson correlation of its class probabilities with the
teacher's (inter-class); per class, the correlation across the batch (intra-class).
``L_task + beta L_inter + gamma L_intra`` on ``softmax(z / tau)``, each relation term times
``tau^2``. Defaults beta = gamma = tau = 1: the official code's ``DIST(beta=1, gamma=1)``
without a temperature (hunto/image_classification_sota, ``kd_loss.py``). Class logits only.
"""

from __future__ import annotations

from pydantic import Field

from talkingmodels import losses
from talkingmodels.data import Batch
from talkingmodels.methods.base import Distiller, MethodConfig
from talkingmodels.methods.registry import register


class DISTConfig(MethodConfig):
    beta: float = Field(1.0, ge=0, description="weight of the inter-class relation term")
    gamma: float = Field(1.0, ge=0, description="weight of the intra-class relation term")
    tau: float = Field(1.0, gt=0, description="softmax temperature; terms times tau^2")


@register("dist")
class DIST(Distiller):
    """DIST (Huang et al. 2022): Pearson-correlation match of class relations (logits only)."""

    Config = DISTConfig
    outputs = ("classification",)

    def forward_train(self, batch: Batch):
        cfg = self.config
        prediction, terms = super().forward_train(batch)
        inter, intra = losses.dist(prediction, self.teacher_states(batch)["output"], cfg.tau)
        terms["inter"] = cfg.beta * inter
        terms["intra"] = cfg.gamma * intra
        return prediction, terms
