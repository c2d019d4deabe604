"""Lesson 13: the thundering herd, in retries and in locks.

"A large number of processes waiting for an event are awoken when that
event occurs, but only one process is able to proceed at a time."

Retries. A service fails every caller at the same instant (a
:class:`FlakyService`: it holds the first attempt of each caller until all
``n`` have arrived, then answers all of them 503). Each task retries:

* ``fixed``: ``self.retry(countdown=2)``: everyone comes back together;
* ``randint``: the talk's ``countdown=random.randint(30, 60)``, scaled down to
  ``randint(lo_ms, hi_ms) / 1000`` so it fits a notebook;
* ``celery``: Celery's own ``autoretry_for`` + ``retry_backoff`` +
  ``retry_jitter``. Its jitter is ``random.randrange(backoff * 2**retries + 1)``:
  whole seconds, and 0 is possible, so retries still bunch up on second
  boundaries (and some come straight back).

The service records each retry's arrival time itself; lessons count them per
250 ms window.

Locks. ``n`` contenders want one ZooKeeper lock. A :class:`NaiveLock` has
every waiter watch the lock node, so each release wakes all of them and one
wins (``n(n-1)/2`` wake-ups in total). kazoo's ``Lock`` queues contenders as
sequential nodes and each watches only its predecessor (``n-1``). Each fired
watch ``HINCRBY``-s a Redis counter for the release that caused it.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from celery import shared_task

from labkit.app import redis_client, zk_client
from labkit.lessons._probe import ProbeServer
from labkit.measure import Comparison, Measurement, windows

STRATEGIES = ("fixed", "randint", "celery")
LABELS = {
    "fixed": "before: fixed countdown",
    "randint": "after: talk's randint jitter",
    "celery": "after: Celery retry_backoff + retry_jitter",
}
WINDOW = 0.25  # seconds
ON_THE_SECOND = 0.15  # an arrival this soon after a whole second (since the failure) is "on the second"


# ============================================================================ retries
class ServiceUnavailable(Exception):
    """The flaky service answered 503."""


class FlakyService(ProbeServer):
    """Fails everyone at once: first attempts wait until ``expected`` have arrived, then all get 503.

    Later attempts are answered 200 at once. ``failed_at`` is the moment the
    503s went out; ``arrivals()`` are the retries' arrival times after it.
    """

    def __init__(self, expected: int, max_hold: float = 10.0) -> None:
        super().__init__()
        self.expected = expected
        self.max_hold = max_hold
        self.failed_at: float | None = None
        self._first = 0
        self._count_lock = threading.Lock()
        self._outage_over = threading.Event()

    def respond(self, params: dict[str, str]) -> int:
        if int(params.get("attempt", 0)) > 0:
            return 200
        with self._count_lock:
            self._first += 1
            if self._first >= self.expected:
                self.failed_at = time.time()
                self._outage_over.set()
        if not self._outage_over.wait(self.max_hold):
            with self._count_lock:  # not everyone came: fail those who did
                self.failed_at = self.failed_at or time.time()
                self._outage_over.set()
        return 503

    def arrivals(self) -> list[float]:
        """Retry arrival times, seconds after the failure."""
        t0 = self.failed_at or 0.0
        return sorted(c.start - t0 for c in self.snapshot() if c.attempt > 0)


def fetch(url: str, tag: str, attempt: int) -> int:
    """Call the flaky service; a 503 becomes :class:`ServiceUnavailable`."""
    try:
        with urllib.request.urlopen(f"{url}/call?tag={tag}&attempt={attempt}", timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            raise ServiceUnavailable(f"{url} answered 503") from None
        raise


@shared_task(bind=True, name="herd.fixed", max_retries=3)
def retry_fixed(self, url: str, tag: str, countdown: float = 2.0) -> int:
    """Retry after the same countdown as everyone else: the herd comes back together."""
    try:
        return fetch(url, tag, self.request.retries)
    except ServiceUnavailable as exc:
        raise self.retry(exc=exc, countdown=countdown) from None


@shared_task(bind=True, name="herd.randint", max_retries=3)
def retry_randint(self, url: str, tag: str, lo_ms: int = 0, hi_ms: int = 4000) -> int:
    """The talk's jitter, ``randint(30, 60)`` seconds, scaled down to milliseconds."""
    try:
        return fetch(url, tag, self.request.retries)
    except ServiceUnavailable as exc:
        raise self.retry(exc=exc, countdown=random.randint(lo_ms, hi_ms) / 1000) from None


@shared_task(bind=True, name="herd.celery", max_retries=3,
             autoretry_for=(ServiceUnavailable,), retry_backoff=4, retry_jitter=True)
