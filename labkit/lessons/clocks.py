"""Lesson 11: clock skew — every machine has its own "now".

The workers in this lesson run with really skewed wall clocks
(``WorkerSpec(clock_offset=...)``, libfaketime: see :mod:`labkit.faketime`),
while Redis and the notebook kernel keep the true clock. Four things go wrong:

* **Decisions made from the worker's clock.** The talk's ``find_reports``
  picks "this hour's" reports with ``datetime.now()`` on whichever worker runs
  it. A worker on the far side of an hour boundary picks the wrong hour.
  Fix: the scheduler puts the time in the message (one time authority), or
  the task asks one shared clock (Redis ``TIME``).
* **countdown / eta.** The producer turns ``countdown=10`` into an absolute
  ETA on *its* clock; the worker compares that ETA with *its* clock. A worker
  30 s ahead runs the task at once; one 30 s behind waits 40 s.
* **expires.** The same conversion: a fast worker discards tasks that have
  not expired yet. Fix: check the deadline against the time authority.
* **beat.** A ``crontab`` is evaluated on beat's clock: a fast beat fires
  early, a slow one late. Nothing in Celery corrects it; only synced clocks do.

Celery notices skew in one place only: :mod:`celery.events.state` warns about
"Substantial drift" when an event's timestamp is more than 16 s away from
the receiver's clock — so 10 s of skew passes silently.

Every time measurement here is taken on the true clock: Redis ``TIME``,
read inside the task.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import shared_task
from celery.beat import Scheduler
from celery.schedules import crontab

from labkit.app import redis_client, worker_name
from labkit.faketime import clock_offset, skew_environment
from labkit.measure import Measurement

if TYPE_CHECKING:  # pragma: no cover
    from labkit.cluster import LocalCluster

log = logging.getLogger(__name__)

#: The skews (seconds) of the countdown workers; one worker per skew, queue = worker name.
SKEWS = (-30, -10, 0, 10, 30)
#: Celery's threshold (celery.events.state.HEARTBEAT_DRIFT_MAX): drift above it is warned about.
DRIFT_MAX = 16


def worker_for(skew: float) -> str:
    """The lesson's name for the worker with this clock skew: ``true``, ``fast30``, ``slow10`` ..."""
    if skew == 0:
        return "true"
    return f"{'fast' if skew > 0 else 'slow'}{abs(skew):g}".replace(".", "_")


def lesson_workers(skews: Sequence[float] = SKEWS) -> list[dict]:
    """One single-process worker per skew, each on its own queue; events on for the drift demo."""
    return [
        {"name": worker_for(s), "queues": [worker_for(s)], "concurrency": 1, "clock_offset": s, "events": s != 0}
        for s in skews
    ]


def next_hour_offset(now: float | None = None, past: float = 30.0, margin: float = 600.0) -> float:
    """A skew that puts a clock ``past`` seconds after the next top of the hour.

    If the true clock itself reaches that hour within ``margin`` seconds, aim
    for the hour after, so the skewed clock and the true clock stay in
    different hours for at least ``margin`` seconds.
    """
    now = time.time() if now is None else now
    to_next = 3600 - (now % 3600)
    offset = to_next + past
    if to_next < margin:
        offset += 3600
    return round(offset, 3)


def start_cluster(skews: Sequence[float] = SKEWS, **kwargs: Any) -> LocalCluster:
    """The lesson's cluster: Redis, one worker per skew and a ``nexthour`` worker; no ZooKeeper.

    The ``nexthour`` worker's skew depends on the time of day, so it is added
    before the (parallel) start rather than passed in ``workers=``: re-running
    this returns the cluster already running.
    """
    from labkit.cluster import LocalCluster  # noqa: PLC0415

    cluster = LocalCluster(workers=lesson_workers(skews), zookeeper=0, start=False, **kwargs)
    if "nexthour" not in cluster.workers:
        cluster.add_worker("nexthour", queues=["nexthour"], concurrency=1, clock_offset=next_hour_offset())
    return cluster.start()


