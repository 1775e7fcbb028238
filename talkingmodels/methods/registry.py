"""Method names -> classes."""

from talkingmodels.registry import Registry

METHODS = Registry("method")
register = METHODS.register
get_method = METHODS.get_class
