"""Task names -> classes."""

from talkingmodels.registry import Registry

TASKS = Registry("task")
register = TASKS.register
get_task = TASKS.get_class


def benchmarks() -> list[str]:
    """The benchmark tasks (``bench`` runs them); ``custom`` is configured by a YAML config."""
    return sorted(name for name, cls in TASKS.items() if cls.benchmark)
