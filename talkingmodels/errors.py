"""The one exception type for mistakes a user can make (configs, names, shapes, data)."""


class UserError(Exception):
    """A user's mistake. The CLI prints its message on one line and exits with code 2."""
