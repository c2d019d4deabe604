"""The states a service or a cluster can be in, as one ``str`` enum.

Being a ``str`` subclass, a :class:`Status` compares equal to its value
(``Status.RUNNING == "running"``) and serialises to it in JSON, so the
state files ``labkit status`` reads and older code that compares strings
keep working.
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """Life-cycle states. Services use NEW..FAILED; clusters add CLOSING, CLOSED, ATTACHED."""

    NEW = "new"  # created, nothing started
    STARTING = "starting"  # spawned, readiness probe not yet passed
    RUNNING = "running"  # ready and serving
    PAUSED = "paused"  # SIGSTOP-ed: holds its sockets, answers nothing
    STOPPING = "stopping"  # asked to exit, not gone yet
    STOPPED = "stopped"  # stopped by us
    KILLED = "killed"  # killed by a fault we injected
    EXITED = "exited"  # died on its own
    FAILED = "failed"  # did not become ready
    CLOSING = "closing"  # cluster: tearing down
    CLOSED = "closed"  # cluster: torn down
    ATTACHED = "attached"  # cluster: somebody else's processes

    def __str__(self) -> str:
        return self.value

    @property
    def alive(self) -> bool:
        """True for the states in which the process should exist."""
        return self in (Status.STARTING, Status.RUNNING, Status.PAUSED, Status.STOPPING)
