"""Tasks written the way the labkit lessons recommend; the tests run them on real workers.

``@shared_task`` keeps the module free of any app: whoever imports it (the
web app, a worker, a test's cluster) binds the tasks to its own app.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from celery import shared_task


@shared_task
def add(x: int, y: int) -> int:
    return x + y


@shared_task
def word_counts(text: str) -> dict[str, int]:
    """Keys are strings, so the result survives JSON unchanged."""
    return dict(Counter(text.split()))


@shared_task
def render_invoice(invoice_id: int, out_dir: str) -> str:
    """Write to a temp file of our own, then publish it atomically: safe with any concurrency."""
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        for line in range(50):
            fh.write(f"invoice {invoice_id} line {line}\n")
    final = Path(out_dir) / f"invoice-{invoice_id}.txt"
    os.replace(tmp, final)
    return str(final)


@shared_task
def is_due(due_at: float, now: float) -> bool:
    """The caller's clock travels in the message: the worker's own clock never decides."""
    return due_at <= now


@shared_task
def wall_clock() -> float:
    """What time this worker thinks it is."""
    return time.time()