def redis_now(client=None) -> float:
    """The true time: Redis ``TIME`` (seconds since the epoch, microsecond resolution)."""
    sec, usec = (client or redis_client()).time()
    return sec + usec / 1e6


def _key(run: str, *parts: str) -> str:
    return ":".join(("clocks", run, *parts))


# --------------------------------------------------------------------------- tasks


@shared_task(name="clocks.clock_probe")
def clock_probe(wait: float = 0.3) -> dict:
    """Read this worker's clocks and time its sleeps and timed waits on the monotonic clock."""
    true = redis_now()
    wall = time.time()
    now = datetime.datetime.now()
    log.info("clock probe: this line's timestamp comes from the worker's clock")
    waits = {}
    t = time.monotonic()
    time.sleep(wait)
    waits["time.sleep"] = time.monotonic() - t
    t = time.monotonic()
    threading.Event().wait(wait)
    waits["Event.wait"] = time.monotonic() - t
    lock = threading.Lock()
    lock.acquire()
    t = time.monotonic()
    lock.acquire(timeout=wait)
    waits["Lock.acquire"] = time.monotonic() - t
    t = time.monotonic()
    with contextlib.suppress(queue.Empty):
        queue.Queue().get(timeout=wait)
    waits["Queue.get"] = time.monotonic() - t
    return {
        "worker": worker_name(), "offset": clock_offset(), "wall": wall, "true": true,
        "skew": wall - true, "now": now.isoformat(timespec="seconds"), "waits": waits, "wait": wait,
    }


@shared_task(name="clocks.find_reports")
def find_reports(run: str, time: str | None = None) -> list[str]:  # noqa: A002 - the talk's signature
    """The talk's task: pick this hour's reports, "this hour" read from the worker's clock.

    ``time`` is the hour key (``"140000"``); when the caller leaves it out the
    worker decides, with ``datetime.now()``.
    """
    if not time:
        time = "{:%H}0000".format(datetime.datetime.now())  # noqa: UP032 - the talk's line
    return _pick_reports(run, time)


@shared_task(name="clocks.find_reports_redis_time")
def find_reports_redis_time(run: str) -> list[str]:
    """Variant fix: "this hour" read from the one shared clock, Redis ``TIME``."""
    return _pick_reports(run, hour_key(redis_now()))


def _pick_reports(run: str, hour: str) -> list[str]:
    r = redis_client()
    reports = sorted(m.decode() for m in r.smembers(_key(run, "reports", hour)))
    r.rpush(_key(run, "picked"), json.dumps({"worker": worker_name(), "hour": hour, "reports": reports}))
    return reports


def hour_key(ts: float) -> str:
    """The talk's hour key (``"HH0000"``) of a Unix timestamp, in local time."""
    return f"{datetime.datetime.fromtimestamp(ts):%H}0000"


@shared_task(name="clocks.stamp")
def stamp(run: str, key: str) -> float:
    """Record the true time (Redis TIME) at which this task ran, under ``key``."""
    r = redis_client()
    t = redis_now(r)
    r.hset(_key(run, "ran"), key, repr(t))
    return t


@shared_task(name="clocks.stamp_before")
def stamp_before(run: str, key: str, deadline: float) -> str:
    """The expires fix: run unless the *true* time (Redis TIME) is past ``deadline``."""
    r = redis_client()
    t = redis_now(r)
    if t > deadline:
        r.hset(_key(run, "late"), key, repr(t))
        return "skipped: deadline passed"
    r.hset(_key(run, "ran"), key, repr(t))
    return "ran"


@shared_task(name="clocks.beat_tick")
def beat_tick(run: str = "beat", beat: str = "", beat_clock: float = 0.0, true_clock: float = 0.0) -> None:
    """Sent by a lesson beat every minute; records when beat thought it was, and when it was."""
    redis_client().rpush(_key(run, "ticks"), json.dumps(
        {"beat": beat, "beat_clock": beat_clock, "true_clock": true_clock}))


# --------------------------------------------------------------------------- beat


