"""Per-process clock skew with libfaketime (used by ``WorkerSpec(clock_offset=...)``)."""

from __future__ import annotations

import glob
import os


def find_libfaketime() -> str | None:
    """Path of ``libfaketime.so.1`` (``$LABKIT_LIBFAKETIME`` first), or None."""
    explicit = os.environ.get("LABKIT_LIBFAKETIME")
    if explicit:
        return explicit
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    return found[0] if found else None
