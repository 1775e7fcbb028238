"""talkingmodels: Talking-model Distillation and the well-known KD methods."""

from talkingmodels.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