def retry_celery(self, url: str, tag: str) -> int:
    """Celery's built-in: first retry after ``randrange(4 + 1)`` whole seconds."""
    return fetch(url, tag, self.request.retries)


def sliding_peak(times: list[float], width: float = WINDOW) -> int:
    """The most events in any interval of ``width`` seconds (not tied to a grid)."""
    ts, best, lo = sorted(times), 0, 0
    for hi, t in enumerate(ts):
        while t - ts[lo] >= width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def retries(cluster: Any, strategy: str, *, n: int = 60, countdown: float = 2.0,
            lo_ms: int = 0, hi_ms: int = 4000, label: str | None = None,
            deadline: float = 60.0) -> Measurement:
    """``n`` tasks fail together against a :class:`FlakyService` and retry with ``strategy``.

    Returns the peak number of retries arriving in any 250 ms, with the
    per-window counts (250 ms grid from the failure) as the timeline and the
    arrival offsets in ``meta["arrivals"]``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    with FlakyService(expected=n) as service:
        results = []
        for i in range(n):
            tag = f"t{i:02d}"
            if strategy == "fixed":
                results.append(cluster.task(retry_fixed).delay(service.url, tag, countdown))
            elif strategy == "randint":
                results.append(cluster.task(retry_randint).delay(service.url, tag, lo_ms, hi_ms))
            else:
                results.append(cluster.task(retry_celery).delay(service.url, tag))
        t0 = time.time()
        for res in results:
            res.get(timeout=max(1.0, deadline - (time.time() - t0)))
        arrivals = service.arrivals()
        first_wave = sum(1 for c in service.snapshot() if c.attempt == 0)
    grid = windows(arrivals, WINDOW, start=0.0) if arrivals else []
    on_second = sum(1 for a in arrivals if a % 1.0 < ON_THE_SECOND)
    meta = {
        "strategy": strategy, "n": n, "failed_together": first_wave,
        "arrivals": arrivals, "grid_peak": max((c for _, c in grid), default=0),
        "on_the_second": on_second / len(arrivals) if arrivals else 0.0,
        "first_second": sum(1 for a in arrivals if a < 1.0),
    }
    return Measurement(label or LABELS[strategy], "peak retries in any 250 ms", "retries",
                       [sliding_peak(arrivals)], stat="max", timeline=grid, meta=meta)


def before(cluster: Any, **params: Any) -> Measurement:
    """The herd: every task retries after the same fixed countdown."""
    return retries(cluster, "fixed", **params)


def after(cluster: Any, **params: Any) -> Measurement:
    """Jitter: the talk's uniform random countdown."""
    return retries(cluster, "randint", **params)


def compare(cluster: Any, **params: Any) -> Comparison:
    return Comparison(before(cluster, **params), after(cluster, **params), better="lower",
                      title="peak retries in any 250 ms")


def plot_arrivals(measurements: list[Measurement]):
    """Retry arrivals per 250 ms window after the failure, one panel per strategy."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from labkit.plots import colour_for  # noqa: PLC0415

    fig, axes = plt.subplots(len(measurements), 1, figsize=(9, 2.1 * len(measurements)),
                             sharex=True, sharey=True, layout="constrained", squeeze=False)
    end = max(max(m.meta["arrivals"], default=0) for m in measurements) + WINDOW
    for i, (ax, m) in enumerate(zip(axes[:, 0], measurements, strict=True)):
        starts = [t for t, _ in m.timeline or []]
        counts = [c for _, c in m.timeline or []]
        ax.bar(starts, counts, width=WINDOW, align="edge", color=colour_for(m.label, i), alpha=0.85)
        for s in range(int(end) + 1):
            ax.axvline(s, color="grey", lw=0.6, ls=":")
        ax.set_title(f"{m.label}: peak {int(m.value)} of {m.meta['n']} in any 250 ms",
                     fontsize=11, loc="left")
        ax.set_ylabel("retries / 250 ms")
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_xlim(-WINDOW, end + WINDOW)
    axes[-1, 0].set_xlabel("seconds after the service failed everyone (dotted: whole seconds)")
    return fig


# ============================================================================ locks
class NaiveLock:
    """A lock where every waiter watches the same node: each release wakes them all.

    ``acquire`` tries to create one ephemeral node; if it exists, it sets an
    ``exists`` watch on it and sleeps until the watch fires, then tries again.
    Correct, but each release wakes every waiter, and all but one go back to
    sleep: the thundering herd.
    """

    def __init__(self, client: Any, path: str, on_wake: Callable[[], None] | None = None) -> None:
        self.client = client
        self.path = path
        self.on_wake = on_wake

    def acquire(self, timeout: float = 30.0) -> bool:
        from kazoo.exceptions import NodeExistsError  # noqa: PLC0415

        self.client.ensure_path(self.path.rsplit("/", 1)[0])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.client.create(self.path, ephemeral=True)
                return True
            except NodeExistsError:
                woke = threading.Event()

                def watcher(_event: Any, woke: threading.Event = woke) -> None:
                    if self.on_wake:
                        self.on_wake()
                    woke.set()

                if self.client.exists(self.path, watch=watcher):  # still held: sleep until it changes
                    woke.wait(max(0.0, deadline - time.monotonic()))
        return False

    def release(self) -> None:
        self.client.delete(self.path)


def _counting_lock(client: Any, path: str, on_wake: Callable[[], None]) -> Any:
    """kazoo's ``Lock``, with its predecessor watch counted."""
    from kazoo.recipe.lock import Lock  # noqa: PLC0415

    class CountingLock(Lock):
        def _watch_predecessor(self, event: Any) -> None:
            on_wake()
            super()._watch_predecessor(event)

    return CountingLock(client, path)