class StampingScheduler(Scheduler):
    """A beat scheduler that puts the time into every message it sends.

    It runs ``clocks.beat_tick`` on ``crontab(minute="*")`` (every minute on
    the minute — beat's minute). Each message carries beat's own clock and
    the true clock (Redis TIME) at the moment of sending: the first tells us
    which minute boundary beat meant, the second when it actually fired.
    Configured from the environment: ``LABKIT_BEAT_NAME``, ``LABKIT_BEAT_RUN``,
    ``LABKIT_BEAT_QUEUE``.
    """

    def setup_schedule(self) -> None:
        super().setup_schedule()
        name = os.environ.get("LABKIT_BEAT_NAME", "beat")
        self.merge_inplace({
            "minute-tick": {
                "task": "clocks.beat_tick",
                "schedule": crontab(minute="*"),
                "kwargs": {"beat": name, "run": os.environ.get("LABKIT_BEAT_RUN", "beat")},
                "options": {"queue": os.environ.get("LABKIT_BEAT_QUEUE", "celery"), "expires": 120},
            }
        })

    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        entry.kwargs = {**entry.kwargs, "beat_clock": time.time(), "true_clock": redis_now()}
        return super().apply_async(entry, producer, advance, **kwargs)


def beat_skew(start: float, direction: int, *, want: float = 30.0, least: float = 12.0,
              leads: tuple[float, float] = (8.0, 18.0)) -> tuple[float, float]:
    """A skew, and a lead, that make a beat started at ``start`` meet a minute boundary soon.

    Returns ``(skew, lead)``: a beat whose clock is ``skew`` seconds off
    reads hh:mm:00 ``lead`` seconds after ``start``, with ``lead`` within
    ``leads`` (so the beat has time to start, and we do not wait long).
    ``direction`` +1 asks for a fast beat (it fires early), -1 for a slow one
    (late); among the possible skews (at least ``least`` s) the one nearest
    ``want`` s is chosen.
    """
    best: tuple[float, float] | None = None
    steps = 32
    for i in range(steps + 1):
        lead = leads[0] + (leads[1] - leads[0]) * i / steps
        target = start + lead  # true time at which beat's clock should read hh:mm:00
        for k in range(-3, 4):
            boundary = (math.floor((target + direction * want) / 60) + k) * 60
            skew = boundary - target
            if direction * skew < least:
                continue
            if best is None or abs(abs(skew) - want) < abs(abs(best[0]) - want):
                best = (skew, lead)
    assert best is not None
    return round(best[0], 3), round(best[1], 3)


