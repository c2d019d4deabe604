"""labkit: lesson notebooks that show distributed-computing pitfalls on a real local cluster."""

from .cluster import LocalCluster
from .services.base import ServiceError
from .services.worker import WorkerSpec

__all__ = ["LocalCluster", "ServiceError", "WorkerSpec"]
__version__ = "0.1.0"
