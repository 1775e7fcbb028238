"""``pkt``: Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018).

Each example's cosine similarities to the others in the batch, as a probability
distribution, must match the teacher's (KL teacher || student), on the states at ``h``
pooled to one vector per example. No extra modules, any widths. The weight 30000 is the
one the CRD benchmark code (``-b 30000``) and mdistiller use: the loss is a mean over all
n^2 entries, so it is tiny.
"""

from __future__ import annotations

from pydantic import Field

from talkingmodels import losses
from talkingmodels.data import Batch
from talkingmodels.methods.base import Distiller, MethodConfig
from talkingmodels.methods.registry import register


class PKTConfig(MethodConfig):
    pkt_weight: float = Field(30000.0, ge=0, description="weight of the PKT term")


@register("pkt")
class PKT(Distiller):
    """Probabilistic Knowledge Transfer (Passalis & Tefas 2018): similarity distributions at h."""

    Config = PKTConfig
    needs_layers = True

    def forward_train(self, batch: Batch):
        prediction, student, teacher, _ = self.pooled_states(batch)
        return prediction, {"task": self.pair.task_loss(prediction, batch.target),
                            "pkt": self.config.pkt_weight * losses.pkt(student, teacher)}