@dataclass
class BeatRun:
    """Two real ``celery beat`` processes, one fast and one slow, and the ticks they sent."""

    cluster: Any
    run: str
    skews: dict[str, float]
    started: float
    leads: dict[str, float]
    procs: dict[str, Any] = field(default_factory=dict)
    ticks: list[dict] = field(default_factory=list)
    stopped: bool = False

    def collect(self, timeout: float | None = None) -> list[dict]:
        """Wait until every beat sent its first tick (or the deadline), then stop the beats.

        Each tick: ``beat``, ``skew``, the minute ``boundary`` beat meant, and
        ``error`` = true send time − that boundary (negative: early).
        """
        timeout = max(self.leads.values()) + 10 if timeout is None else timeout
        r = self.cluster.redis_client()
        try:
            deadline = time.monotonic() + max(0.0, timeout - (time.time() - self.started))
            while time.monotonic() < deadline:
                seen = {json.loads(x)["beat"] for x in r.lrange(_key(self.run, "ticks"), 0, -1)}
                if seen >= set(self.skews):
                    break
                time.sleep(0.1)
        finally:
            self.stop()
        ticks = []
        for raw in r.lrange(_key(self.run, "ticks"), 0, -1):
            t = json.loads(raw)
            boundary = math.floor(t["beat_clock"] / 60 + 1e-6) * 60
            ticks.append({**t, "skew": self.skews[t["beat"]], "boundary": boundary,
                          "error": t["true_clock"] - boundary})
        self.ticks = ticks
        return ticks

    def errors(self) -> dict[str, float]:
        """First tick's error (s) per beat; NaN if it did not fire in the window."""
        first: dict[str, float] = {}
        for t in self.ticks:
            first.setdefault(t["beat"], t["error"])
        return {b: first.get(b, math.nan) for b in self.skews}

    def sent_lines(self) -> dict[str, str]:
        """Each beat's last "Sending due task" log line: its timestamp is beat's own clock."""
        out = {}
        for name in self.skews:
            path = self.cluster.run_dir / "logs" / f"beat-{name.replace(' ', '-')}.log"
            with contextlib.suppress(OSError):
                lines = [x for x in path.read_text().splitlines() if "Sending due task" in x]
                if lines:
                    out[name] = lines[-1]
        return out

    def stop(self) -> None:
        """SIGKILL each beat's process group and reap it (idempotent)."""
        from labkit.services.base import kill_group  # noqa: PLC0415

        for proc in self.procs.values():
            kill_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(5)
        self.stopped = True

    def __enter__(self) -> BeatRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_beats(cluster: LocalCluster, *, want: float = 30.0, leads: tuple[float, float] = (8.0, 18.0),
                queue_name: str = "true") -> BeatRun:
    """Start a fast and a slow ``celery beat`` whose clocks reach a minute boundary 8-18 s from now.

    The skews are as near ``want`` s as that allows (see :func:`beat_skew`).

    Each beat runs in its own process group (``labkit.services.base.spawn``:
    parent-death signal, log file ``logs/beat-<name>.log``), carries the
    cluster's mark (so ``cluster.close()`` sweeps it too) and is killed by
    :meth:`BeatRun.collect` / :meth:`BeatRun.stop`.
    """
    from labkit.services.base import ENV_MARK, spawn  # noqa: PLC0415

    run = uuid.uuid4().hex[:8]
    started = redis_now(cluster.redis_client())
    plan = {"fast beat": beat_skew(started, +1, want=want, leads=leads),
            "slow beat": beat_skew(started, -1, want=want, leads=leads)}
    skews = {name: skew for name, (skew, _) in plan.items()}
    beats = BeatRun(cluster=cluster, run=run, skews=skews, started=started,
                    leads={name: lead for name, (_, lead) in plan.items()})
    try:
        for name, skew in skews.items():
            slug = name.replace(" ", "-")
            env = dict(os.environ)
            env.update({
                "LABKIT_REDIS_URL": cluster.redis_url,
                "LABKIT_SETTINGS": json.dumps(cluster.settings),
                "LABKIT_INCLUDE": "labkit.lessons.clocks",
                "LABKIT_BEAT_NAME": name, "LABKIT_BEAT_RUN": run, "LABKIT_BEAT_QUEUE": queue_name,
                ENV_MARK: cluster.id, "PYTHONUNBUFFERED": "1",
            })
            env.update(skew_environment(skew, env))
            cmd = [sys.executable, "-m", "celery", "-A", "labkit.worker_app:app", "beat",
                   "--scheduler", "labkit.lessons.clocks:StampingScheduler",
                   "--max-interval", "1", "--loglevel", "INFO",
                   "--schedule", str(cluster.run_dir / f"beat-{slug}-{run}")]
            beats.procs[name] = spawn(cmd, log=cluster.run_dir / "logs" / f"beat-{slug}.log", env=env,
                                      cwd=cluster.run_dir)
    except BaseException:
        beats.stop()
        raise
    return beats


# --------------------------------------------------------------------------- experiments: clocks


def probe_clocks(cluster: LocalCluster, workers: Sequence[str] | None = None, wait: float = 0.3) -> list[dict]:
    """Run :func:`clock_probe` on each worker (in parallel); one dict per worker."""
    workers = list(workers or cluster.workers)
    task = cluster.task(clock_probe)
    results = {w: task.apply_async((wait,), queue=cluster.workers[w].spec.queues[0]) for w in workers}
    return [results[w].get(timeout=30) for w in workers]


# --------------------------------------------------------------------------- experiments: find_reports