@shared_task(name="herd.contend")
def contend(run: str, recipe: str, path: str, n: int, hold: float = 0.05) -> int:
    """Wait for the lock, hold it ``hold`` s, release. Fired watches are counted per release."""
    r = redis_client()

    def woke() -> None:  # runs in kazoo's event thread when a watch fires
        r.hincrby(f"{run}:wakes", int(r.get(f"{run}:releases") or 0), 1)

    client = zk_client()
    lock = NaiveLock(client, path, woke) if recipe == "naive" else _counting_lock(client, path, woke)
    r.incr(f"{run}:arrived")
    if not lock.acquire(timeout=30):
        raise TimeoutError(f"no lock on {path} in 30 s")
    try:
        start = time.monotonic()  # the first holder waits until every contender has queued
        while int(r.get(f"{run}:arrived") or 0) < n and time.monotonic() - start < 10:
            time.sleep(0.01)
        time.sleep(hold)
    finally:
        r.incr(f"{run}:releases")  # before the release: its wake-ups count for this one
        lock.release()
    return 1


def locks(cluster: Any, recipe: str, *, n: int = 15, hold: float = 0.05,
          label: str | None = None) -> Measurement:
    """``n`` contenders take one lock in turn; watch wake-ups per release (sum = total)."""
    if recipe not in ("naive", "kazoo"):
        raise ValueError("recipe must be 'naive' or 'kazoo'")
    run = f"herd:{uuid.uuid4().hex[:8]}"
    path = f"/labkit/herd/{run[5:]}/lock"
    results = [cluster.task(contend).delay(run, recipe, path, n, hold) for _ in range(n)]
    for res in results:
        res.get(timeout=60)
    r = cluster.redis_client()
    wakes = {int(k): int(v) for k, v in r.hgetall(f"{run}:wakes").items()}
    r.delete(f"{run}:wakes", f"{run}:arrived", f"{run}:releases")
    r.close()
    per_release = [wakes.get(k, 0) for k in range(1, n + 1)]
    default = {"naive": "naive: all watch one node", "kazoo": "after: kazoo Lock (watch predecessor)"}
    return Measurement(label or default[recipe], "watch wake-ups", "wake-ups", per_release,
                       stat="sum", timeline=[(k, w) for k, w in enumerate(per_release, start=1)],
                       meta={"recipe": recipe, "n": n, "before_first_release": wakes.get(0, 0)})


def compare_locks(cluster: Any, n: int = 15, hold: float = 0.05) -> Comparison:
    """Total watch wake-ups, naive lock vs kazoo's recipe, same contenders."""
    return Comparison(locks(cluster, "naive", n=n, hold=hold), locks(cluster, "kazoo", n=n, hold=hold),
                      better="lower", title=f"watch wake-ups, {n} contenders")


def plot_wakeups(comparison: Comparison):
    """Wake-ups caused by each release, and the totals."""
    from labkit.plots import bars, panels, timelines  # noqa: PLC0415
    from labkit.table import fmt  # noqa: PLC0415

    fig, (ax1, ax2) = panels(2, width=5.5)
    timelines([comparison.before, comparison.after], ax=ax1, step=False,
              title="wake-ups caused by each release",
              xlabel="release k (n - k contenders still waiting)")
    for line in ax1.get_lines():
        line.set_marker("o")
    ax1.set_ylabel("wake-ups")
    bars([comparison.before, comparison.after], ax2, show_points=False,
         title=f"total wake-ups: {fmt(comparison.factor)}x fewer with the recipe")
    ax2.set_ylabel("total wake-ups")
    return fig
