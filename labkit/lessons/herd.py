"""Lesson 13: the thundering herd, in retries and in locks.

"A large number of processes waiting for an event are awoken when that
event occurs, but only one process is able to proceed at a time."

Retries. A service fails every caller at the same instant (a
:class:`FlakyService`: it holds the first attempt of each caller until all
``n`` have arrived, then answers all of them 503). Each task retries:

* ``fixed``: ``self.retry(countdown=30)``: everyone comes back together;
* ``randint``: the talk's ``countdown=random.randint(30, 60)``, as written;
* ``celery``: Celery's own ``autoretry_for`` + ``retry_backoff=60`` +
  ``retry_jitter``: the first retry after ``random.randrange(60 + 1)``.

All three count delays in the talk's seconds, and all three run scaled by
the same ``tick`` (a :class:`TalkSeconds` task turns ``countdown=c`` into
``c * tick`` real seconds), so a notebook can wait for them: like is compared
with like — same unit, same whole-number grain, the talk's 30 s floor kept.
The service records each retry's arrival itself; the metric is the most
retries arriving in any :data:`WINDOW` talk-seconds.

Locks. ``n`` contenders want one ZooKeeper lock. A :class:`NaiveLock` has
every waiter watch the lock node, so each release wakes all of them and one
wins (``n(n-1)/2`` wake-ups in total). kazoo's ``Lock`` queues contenders as
sequential nodes and each watches only its predecessor (``n-1``). What is
counted is the kazoo *watch callbacks* — waiters woken in the client. ZooKeeper
itself sends one notification per watched path per *session* (all threads of
a worker share one kazoo session) and kazoo fans it out to every callback;
the distinct sessions notified per release are counted too.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from math import comb
from typing import Any

from celery import Task, shared_task

from labkit.app import redis_client, zk_client
from labkit.client import ClusterLike
from labkit.lessons._probe import ProbeServer
from labkit.measure import Comparison, Measurement, claim, verify, windows
from labkit.poll import poll_until

NOTEBOOK = "13_thundering_herd.ipynb"
#: Threads, not processes: the first wave must all be waiting on the service at
#: once (up to 128 callers), and on 2 cores that many prefork children would be
#: waste for work that only waits on the network. acks_late + prefetch 1 caps
#: what each worker holds at its thread count. No STARTED state and no extended
#: results: every write a retry does not need is CPU the herd would wait for.
HOST = {"pool": "threads", "concurrency": 64, "prefetch_multiplier": 1}
CLUSTER: dict[str, Any] = {
    "workers": [{"name": "h1", **HOST}, {"name": "h2", **HOST}],
    "zookeeper": 1,
    "settings": {"task_acks_late": True, "task_track_started": False, "result_extended": False},
}
WORKSHOP = {"N": 100, "CONTENDERS": 20}

STRATEGIES = ("fixed", "randint", "celery")
LABELS = {
    "fixed": "before: fixed countdown",
    "randint": "after: talk's randint(30, 60)",
    "celery": "after: Celery retry_backoff + retry_jitter",
}
FLOOR = 30  # the talk's randint(30, 60) never waits less: a quiet period for the service
TALK_DELAYS = 31  # randint(30, 60) draws one of 31 whole numbers
WINDOW = 5  # talk-seconds: the peak is the most retries arriving in any window this wide
MIN_N = 20  # below this, chance alone can put most of a jittered herd in one window
CHANCE = 1e-6  # the claims' odds of failing by bad luck, per run


# ============================================================================ retries
class ServiceUnavailable(Exception):
    """The flaky service answered 503."""


class FlakyService(ProbeServer):
    """Fails everyone at once: first attempts wait until ``expected`` have arrived, then all get 503.

    Later attempts are answered 200 at once. ``failed_at`` is the moment the
    503s went out; ``together`` says whether all ``expected`` were there (not
    released by ``max_hold``); ``arrivals()`` are the retries' arrival times.
    """

    def __init__(self, expected: int, max_hold: float = 10.0) -> None:
        super().__init__()
        self.expected = expected
        self.max_hold = max_hold
        self.failed_at: float | None = None
        self.together = False
        self._first = 0
        self._count_lock = threading.Lock()
        self._outage_over = threading.Event()

    def respond(self, params: dict[str, str]) -> int:
        if int(params.get("attempt", 0)) > 0:
            return 200
        with self._count_lock:
            self._first += 1
            if self._first >= self.expected and not self._outage_over.is_set():
                self.failed_at, self.together = time.time(), True
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


class TalkSeconds(Task):
    """A task whose retry delays are written in the talk's seconds and run ``tick`` times faster.

    ``retry(countdown=c)`` waits ``c * tick`` real seconds, ``tick`` being the
    task's keyword argument. Every retry goes through here — a hand-written
    ``self.retry(...)`` and Celery's ``autoretry_for`` alike — so every
    strategy is scaled the same way and keeps its shape: its whole-number
    grain, its floor, its range.
    """

    def retry(self, *args: Any, countdown: float | None = None, **kwargs: Any) -> Any:
        if countdown is not None:
            countdown = countdown * float(self.request.kwargs.get("tick", 1.0))
        return super().retry(*args, countdown=countdown, **kwargs)


@shared_task(bind=True, base=TalkSeconds, name="herd.fixed", max_retries=3)
def retry_fixed(self, url: str, tag: str, countdown: int = 30, *, tick: float = 1.0) -> int:
    """Retry after the same countdown as everyone else: the herd comes back together."""
    try:
        return fetch(url, tag, self.request.retries)
    except ServiceUnavailable as exc:
        raise self.retry(exc=exc, countdown=countdown) from None


@shared_task(bind=True, base=TalkSeconds, name="herd.randint", max_retries=3)
def retry_randint(self, url: str, tag: str, *, tick: float = 1.0) -> int:
    """The talk's jitter as on its slide: ``random.randint(30, 60)`` whole seconds."""
    try:
        return fetch(url, tag, self.request.retries)
    except ServiceUnavailable as exc:
        raise self.retry(exc=exc, countdown=random.randint(30, 60)) from None