def _ensure_nexthour(cluster: LocalCluster) -> str:
    """The ``nexthour`` worker, (re)started if its clock no longer sits in another hour."""
    w = cluster.workers.get("nexthour")
    now = redis_now(cluster.redis_client())
    if w is not None and w.alive() and hour_key(now + w.spec.clock_offset) != hour_key(now) \
            and hour_key(now + 60 + w.spec.clock_offset) != hour_key(now + 60):
        return "nexthour"
    if w is not None:
        cluster.remove_worker("nexthour")
    cluster.add_worker("nexthour", queues=["nexthour"], concurrency=1, clock_offset=next_hour_offset(now))
    return "nexthour"


def _seed_reports(cluster: LocalCluster, run: str) -> None:
    """Two reports for every hour of the day (the talk's reports table)."""
    r = cluster.redis_client()
    with r.pipeline() as p:
        for h in range(24):
            hour = f"{h:02d}0000"
            p.sadd(_key(run, "reports", hour), f"report-{hour}-a", f"report-{hour}-b")
            p.expire(_key(run, "reports", hour), 3600)
        p.execute()


def reports(cluster: LocalCluster, variant: str = "talk", n: int = 10,
            workers: Sequence[str] = ("true", "nexthour")) -> Measurement:
    """Send ``n`` find_reports per worker as a scheduler would, and count wrong picks.

    ``variant``: ``"talk"`` (the worker's ``datetime.now()``), ``"message"``
    (the scheduler puts its hour in the message) or ``"redis"`` (the task
    reads Redis ``TIME``). A pick is wrong when its hour differs from the
    hour on the true clock when the scheduler sent it. Values: wrong picks
    per worker; stat ``sum``.
    """
    if variant not in ("talk", "message", "redis"):
        raise ValueError("variant must be 'talk', 'message' or 'redis'")
    if "nexthour" in workers:
        _ensure_nexthour(cluster)
    run = uuid.uuid4().hex[:8]
    r = cluster.redis_client()
    _seed_reports(cluster, run)
    sent: list[tuple[str, str, Any]] = []
    for w in workers:
        q = cluster.workers[w].spec.queues[0]
        for _ in range(n):
            intended = hour_key(redis_now(r))  # the scheduler's hour, on the true clock
            if variant == "talk":
                res = cluster.task(find_reports).apply_async((run,), queue=q)
            elif variant == "message":
                res = cluster.task(find_reports).apply_async((run,), {"time": intended}, queue=q)
            else:
                res = cluster.task(find_reports_redis_time).apply_async((run,), queue=q)
            sent.append((w, intended, res))
    wrong = {w: 0 for w in workers}
    picked_hours: dict[str, set] = {w: set() for w in workers}
    for w, intended, res in sent:
        picked = res.get(timeout=30)
        hour = picked[0].split("-")[1] if picked else "none"
        picked_hours[w].add(hour)
        wrong[w] += hour != intended
    labels = {"talk": "talk: worker's datetime.now()", "message": "fix: time in the message",
              "redis": "fix: Redis TIME"}
    return Measurement(
        labels[variant], "wrong picks", "picks", [wrong[w] for w in workers], stat="sum",
        meta={"n": n, "workers": list(workers), "wrong": wrong, "picked_hours": {w: sorted(h) for w, h in picked_hours.items()},
              "offsets": {w: cluster.workers[w].spec.clock_offset for w in workers}, "sent": n * len(workers)},
    )


# --------------------------------------------------------------------------- experiments: countdown


