"""Distillation methods. Importing this package registers all of them."""

from talkingmodels.methods import (  # noqa: F401
    crd,
    dist,
    dkd,
    feature_kd,
    fitnet,
    gkd,
    hybrid,
    kd_modules,
    logit_kd,
    pkt,
    rkd,
    scratch,
    td,
)
from talkingmodels.methods.base import Distiller, MethodConfig, ModelPair, Stage, not_applicable, supports
from talkingmodels.methods.registry import METHODS, get_method, register

__all__ = ["METHODS", "Distiller", "MethodConfig", "ModelPair", "Stage", "get_method", "not_applicable",
           "register", "supports"]
