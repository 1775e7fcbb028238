"""``dkd``: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

KD splits into TCKD (how sure the teacher is of the target class) and NCKD (how it ranks
the other classes), ``KD = TCKD + (1 - p_target) NCKD``; the coupling factor suppresses
NCKD exactly where the teacher is confident. DKD weights the two freely:
``L_task + alpha TCKD + beta NCKD``. Defaults are the paper's / mdistiller's CIFAR-100
ones (alpha 1, beta 8, T 4); beta is dataset dependent (0.5 on ImageNet). Class logits
only: a rating has no target class.
"""

from __future__ import annotations

import torch
from pydantic import Field

from talkingmodels import losses
from talkingmodels.data import Batch
from talkingmodels.methods.base import Distiller, MethodConfig
from talkingmodels.methods.logit_kd import LogitKDConfig
from talkingmodels.methods.registry import register


class DKDConfig(MethodConfig):
    alpha: float = Field(1.0, ge=0, description="weight of TCKD (target vs. other classes)")
    beta: float = Field(8.0, ge=0, description="weight of NCKD (among the non-target classes); "
                        "dataset dependent: 8 on CIFAR-100, 0.5 on ImageNet in the paper")
    temperature: float = Field(4.0, gt=0, description="softmax temperature; terms times T^2")
    warmup_steps: int = Field(
        0, ge=0, description="linear warm-up of the DKD terms over this many training steps; 0 "
        "= off. The paper warms up over 20 epochs; the engine does not tell a method the epoch, "
        "so give 20 x the steps per epoch to reproduce it")


@register("dkd")
class DKD(Distiller):
    """Decoupled KD (Zhao et al. 2022): task + alpha TCKD + beta NCKD (class logits only)."""

    Config = DKDConfig
    outputs = ("classification",)

    @classmethod
    def same_as(cls, config: DKDConfig, classes: int | None) -> str | None:
        # With two classes the non-target distribution is one class (NCKD is exactly 0) and
        # the binary target-vs-rest distribution is the whole one (TCKD is KD's KL): DKD is
        # logit KD at weight alpha, here logit-kd's defaults.
        kd = LogitKDConfig()
        if classes == 2 and config.warmup_steps == 0 and (config.alpha, config.temperature) == (
                kd.weight, kd.temperature):
            return ("identical to logit-kd on two classes (NCKD over the one other class is 0, "
                    "TCKD is the whole KL)")
        return None

    def __init__(self, pair, config: DKDConfig):
        super().__init__(pair, config)
        # The warm-up's clock: a buffer, so that a resumed run continues it.
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward_train(self, batch: Batch):
        cfg = self.config
        prediction, terms = super().forward_train(batch)
        teacher = self.teacher_states(batch)["output"]
        tckd, nckd = losses.dkd(prediction, teacher, batch.target, cfg.temperature)
        self.steps += 1
        ramp = (self.steps / cfg.warmup_steps).clamp(max=1.0) if cfg.warmup_steps else 1.0
        terms["tckd"] = ramp * cfg.alpha * tckd
        terms["nckd"] = ramp * cfg.beta * nckd
        return prediction, terms