@dataclass
class CountdownRun:
    """Tasks sent with ``countdown`` to one worker per skew; collect their delays later."""

    cluster: Any
    run: str
    countdown: float
    skews: list[float]
    sent: dict[str, tuple[float, float]]  # key -> (skew, true send time)
    started: float

    def collect(self, window: float = 15.0) -> dict[float, list[float]]:
        """Wait until every task ran or ``window`` s after sending passed; delays per skew.

        A delay is the true run time minus the true send time; a task that did
        not run inside the window counts as ``inf``.
        """
        r = self.cluster.redis_client()
        deadline = self.started + window
        while True:
            ran = r.hgetall(_key(self.run, "ran"))
            now = redis_now(r)
            if len(ran) >= len(self.sent) or now >= deadline:
                break
            time.sleep(min(0.1, max(0.0, deadline - now)))
        delays: dict[float, list[float]] = {s: [] for s in self.skews}
        for key, (skew, t_sent) in self.sent.items():
            t_ran = ran.get(key.encode())
            delay = float(t_ran) - t_sent if t_ran is not None else math.inf
            delays[skew].append(delay if delay <= window else math.inf)
        return delays


def start_countdown(cluster: LocalCluster, *, countdown: float = 10.0, per_worker: int = 2,
                    skews: Sequence[float] = SKEWS) -> CountdownRun:
    """Send ``per_worker`` ``stamp`` tasks with ``countdown`` to each skewed worker; returns at once."""
    run = uuid.uuid4().hex[:8]
    r = cluster.redis_client()
    task = cluster.task(stamp)
    sent = {}
    started = redis_now(r)
    for skew in skews:
        q = worker_for(skew)
        for i in range(per_worker):
            key = f"{q}-{i}"
            sent[key] = (skew, redis_now(r))
            task.apply_async((run, key), countdown=countdown, queue=q)
    return CountdownRun(cluster, run, countdown, list(skews), sent, started)


def plot_countdown(delays: dict[float, list[float]], countdown: float, window: float, ax=None):
    """Actual delay against the worker's skew; tasks that did not run in the window sit on the window line."""
    from labkit import plots  # noqa: PLC0415

    ax = plots.axis(ax)
    skews = sorted(delays)
    lo, hi = min(skews) - 5, max(skews) + 5
    model_x = [lo + (hi - lo) * i / 200 for i in range(201)]
    ax.plot(model_x, [max(0.0, countdown - x) for x in model_x], ls="--", color="grey",
            lw=1, label="countdown − skew (model)")
    ax.set_ylim(-1, window * 1.25)
    ax.axhline(countdown, color=plots.AFTER, lw=1, alpha=0.6, label=f"requested {countdown:g} s")
    ax.axhline(window, color="black", lw=0.8, ls=":", label=f"window {window:g} s")
    ran = [(s, d) for s in skews for d in delays[s] if math.isfinite(d)]
    missed = [s for s in skews for d in delays[s] if not math.isfinite(d)]
    if ran:
        ax.plot(*zip(*ran, strict=True), "o", color=plots.BEFORE, ms=7, label="measured delay")
    if missed:
        ax.plot(missed, [window] * len(missed), "^", color=plots.BEFORE, mfc="white", ms=9,
                label=f"did not run within {window:g} s")
    ax.legend(frameon=False, fontsize=8, loc="upper right")
    ax.set_xticks(skews)
    return plots.style(ax, f"countdown={countdown:g}: actual delay vs worker clock skew",
                        "actual delay [s]", "worker clock skew [s] (+ = ahead)")


def beat_measurements(beats: BeatRun) -> list[Measurement]:
    """Each beat's first tick: seconds between the true minute boundary and the moment it fired."""
    return [
        Measurement(f"{name} ({skew:+.0f} s)", "fired after the minute", "s", [err], meta={"skew": skew})
        for (name, err), skew in zip(beats.errors().items(), beats.skews.values(), strict=True)
    ]


def summary_figure(reports_ms: Sequence[Measurement], delays: dict[float, list[float]], countdown: float,
                   window: float, expires_ms: Sequence[Measurement], beat_ms: Sequence[Measurement]):
    """The lesson in four panels: wrong picks, countdown delay vs skew, discarded tasks, beat timing."""
    import textwrap  # noqa: PLC0415

    import matplotlib.pyplot as plt  # noqa: PLC0415

    from labkit import plots  # noqa: PLC0415

    fig, grid = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    axes = list(grid.flat)
    plots.bars(list(reports_ms), axes[0], title="find_reports: wrong hour picked")
    plot_countdown(delays, countdown, window, axes[1])
    axes[1].set_title(f"countdown={countdown:g}: actual delay vs skew", fontsize=11, loc="left")
    plots.bars(list(expires_ms), axes[2], title="expires: tasks discarded")
    plots.bars(list(beat_ms), axes[3], title="celery beat: fired after the minute (− = early)", show_points=False)
    axes[3].axhline(0, color="black", lw=0.8)
    for ax in (axes[0], axes[2], axes[3]):
        labels = [textwrap.fill(t.get_text(), 22) for t in ax.get_xticklabels()]
        ax.set_xticks(ax.get_xticks(), labels, rotation=0, ha="center", fontsize=8)
    return fig


