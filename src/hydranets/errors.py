"""The one exception type that hydranets raises for bad input, and the checks its messages rest on."""
from __future__ import annotations

import math
import numbers


class HydraError(ValueError):
    """Bad input from a user: a one-line message that says what is wrong and how to fix it.

    The CLI prints it as ``error: <message>`` and exits with status 2.
    """


def reason(e: BaseException) -> str:
    """An exception's message on one line, for a HydraError that names its cause: its first line (tarfile, for one,
    lists each method it tried on a line of its own)."""
    lines = str(e).strip().splitlines()
    return lines[0].rstrip(": ") if lines else type(e).__name__


def is_whole(v: object, least: int = 1) -> bool:
    """Whether ``v`` is an int (not a bool) of at least ``least``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def is_positive_real(v: object) -> bool:
    """Whether ``v`` is a finite real number above 0 (not a bool)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < math.inf