#: Celery's first retry waits ``randrange(BACKOFF + 1)`` seconds. A constant, not read back from the
#: task at import time: that looks the task up in the current app, which may be a closed cluster's.
BACKOFF = 60


@shared_task(bind=True, base=TalkSeconds, name="herd.celery", max_retries=3,
             autoretry_for=(ServiceUnavailable,), retry_backoff=BACKOFF, retry_jitter=True)
def retry_celery(self, url: str, tag: str, *, tick: float = 1.0) -> int:
    """Celery's built-in: the first retry after ``random.randrange(60 + 1)`` whole seconds."""
    return fetch(url, tag, self.request.retries)


TASKS = {"fixed": retry_fixed, "randint": retry_randint, "celery": retry_celery}


def sliding_peak(times: list[float], width: float) -> int:
    """The most events in any interval of ``width`` (not tied to a grid)."""
    ts, best, lo = sorted(times), 0, 0
    for hi, t in enumerate(ts):
        while t - ts[lo] >= width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def chance_peak(n: int, delays: int = TALK_DELAYS, window: int = WINDOW, odds: float = CHANCE) -> int:
    """The most of ``n`` retries that random whole-second delays put in any ``window`` s, but once in 1/odds runs.

    Each retry picks one of ``delays`` equally likely whole seconds; a window
    of ``window`` seconds can hold ``window + 1`` of them (its edges catch
    neighbours when arrivals wobble by a few ms). Union bound over the
    ``delays`` places a window can start: ``delays * P(Binomial(n, p) >= k)``
    must stay below ``odds``. A herd that puts more than this in one window
    did not come from such jitter.
    """
    p = min(1.0, (window + 1) / delays)

    def tail(k: int) -> float:
        return sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))

    return next((k for k in range(n + 1) if delays * tail(k) <= odds), n)


