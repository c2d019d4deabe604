"""``%load_ext labkit``: the ``%%task`` cell magic.

    %%task                      # the notebook's running cluster
    %%task --cluster c2         # a variable holding a cluster, or a cluster id
    %%task --module helpers     # name the module (default: cell_<first function>)
    from celery import shared_task

    @shared_task
    def add(x, y):
        return x + y

The cell becomes a module loaded into the kernel and every worker of the
cluster, now and when workers start later (:meth:`ClusterClient.define
<labkit.client.ClusterClient.define>`); its names land in the notebook as if
the cell had run there, with each task bound to that cluster, so
``add.delay(2, 3)`` works at once. Running the cell again replaces the tasks
everywhere. Errors quote the cell's own line numbers.
"""

from __future__ import annotations

import sys
from typing import Any

from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .client import ClusterClient
from .define import Defined, DefineError
from .status import Status

_LIVE = (Status.RUNNING, Status.ATTACHED)


def find_cluster(namespace: dict[str, Any], name: str | None = None) -> ClusterClient:
    """The cluster a ``%%task`` cell means: ``name`` (a variable or a cluster id), else the only one."""
    from .cluster import LocalCluster  # noqa: PLC0415

    running = {c.id: c for c in LocalCluster._instances.values() if c.state == Status.RUNNING}
    for value in namespace.values():
        if isinstance(value, ClusterClient) and value.state in _LIVE:
            running.setdefault(value.id, value)
    if name:
        value = namespace.get(name)
        if isinstance(value, ClusterClient):
            if value.state not in _LIVE:
                raise DefineError(f"cluster {name!r} is {value.state}; start it (or a new one) first")
            return value
        if name in running:
            return running[name]
        raise DefineError(f"no running cluster called {name!r}: name a variable holding one, or one of "
                          f"these cluster ids: {sorted(running) or 'none'}")
    if len(running) == 1:
        return next(iter(running.values()))
    if not running:
        raise DefineError("no cluster is running in this notebook: start one (cluster = LocalCluster()) "
                          "or attach to one (cluster = labkit.attach()), then run this cell again")
    raise DefineError(f"{len(running)} clusters are running ({', '.join(sorted(running))}); "
                      "say which: %%task --cluster NAME (a variable or a cluster id)")


@magics_class
class TaskMagics(Magics):
    """``%%task``: define Celery tasks in a cell, on every worker of the cluster."""

    @magic_arguments()
    @argument("--cluster", "-c", default=None, help="a variable holding the cluster, or its id")
    @argument("--module", "-m", default=None, help="module name (default: cell_<first function>)")
    @argument("--timeout", "-t", type=float, default=10.0, help="seconds to wait for every worker")
    @cell_magic
    def task(self, line: str, cell: str) -> Defined:
        """Load this cell into the kernel and every worker; its tasks are replaced on rerun."""
        args = parse_argstring(self.task, line)
        cluster = find_cluster(self.shell.user_ns, args.cluster)
        defined = cluster.define(cell, args.module, line_offset=1, timeout=args.timeout)
        names = {k: v for k, v in vars(sys.modules[defined.module]).items() if not k.startswith("_")}
        names.update(defined.tasks)  # bound to this cluster's app, whatever app is current
        self.shell.push(names)
        return defined


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(TaskMagics)
