"""talkingmodels: Talking-model Distillation and the well-known KD methods.

``distill(student, teacher, train, val, ...)`` distils in one call; ``load_student`` reads a
saved student back into the user's model.
"""

from talkingmodels.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__", "distill", "load_student"]


def __getattr__(name: str):
    # The one-call API loads torch and accelerate: imported when first used, so that the
    # command line starts fast and `talkingmodels.errors` stays light.
    if name in ("distill", "load_student", "Result"):
        from talkingmodels import api

        return getattr(api, name)
    raise AttributeError(f"module 'talkingmodels' has no attribute {name!r}")