def fewest_before_floor(n: int, odds: float = CHANCE) -> int:
    """The fewest of ``n`` Celery first retries (``randrange(BACKOFF + 1)``) landing before :data:`FLOOR`, but once in 1/odds runs."""
    p = FLOOR / (BACKOFF + 1)

    def head(k: int) -> float:  # P(Binomial(n, p) < k)
        return sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k))

    return max(k for k in range(n + 1) if head(k) <= odds)


def retries(cluster: ClusterLike, strategy: str = "fixed", *, n: int = 60, tick: float = 0.06,
            countdown: int = FLOOR, label: str | None = None) -> Measurement:
    """``n`` tasks fail together against a :class:`FlakyService` and retry with ``strategy``.

    Delays are in the talk's seconds, each worth ``tick`` real seconds. The
    value is the most retries arriving in any :data:`WINDOW` talk-seconds; the
    timeline counts them per window from the failure, and ``meta["arrivals"]``
    holds every arrival in talk-seconds after the failure.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    if n < MIN_N:
        raise ValueError(f"n={n} is too small a herd: with fewer than {MIN_N} tasks chance alone can put "
                         f"most of a jittered herd in one window; use n >= {MIN_N}")
    if not 0.02 <= tick <= 1.0:
        raise ValueError(f"tick={tick} s per talk-second: use 0.02-1.0 (smaller and the workers' own "
                         "scheduling noise becomes a sizeable part of a 'second')")
    task = cluster.task(TASKS[strategy])
    extra = (countdown,) if strategy == "fixed" else ()
    with FlakyService(expected=n) as service:
        results = [task.delay(service.url, f"t{i:03d}", *extra, tick=tick) for i in range(n)]
        deadline = time.monotonic() + 30 + 120 * tick
        for res in results:
            res.get(timeout=max(1.0, deadline - time.monotonic()))
        seconds = service.arrivals()
        first_wave = sum(1 for c in service.snapshot() if c.attempt == 0)
        together = service.together
    if not together:
        raise RuntimeError(
            f"only {first_wave} of {n} first attempts were waiting on the service together within "
            f"{service.max_hold:g} s: the workers have fewer free threads than n. Lower n, or give the "
            f"cluster more threads (this lesson's CLUSTER has {2 * HOST['concurrency']})")
    if len(seconds) != n:
        raise RuntimeError(f"{len(seconds)} of {n} retries reached the service; see the worker logs")
    arrivals = [s / tick for s in seconds]
    meta = {
        "strategy": strategy, "n": n, "tick": tick, "window": WINDOW, "arrivals": arrivals,
        "countdown": countdown if strategy == "fixed" else None,
        "before_floor": sum(1 for a in arrivals if a < FLOOR),
        "spread": arrivals[-1] - arrivals[0],
    }
    return Measurement(label or LABELS[strategy], f"peak retries in any {WINDOW} s", "retries",
                       [sliding_peak(arrivals, WINDOW)], stat="max",
                       timeline=windows(arrivals, WINDOW, start=0.0), meta=meta)


def before(cluster: ClusterLike, *, n: int = 60, tick: float = 0.06, countdown: int = FLOOR) -> Measurement:
    """The herd: every task retries after the same fixed countdown."""
    return retries(cluster, "fixed", n=n, tick=tick, countdown=countdown)


def after(cluster: ClusterLike, *, n: int = 60, tick: float = 0.06) -> Measurement:
    """Jitter: the talk's ``randint(30, 60)``."""
    return retries(cluster, "randint", n=n, tick=tick)


def celery_backoff(cluster: ClusterLike, *, n: int = 60, tick: float = 0.06) -> Measurement:
    """Celery's built-in: ``autoretry_for`` + ``retry_backoff=60`` + ``retry_jitter``."""
    return retries(cluster, "celery", n=n, tick=tick)


def compare(cluster: ClusterLike, *, n: int = 60, tick: float = 0.06, countdown: int = FLOOR) -> Comparison:
    """A fixed countdown vs the talk's jitter, same herd, same scale."""
    return Comparison(before(cluster, n=n, tick=tick, countdown=countdown), after(cluster, n=n, tick=tick),
                      better="lower", title=f"peak retries in any {WINDOW} s")