# --------------------------------------------------------------------------- experiments: expires


def expires(cluster: LocalCluster, variant: str = "celery", worker: str = "fast30", n: int = 6,
            seconds: float = 10.0, timeout: float = 20.0) -> Measurement:
    """Send ``n`` tasks that may run for ``seconds`` from now; count those discarded.

    ``variant``: ``"celery"`` uses ``expires=seconds`` (an absolute time on the
    producer's clock, compared with the worker's); ``"deadline"`` puts the
    deadline in the message and the task checks it against Redis TIME.
    Discarded counts come from the result backend (state ``REVOKED``) or, for
    the fix, from the task's own "skipped" records. Values: 1 per discarded task.
    """
    if variant not in ("celery", "deadline"):
        raise ValueError("variant must be 'celery' or 'deadline'")
    run = uuid.uuid4().hex[:8]
    r = cluster.redis_client()
    q = cluster.workers[worker].spec.queues[0]
    results = []
    for i in range(n):
        if variant == "celery":
            results.append(cluster.task(stamp).apply_async((run, f"t{i}"), expires=seconds, queue=q))
        else:
            deadline = redis_now(r) + seconds
            results.append(cluster.task(stamp_before).apply_async((run, f"t{i}", deadline), queue=q))
    states = []
    for res in results:
        with contextlib.suppress(Exception):
            res.get(timeout=timeout, propagate=False)
        states.append(res.state)
    discarded = [1.0 if s == "REVOKED" else 0.0 for s in states]
    ran = r.hlen(_key(run, "ran"))
    skipped = r.hlen(_key(run, "late"))
    if variant == "deadline":
        discarded = [1.0] * skipped + [0.0] * (n - skipped)
    offset = cluster.workers[worker].spec.clock_offset
    if variant == "deadline":
        label = f"fix: deadline vs Redis TIME on {worker}"
    else:
        label = f"{'before' if offset else 'true clock'}: expires={seconds:g} on {worker}"
    return Measurement(label, "discarded", "tasks", discarded, stat="sum",
                       meta={"n": n, "ran": ran, "states": states, "worker": worker, "offset": offset})


