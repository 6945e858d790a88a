"""The one exception type that hydranets raises for bad input."""


class HydraError(ValueError):
    """Bad input from a user: a one-line message that says what is wrong and how to fix it.

    The CLI prints it as ``error: <message>`` and exits with status 2.
    """
