"""The playground's helpers (``notebooks/99_playground.ipynb``): shape, fan out, break.

Not a lesson: no claim, nothing to prove — a sandbox to try "what if
prefetch were 1?" on a real cluster. As everywhere in the kit, each widget
wraps a plain function the notebook also calls directly, so the notebook
runs top to bottom under nbval without a click:

* :func:`cluster_config` -> ``LocalCluster`` keyword arguments for a shape,
  and :func:`shape_form`, the same choice with sliders and a button that
  replaces the notebook's cluster;
* :func:`fan_out` sends one task per item and reports who ran what (from the
  result backend: ``result_extended`` records each task's worker);
* :func:`fault_panel`, a button per fault for every worker and Redis, each
  one call of the cluster's own API (``kill``, ``pause``/``resume``,
  ``restart``, ``partition``/``heal``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .table import Table

if TYPE_CHECKING:  # pragma: no cover
    from .cluster import LocalCluster

POOLS = ("prefork", "threads", "solo")


def cluster_config(workers: int = 2, concurrency: int = 2, pool: str = "prefork", prefetch: int = 4,
                   zookeeper: int = 1, relay: bool = True) -> dict[str, Any]:
    """``LocalCluster`` keyword arguments for a cluster of this shape.

    ``prefetch`` is ``worker_prefetch_multiplier`` (Celery's default is 4);
    ``relay=True`` routes each worker's Redis traffic through a relay so the
    fault panel can partition it; ``worker_direct`` lets you call one worker
    (``task.apply_async(queue=worker_direct(hostname))``); task events are on,
    so ``cluster.dashboard()`` sees every task.
    """
    return {
        "workers": workers,
        "zookeeper": zookeeper,
        "events": True,
        "worker_options": {"concurrency": concurrency, "pool": pool, "prefetch_multiplier": prefetch,
                           "relay": relay},
        "settings": {"worker_direct": True},
    }


def shape_form(namespace: dict[str, Any], name: str = "cluster", **defaults: Any) -> Any:
    """Sliders for :func:`cluster_config` and a button that replaces ``namespace[name]``.

    The old cluster is closed first (its tasks defined with ``%%task`` go with
    its Redis: run those cells again). Returns the widget box.
    """
    import inspect  # noqa: PLC0415

    import ipywidgets as w  # noqa: PLC0415
    from IPython.display import display  # noqa: PLC0415

    from .cluster import LocalCluster  # noqa: PLC0415

    d = {k: p.default for k, p in inspect.signature(cluster_config).parameters.items()} | defaults
    controls = {
        "workers": w.IntSlider(d["workers"], min=0, max=4, description="workers"),
        "concurrency": w.IntSlider(d["concurrency"], min=1, max=4, description="concurrency"),
        "pool": w.Dropdown(options=POOLS, value=d["pool"], description="pool"),
        "prefetch": w.IntSlider(d["prefetch"], min=1, max=16, description="prefetch ×"),
        "zookeeper": w.Dropdown(options=[0, 1, 3], value=d["zookeeper"], description="ZooKeeper"),
        "relay": w.Checkbox(d["relay"], description="relay (partitionable)"),
    }
    button = w.Button(description="Start a cluster of this shape", icon="play", button_style="primary",
                      layout=w.Layout(width="auto"))
    out = w.Output()

    def start(_b: Any) -> None:
        button.disabled = True
        with out:
            out.clear_output()
            old = namespace.get(name)
            if old is not None and hasattr(old, "close"):
                old.close()
            print("starting ...")
            cluster = LocalCluster(**cluster_config(**{k: c.value for k, c in controls.items()}), reuse=False)
            namespace[name] = cluster
            out.clear_output()
            display(cluster)
            print(f"`{name}` is this cluster now; run your %%task cells again to define tasks on it")
        button.disabled = False

    button.on_click(start)
    box = w.VBox([w.HBox([controls["workers"], controls["concurrency"], controls["pool"]]),
                  w.HBox([controls["prefetch"], controls["zookeeper"], controls["relay"]]), button, out])
    display(box)
    return box


@dataclass
class FanOut:
    """What :func:`fan_out` saw: results in order, who ran each task, and how long it all took."""

    task: str
    results: list[Any]
    workers: list[str]
    seconds: float
    failures: list[str] = field(default_factory=list)

    def per_worker(self) -> dict[str, int]:
        return dict(sorted(Counter(self.workers).items()))

    def table(self) -> Table:
        counts = self.per_worker()
        return Table(["worker", "tasks"], list(counts.items()),
                     title=f"{len(self.results)} × {self.task} in {self.seconds:.2f} s",
                     note=f"{len(self.failures)} failed" if self.failures else "")

    def plot(self, ax: Any = None) -> Any:
        """Tasks per worker, as bars."""
        from .plots import NEUTRAL, axis, style  # noqa: PLC0415

        ax = axis(ax)
        counts = self.per_worker()
        ax.bar(list(counts), list(counts.values()), color=NEUTRAL[: len(counts)] or NEUTRAL[0])
        return style(ax, title=f"who ran the {len(self.results)} tasks ({self.seconds:.2f} s)", ylabel="tasks")

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def __repr__(self) -> str:
        return str(self.table())


def fan_out(task: Any, items: Iterable[Any], *, timeout: float = 60.0, star: bool = False) -> FanOut:
    """Send ``task`` once per item (``task.delay(item)``, or ``*item`` with ``star``) and wait for all.

    A failed task is recorded, not raised. Each task's worker is read from
    its stored result (``result_extended``).
    """
    t0 = time.perf_counter()
    calls = [task.delay(*item) if star else task.delay(item) for item in items]
    results, workers, failures = [], [], []
    for call in calls:
        try:
            results.append(call.get(timeout=timeout, propagate=True))
        except Exception as exc:
            results.append(exc)
            failures.append(f"{call.id}: {type(exc).__name__}: {exc}")
        workers.append((call.worker or "?").split("@", 1)[0])
    return FanOut(getattr(task, "name", str(task)), results, workers, time.perf_counter() - t0, failures)


FAULTS: dict[str, Callable[[LocalCluster, str], Any]] = {
    "kill": lambda c, n: c.kill(n),
    "kill a child": lambda c, n: c.kill(n, child=0),
    "pause": lambda c, n: c.pause(n),
    "resume": lambda c, n: c.resume(n),
    "restart": lambda c, n: c.restart(n),
    "partition": lambda c, n: c.partition(n),
    "heal": lambda c, n: c.heal(n),
}


def fault_panel(cluster: LocalCluster) -> Any:
    """A row of fault buttons per worker (and for Redis) with the cluster's status below.

    Each button is one call of the cluster's API — the same call you can type
    (``cluster.pause("w1")``); partition/heal appear for workers with a relay.
    """
    import ipywidgets as w  # noqa: PLC0415

    status = w.HTML(cluster._repr_html_())
    message = w.HTML()

    def act(fault: str, name: str) -> Callable[[Any], None]:
        def run(_b: Any) -> None:
            try:
                FAULTS[fault](cluster, name)
                message.value = f"<code>{fault} {name}</code>: done"
            except Exception as exc:  # shown, not raised: a button has no cell to fail
                message.value = f"<code>{fault} {name}</code>: <b style='color:#c62828'>{type(exc).__name__}</b>: {exc}"
            status.value = cluster._repr_html_()
        return run

    rows = []
    for name in [*cluster.workers, "redis"]:
        faults = [f for f in FAULTS if name != "redis" or f in ("kill", "pause", "resume", "restart")]
        if name not in cluster.relays:
            faults = [f for f in faults if f not in ("partition", "heal")]
        buttons = []
        for fault in faults:
            b = w.Button(description=fault, layout=w.Layout(width="auto"),
                         button_style="danger" if fault.startswith("kill") or fault == "partition" else "")
            b.on_click(act(fault, name))
            buttons.append(b)
        rows.append(w.HBox([w.Label(name, layout=w.Layout(width="4em")), *buttons]))
    refresh = w.Button(description="refresh status", icon="refresh", layout=w.Layout(width="auto"))
    refresh.on_click(lambda _b: setattr(status, "value", cluster._repr_html_()))
    return w.VBox([*rows, w.HBox([refresh]), message, status])
