"""labkit: lesson notebooks that show distributed-computing pitfalls on a real local cluster.

The names below load on first use, so a fresh measurement process that only
needs ``labkit.measure`` does not pay for importing Celery, redis-py and kazoo.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["AttachedCluster", "ClusterLike", "LocalCluster", "ServiceError", "Status", "WorkerSpec", "attach"]
__version__ = "0.1.0"

_WHERE = {
    "AttachedCluster": ".client",
    "ClusterLike": ".client",
    "LocalCluster": ".cluster",
    "Status": ".status",
    "attach": ".client",
    "ServiceError": ".services.base",
    "WorkerSpec": ".services.worker",
}

if TYPE_CHECKING:  # pragma: no cover
    from .client import AttachedCluster, ClusterLike, attach
    from .cluster import LocalCluster
    from .services.base import ServiceError
    from .services.worker import WorkerSpec
    from .status import Status


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext labkit``: adds the ``%%task`` cell magic (:mod:`labkit.magics`)."""
    from .magics import load_ipython_extension as load  # noqa: PLC0415

    load(ipython)