@claim("a fixed countdown brings the herd back in one window; with jitter no window gets more than chance allows")
def jitter_spreads_the_herd(fixed: Measurement, jittered: Measurement) -> None:
    """More retries than :func:`chance_peak` in one window is a herd; jitter must stay at or under it.

    The bound is for the talk's 31 possible delays; Celery's 61 spread wider,
    so the same bound holds for it with room to spare.
    """
    n = jittered.meta["n"]
    bound = chance_peak(n)
    arrivals = fixed.meta["arrivals"] or [0.0]
    verify(f"a fixed countdown puts more than {bound} of {n} retries in one {WINDOW} s window, "
           f"and jitter ({jittered.label}) no more than that",
           fixed.meta["n"] == n and fixed.value > bound >= jittered.value,
           fixed=fixed.value, jittered=jittered.value, chance_bound=bound, n=n,
           fixed_spread=f"{max(arrivals) - min(arrivals):.1f} s (if this is many seconds, the workers were too "
                        "starved of CPU to send the retries together at this tick: raise TICK)")


@claim("the talk's randint(30, 60) keeps a 30 s quiet period; Celery's full jitter sends about half back sooner")
def only_the_talk_keeps_a_floor(talk: Measurement, celery: Measurement) -> None:
    """No retry of the talk's comes back before 30 s; at least :func:`fewest_before_floor` of Celery's do."""
    n = celery.meta["n"]
    least = max(1, fewest_before_floor(n))
    verify(f"none of the talk's retries come back before {FLOOR} s, and at least {least} of {n} of "
           f"{celery.label}'s do",
           talk.meta["before_floor"] == 0 and celery.meta["before_floor"] >= least,
           talk_before_floor=talk.meta["before_floor"], celery_before_floor=celery.meta["before_floor"],
           required=least)


