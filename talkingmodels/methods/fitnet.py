"""``fitnet`` (Romero et al. 2015), the original two-stage recipe.

Stage ``hint``: the student's guided layer is trained, through a regressor, to predict
the teacher's hint layer; only the student's modules up to the guided layer receive
gradients. Stage ``main``: the whole student is trained with the task loss and logit KD,
starting from the hinted weights. The regressor is discarded after the hint stage.
"""

from __future__ import annotations

from pydantic import Field

from talkingmodels.data import Batch
from talkingmodels.engine import Stage
from talkingmodels.methods.feature_kd import FeatureKDConfig, FeatureMatching
from talkingmodels.methods.logit_kd import LogitKD, LogitKDConfig
from talkingmodels.methods.registry import register


class FitNetConfig(LogitKDConfig, FeatureKDConfig):
    hint_epochs: int = Field(5, ge=1, description="epochs of the hint stage")


@register("fitnet")
class FitNet(FeatureMatching, LogitKD):
    """FitNets (Romero et al. 2015): a hint stage through a regressor, then logit KD."""

    Config = FitNetConfig

    def __init__(self, pair, config: FitNetConfig):
        super().__init__(pair, config)
        # Made once: the engine sets ``self.stage`` to the one it trains.
        self.hint_stage = Stage("hint", epochs=config.hint_epochs, select=False)
        self.main_stage = Stage("main")

    def stages(self) -> list[Stage]:
        return [self.hint_stage, self.main_stage]

    def forward_train(self, batch: Batch):
        if self.stage is not self.hint_stage:  # the main stage: task loss and logit KD
            return super().forward_train(batch)
        prediction, hint, _ = self.feature_forward(batch)
        return prediction, {"hint": hint}

    def learnable_parameters(self):
        params = super().learnable_parameters()
        if self.stage is not self.hint_stage:  # the regressor only serves the hint stage
            regressor = {id(p) for p in self.regressor.parameters()}
            params = [p for p in params if id(p) not in regressor]
        return params
