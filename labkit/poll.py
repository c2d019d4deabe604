"""One polling loop for the whole kit.

Waiting for something another process will do (a worker to answer, a key to
appear, a lock holder to finish) is always the same loop: ask, sleep a
little, give up at a deadline. :func:`poll_until` is that loop, so every
wait in the kit has the same semantics: a monotonic deadline, an optional
"is it still worth waiting" check, and the predicate's last value returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class PollTimeout(TimeoutError):
    """Raised by :func:`poll_until` with ``what=`` when the deadline passes."""


def poll_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    *,
    alive: Callable[[], bool] | None = None,
    what: str | None = None,
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Gives up after ``timeout`` seconds (monotonic clock), or as soon as
    ``alive()`` returns False. On giving up it returns the predicate's last
    (falsy) value — or, when ``what`` describes the wait, raises
    :class:`PollTimeout` naming it. The predicate is always tried at least
    once, and once more right at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    if what is not None:
        raise PollTimeout(f"gave up after {timeout:g} s waiting for {what}")
    return value
