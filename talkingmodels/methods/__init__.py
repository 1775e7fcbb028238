"""Distillation methods. Importing this package registers all of them."""

from talkingmodels.methods import feature_kd, fitnet, hybrid, logit_kd, scratch, td  # noqa: F401
from talkingmodels.methods.base import Distiller, MethodConfig, ModelPair, Stage
from talkingmodels.methods.registry import METHODS, get_method, register

__all__ = ["METHODS", "Distiller", "MethodConfig", "ModelPair", "Stage", "get_method", "register"]