def plot_arrivals(measurements: list[Measurement]):
    """Retry arrivals per window after the failure, one panel per strategy (x in talk-seconds)."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from labkit.plots import colour_for  # noqa: PLC0415

    fig, axes = plt.subplots(len(measurements), 1, figsize=(9, 2.1 * len(measurements)),
                             sharex=True, sharey=True, layout="constrained", squeeze=False)
    end = max(max(m.meta["arrivals"], default=0) for m in measurements) + WINDOW
    bound = chance_peak(measurements[0].meta["n"])
    for i, (ax, m) in enumerate(zip(axes[:, 0], measurements, strict=True)):
        starts = [t for t, _ in m.timeline or []]
        counts = [c for _, c in m.timeline or []]
        ax.bar(starts, counts, width=WINDOW, align="edge", color=colour_for(m.label, i), alpha=0.85,
               edgecolor="white")
        ax.axvline(FLOOR, color="grey", lw=0.8, ls=":")
        ax.axhline(bound, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{m.label}: peak {int(m.value)} of {m.meta['n']} in any {WINDOW} s, "
                     f"{m.meta['before_floor']} before {FLOOR} s", fontsize=11, loc="left")
        ax.set_ylabel(f"retries / {WINDOW} s")
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_xlim(-1, end + 1)
    axes[-1, 0].set_xlabel(f"talk-seconds after the service failed everyone (dotted: the talk's {FLOOR} s "
                           f"floor; dashed: the most random jitter puts in a window, {bound})")
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
    """Wait for the lock, hold it ``hold`` s, release. Fired watches are counted per release.

    Each watch callback (a waiter woken in this worker's kazoo client) adds
    one to ``wakes[k]`` for the release ``k`` that fired it, and adds this
    process's ZooKeeper session to ``sessions:k``: ZooKeeper sends one
    notification per session, and kazoo hands it to every callback waiting.
    """
    r = redis_client()
    client = zk_client()
    session = client.client_id[0] if client.client_id else 0

    def woke() -> None:  # runs in kazoo's event thread when a watch fires
        release = int(r.get(f"{run}:releases") or 0)
        r.hincrby(f"{run}:wakes", release, 1)
        r.sadd(f"{run}:sessions:{release}", session)

    lock = NaiveLock(client, path, woke) if recipe == "naive" else _counting_lock(client, path, woke)
    r.incr(f"{run}:arrived")
    if not lock.acquire(timeout=30):
        raise TimeoutError(f"no lock on {path} in 30 s")
    try:  # the first holder waits until every contender has queued
        poll_until(lambda: int(r.get(f"{run}:arrived") or 0) >= n, timeout=10, interval=0.01)
        time.sleep(hold)
    finally:
        r.incr(f"{run}:releases")  # before the release: its wake-ups count for this one
        lock.release()
    return 1


def locks(cluster: ClusterLike, recipe: str = "naive", *, n: int = 15, hold: float = 0.05,
          label: str | None = None) -> Measurement:
    """``n`` contenders take one lock in turn; watch callbacks per release (sum = total)."""
    if recipe not in ("naive", "kazoo"):
        raise ValueError("recipe must be 'naive' or 'kazoo'")
    if n < 2:
        raise ValueError(f"n={n}: a lock needs at least 2 contenders to have anyone waiting")
    run = f"herd:{uuid.uuid4().hex[:8]}"
    path = f"/labkit/herd/{run[5:]}/lock"
    results = [cluster.task(contend).delay(run, recipe, path, n, hold) for _ in range(n)]
    for res in results:
        res.get(timeout=60)
    r = cluster.redis_client()
    wakes = {int(k): int(v) for k, v in r.hgetall(f"{run}:wakes").items()}
    sessions = [r.scard(f"{run}:sessions:{k}") for k in range(1, n + 1)]
    r.delete(f"{run}:wakes", f"{run}:arrived", f"{run}:releases", *(f"{run}:sessions:{k}" for k in range(n + 1)))
    r.close()
    per_release = [wakes.get(k, 0) for k in range(1, n + 1)]
    default = {"naive": "naive: all watch one node", "kazoo": "after: kazoo Lock (watch predecessor)"}
    return Measurement(label or default[recipe], "watch callbacks", "wake-ups", per_release,
                       stat="sum", timeline=[(k, w) for k, w in enumerate(per_release, start=1)],
                       meta={"recipe": recipe, "n": n, "hold": hold, "sessions_notified": sessions,
                             "before_first_release": wakes.get(0, 0)})


def compare_locks(cluster: ClusterLike, *, n: int = 15, hold: float = 0.05) -> Comparison:
    """Total watch callbacks, naive lock vs kazoo's recipe, same contenders."""
    return Comparison(locks(cluster, "naive", n=n, hold=hold), locks(cluster, "kazoo", n=n, hold=hold),
                      better="lower", title=f"watch callbacks, {n} contenders")


@claim("kazoo's Lock wakes at most one waiter per release; a lock everyone watches wakes them all")
def recipe_wakes_one_waiter_per_release(comparison: Comparison) -> None:
    """kazoo: at most 1 per release and n-1 in all; naive: at least a quarter of its n(n-1)/2 more in all."""
    n = comparison.after.meta["n"]
    recipe = comparison.after
    verify(f"kazoo's Lock woke at most one waiter per release ({n} contenders)",
           max(recipe.values) <= 1 and recipe.value <= n - 1, per_release=recipe.values)
    comparison.check(factor=max(1.0, n / 4))  # theory: n(n-1)/2 over n-1 = n/2


def plot_wakeups(comparison: Comparison):
    """Wake-ups caused by each release, and the totals."""
    from labkit.plots import bars, panels, timelines  # noqa: PLC0415
    from labkit.table import fmt  # noqa: PLC0415

    fig, (ax1, ax2) = panels(2, width=5.5)
    timelines([comparison.before, comparison.after], ax=ax1, step=False,
              title="waiters woken by each release",
              xlabel="release k (n - k contenders still waiting)")
    for line in ax1.get_lines():
        line.set_marker("o")
    ax1.set_ylabel("watch callbacks")
    bars([comparison.before, comparison.after], ax2, show_points=False,
         title=f"total: {fmt(comparison.factor)}x fewer with the recipe")
    ax2.set_ylabel("watch callbacks")
    return fig
