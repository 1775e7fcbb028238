"""``scratch``: the student trained on the task alone; the reference every gain is measured against."""

from talkingmodels.methods.base import Distiller
from talkingmodels.methods.registry import register
from talkingmodels.states import OUTPUT_KINDS


@register("scratch")
class Scratch(Distiller):
    """The student trained on the task alone (the base class is plain supervised training)."""

    outputs = OUTPUT_KINDS
