"""Method names -> classes; a ``"package.module:Class"`` import path names the user's own
``Distiller`` subclass without registering it."""

from talkingmodels.errors import UserError
from talkingmodels.registry import Registry

METHODS = Registry("method")
register = METHODS.register


def get_method(name: str) -> type:
    if ":" not in name:
        return METHODS.get_class(name)
    from talkingmodels.methods.base import Distiller
    from talkingmodels.plugins import import_object

    cls = import_object(name, "method")
    if not (isinstance(cls, type) and issubclass(cls, Distiller)):
        raise UserError(f"method {name!r} is not a talkingmodels.methods.Distiller subclass")
    if "name" not in vars(cls):
        cls.name = name  # (a registered method's name is its registry key)
    return cls
