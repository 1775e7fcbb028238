"""``rkd``: Relational Knowledge Distillation (Park et al., CVPR 2019).

The student's states at ``h`` must relate the examples of a batch as the teacher's do:
the same pairwise distances (each set divided by its mean, so the widths need not agree)
and the same angles in every triplet. Image and sequence states are pooled to one vector
per example first (mean over positions / tokens). No extra modules. Weights 25 and 50 are
the paper's (and the CRD and mdistiller code's).

The angle term costs O(n^3 d) for a batch of n: 256 examples make 16.7M triplets, over
100x a whole MovieLens step. ``angle_examples`` limits it to the batch's first examples
(batches are shuffled, so a random subset); the distance term always uses the whole batch.
"""

from __future__ import annotations

from pydantic import Field

from talkingmodels import losses
from talkingmodels.data import Batch
from talkingmodels.methods.base import Distiller, MethodConfig
from talkingmodels.methods.registry import register


class RKDConfig(MethodConfig):
    distance_weight: float = Field(25.0, ge=0, description="lambda_D: distance-wise term")
    angle_weight: float = Field(50.0, ge=0, description="lambda_A: angle-wise term (n^3 triplets)")
    angle_examples: int | None = Field(None, ge=3, description="the angle term on at most this "
                                       "many examples of the batch (None: all, as the paper)")


@register("rkd")
class RKD(Distiller):
    """Relational KD (Park et al. 2019): distances and angles between examples' states at h."""

    Config = RKDConfig
    needs_layers = True

    def forward_train(self, batch: Batch):
        cfg = self.config
        prediction, student, teacher, _ = self.pooled_states(batch)
        terms = {"task": self.pair.task_loss(prediction, batch.target)}
        if cfg.distance_weight > 0:
            terms["distance"] = cfg.distance_weight * losses.rkd_distance(student, teacher)
        if cfg.angle_weight > 0:
            n = cfg.angle_examples  # (slicing with None keeps the whole batch)
            terms["angle"] = cfg.angle_weight * losses.rkd_angle(student[:n], teacher[:n])
        return prediction, terms
