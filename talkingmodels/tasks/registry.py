"""Task names -> classes."""

from talkingmodels.registry import Registry

TASKS = Registry("task")
register = TASKS.register
get_task = TASKS.get_class
