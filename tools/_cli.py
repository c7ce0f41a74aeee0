"""How the tools end on a user error: one ``error: <message>`` line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UsageError(Exception):
    """A bad option or an unusable machine, said in words the user can act on."""


def cli(*errors: type[Exception]) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorates a tool's ``main``: a :class:`UsageError` or one of ``errors`` raised in it is printed as
    ``error: <message>`` and ``main`` returns 2."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except (UsageError, *errors) as err:
                print(f"error: {err}", file=sys.stderr)
                return 2

        return run

    return wrap
