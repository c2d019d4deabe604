"""Loaded at start-up by processes that labkit runs under libfaketime (see ``labkit.faketime``).

With ``FAKETIME_DONT_FAKE_MONOTONIC=1``, libfaketime's ``clock_nanosleep``
wrapper rejects CPython's absolute monotonic deadline, so ``time.sleep``
raises EINVAL. Replace it with a ``select()``-based sleep: a relative
timeout that libfaketime passes through and CPython restarts after signals.
Any other ``sitecustomize`` further down ``sys.path`` still runs.
"""

import os
import sys


def _install() -> None:
    if "faketime" not in os.environ.get("LD_PRELOAD", "") or not os.environ.get("FAKETIME_DONT_FAKE_MONOTONIC"):
        return
    import select
    import time

    def sleep(secs: float) -> None:
        """time.sleep(secs), immune to libfaketime's clock_nanosleep wrapper."""
        if secs < 0:
            raise ValueError("sleep length must be non-negative")
        select.select([], [], [], secs)

    sleep.__wrapped__ = time.sleep
    time.sleep = sleep


def _chain() -> None:
    """Run the next ``sitecustomize`` on sys.path, if there is one (ours shadows it)."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and spec.origin != os.path.abspath(__file__):
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_install()
_chain()
