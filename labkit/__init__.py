"""labkit: lesson notebooks that show distributed-computing pitfalls on a real local cluster."""

from .cluster import AttachedCluster, LocalCluster, attach
from .services.base import ServiceError
from .services.worker import WorkerSpec

__all__ = ["AttachedCluster", "LocalCluster", "ServiceError", "WorkerSpec", "attach"]
__version__ = "0.1.0"
