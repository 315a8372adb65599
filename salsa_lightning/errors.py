"""The one exception type the project raises for bad input."""


class SalsaError(ValueError):
    """A user-fixable problem with an input: a file, a column, a tensor or a setting.

    The message names the culprit and says what to do. The ``salsa`` command prints it
    without a traceback and exits with status 2.
    """
