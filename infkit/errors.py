"""The one exception type infkit raises for bad input; its message names the problem and the fix."""


class InfkitError(ValueError):
    """Bad input or a misuse of the API. The message says what is wrong and how to fix it."""