# --------------------------------------------------------------------------- experiments: drift warning


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def drift_warnings(cluster: LocalCluster, workers: Sequence[str] = ("fast30", "fast10", "slow30"),
                   timeout: float = 10.0) -> dict[str, Any]:
    """Listen to the workers' task events with Celery's own ``events.State``; collect its drift warnings.

    The kernel plays the monitor (what Flower, ``celery events`` or a peer
    worker with gossip does): it receives each worker's ``task-*`` events,
    whose ``timestamp`` comes from the worker's clock, and ``State`` compares
    it with the time of arrival. Returns ``{"drift": {worker: seconds},
    "warnings": [text, ...]}``.
    """
    from celery.events import state as events_state  # noqa: PLC0415

    app = cluster.app
    hostnames = {cluster.workers[w].hostname: w for w in workers}
    st = app.events.State()
    drift: dict[str, float] = {}
    done: set[str] = set()

    def on_event(event: dict) -> None:
        st.event(event)
        w = hostnames.get(event.get("hostname", ""))
        if w and event.get("local_received") and event.get("timestamp"):
            drift[w] = event["timestamp"] - event["local_received"]
            if event["type"] == "task-succeeded":
                done.add(w)

    capture = _Capture()
    state_log = logging.getLogger(events_state.__name__)
    state_log.addHandler(capture)
    events_state._warn_drift.clear()  # Celery warns once per hostname per process; re-runs warn again
    r = cluster.redis_client()
    subscribed_before = _subscriptions(r)
    box: dict[str, Any] = {}

    def listen() -> None:
        with app.connection_for_read() as conn:
            box["recv"] = recv = app.events.Receiver(conn, handlers={"*": on_event})
            for _ in recv.itercapture(limit=None, timeout=None, wakeup=False):
                if done >= set(workers):
                    break

    thread = threading.Thread(target=_quiet(listen), name="labkit-drift-receiver", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while _subscriptions(r) <= subscribed_before and time.monotonic() < deadline:
            time.sleep(0.02)  # the receiver must be subscribed before the events are published
        for w in workers:
            cluster.task(stamp).apply_async(("drift", w), queue=cluster.workers[w].spec.queues[0])
        while time.monotonic() < deadline and not done >= set(workers):
            time.sleep(0.05)
    finally:
        if "recv" in box:
            box["recv"].should_stop = True
        thread.join(3)
        state_log.removeHandler(capture)
    return {"drift": drift, "warnings": [m for m in capture.messages if "drift" in m.lower()],
            "offsets": {w: cluster.workers[w].spec.clock_offset for w in workers}}


def _subscriptions(r) -> int:
    """Pub/sub channels and patterns with a subscriber on this Redis (event receivers subscribe)."""
    return int(r.pubsub_numpat()) + len(r.pubsub_channels())


def _quiet(fn):
    def run() -> None:
        try:
            fn()
        except Exception as exc:  # a socket timeout at the end of the window is not an error here
            log.debug("drift receiver stopped: %r", exc)
    return run


# --------------------------------------------------------------------------- one skew, every symptom


def try_skew(cluster: LocalCluster, skew: float = 10.0, countdown: float = 12.0, expires_s: float = 8.0,
             max_wait: float = 30.0) -> dict[str, Any]:
    """Every symptom of one clock skew, measured on a worker with that skew.

    Uses the lesson worker with exactly this skew if there is one, otherwise
    (re)starts a worker ``custom`` with it. Returns the measured skew, the
    actual delay of one ``countdown`` task (``inf`` if it did not run within
    ``max_wait`` s), whether an ``expires=expires_s`` task was discarded, and
    the hour ``find_reports`` picked versus the true hour.
    """
    name = next((n for n, w in cluster.workers.items() if w.spec.clock_offset == float(skew) and n != "nexthour"),
                None)
    if name is None:
        name = "custom"
        if name in cluster.workers:
            cluster.remove_worker(name)
        cluster.add_worker(name, queues=[name], concurrency=1, clock_offset=skew)
    q = cluster.workers[name].spec.queues[0]
    run = uuid.uuid4().hex[:8]
    r = cluster.redis_client()
    _seed_reports(cluster, run)
    sent = redis_now(r)
    cd = cluster.task(stamp).apply_async((run, "countdown"), countdown=countdown, queue=q)
    ex = cluster.task(stamp).apply_async((run, "expires"), expires=expires_s, queue=q)
    intended = hour_key(redis_now(r))
    picked = cluster.task(find_reports).apply_async((run,), queue=q).get(timeout=30)
    probe = cluster.task(clock_probe).apply_async((0.1,), queue=q).get(timeout=30)
    with contextlib.suppress(Exception):
        ex.get(timeout=30, propagate=False)
    with contextlib.suppress(Exception):
        cd.get(timeout=max_wait, propagate=False)
    t_ran = r.hget(_key(run, "ran"), "countdown")
    return {
        "worker": name, "skew set": float(skew), "skew measured": round(probe["skew"], 3),
        "countdown": countdown,
        "actual delay": round(float(t_ran) - sent, 2) if t_ran is not None else math.inf,
        "expires": expires_s, "discarded": ex.state == "REVOKED",
        "find_reports hour": picked[0].split("-")[1] if picked else None, "true hour": intended,
    }
