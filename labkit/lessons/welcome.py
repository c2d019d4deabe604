"""Lesson 00's tasks: the smallest things worth sending to a worker."""

from __future__ import annotations

import os
import socket
import time

from celery import shared_task

from labkit.app import worker_name


@shared_task(name="welcome.add")
def add(x: float, y: float) -> float:
    return x + y


@shared_task(name="welcome.where")
def where() -> dict:
    """Which worker and which OS process ran this task."""
    return {"worker": worker_name(), "pid": os.getpid(), "host": socket.gethostname()}


@shared_task(name="welcome.slow")
def slow(seconds: float) -> dict:
    """Sleep, then say where it ran: long enough to kill the worker in the middle."""
    time.sleep(seconds)
    return {"worker": worker_name(), "pid": os.getpid(), "slept": seconds}
