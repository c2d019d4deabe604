"""labkit: lesson notebooks that show distributed-computing pitfalls on a real local cluster.

The names below load on first use, so a fresh measurement process that only
needs ``labkit.measure`` does not pay for importing Celery, redis-py and kazoo.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["AttachedCluster", "LocalCluster", "ServiceError", "WorkerSpec", "attach"]
__version__ = "0.1.0"

_WHERE = {
    "AttachedCluster": ".cluster",
    "LocalCluster": ".cluster",
    "attach": ".cluster",
    "ServiceError": ".services.base",
    "WorkerSpec": ".services.worker",
}

if TYPE_CHECKING:  # pragma: no cover
    from .cluster import AttachedCluster, LocalCluster, attach
    from .services.base import ServiceError
    from .services.worker import WorkerSpec


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
