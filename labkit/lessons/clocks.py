"""Lesson 11: clock skew — every machine has its own "now".

The workers in this lesson run with really skewed wall clocks (tens of
seconds, ``clock_offset=...``: libfaketime, see :mod:`labkit.faketime`),
while Redis and the notebook kernel keep the true clock. What goes wrong:

* **Decisions made from the worker's clock.** The talk's ``find_reports``
  picks "this period's" reports with ``datetime.now()`` on whichever worker
  runs it. ``celery beat`` sends it at the top of the period *on beat's
  clock*; a worker whose clock is behind beat's reads a time before that
  boundary and picks the previous period. (The talk's period is an hour; here
  it is a minute, so a boundary comes within a minute: see :func:`period_key`.)
  Fix: the scheduler puts the period in the message (one decision, made
  once); asking one shared clock (Redis ``TIME``) makes the workers agree
  with each other, but not with a beat whose clock is off.
* **countdown / eta.** The producer turns ``countdown=10`` into an absolute
  ETA on *its* clock; the worker compares that ETA with *its* clock:
  expected delay ``max(0, countdown − skew)``. Fix: keep the delay on one
  clock (here the producer holds the task and sends it when due).
* **expires.** The same conversion: a worker ahead by more than ``expires``
  discards tasks that have not expired. Fix: carry the deadline and check it
  against the time authority (Redis ``TIME``).
* **beat.** A ``crontab`` is evaluated on beat's clock: a fast beat fires
  early, a slow one late, by its skew. Nothing in Celery corrects it.

Celery notices skew in one place only: :mod:`celery.events.state` warns about
"Substantial drift" when an event's timestamp is more than 16 s from the
receiver's clock — so 10 s of skew passes silently.

Two experiments need real seconds to pass, so they are objects that start
in the background and are collected later: :class:`BeatRun` (two real
``celery beat`` services of the cluster, ``cluster.add_beat``) and
:class:`CountdownRun`. Their ``collect()`` returns Measurements. Every time
measurement is taken on the true clock: Redis ``TIME``, read inside the task.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import shared_task
from celery.beat import Scheduler
from celery.schedules import crontab

from labkit.app import redis_client, worker_name
from labkit.client import ClusterLike
from labkit.faketime import clock_offset
from labkit.measure import Measurement, claim, verify
from labkit.poll import poll_until
from labkit.table import Table

if TYPE_CHECKING:  # pragma: no cover
    from labkit.cluster import LocalCluster

log = logging.getLogger(__name__)

#: The workers' skews (seconds, + = ahead): one single-process worker per skew, queue = worker name.
#: They span a full period (60 s), so at any boundary some worker reads either side of it.
SKEWS = (-30, -10, 0, 10, 30)
#: Celery's threshold (celery.events.state.HEARTBEAT_DRIFT_MAX): drift above it is warned about.
DRIFT_MAX = 16
#: The period of the lesson's find_reports: one minute (the talk's is one hour).
PERIOD = 60


def worker_for(skew: float) -> str:
    """The lesson's name for the worker with this clock skew: ``true``, ``fast30``, ``slow10`` ..."""
    if skew == 0:
        return "true"
    return f"{'fast' if skew > 0 else 'slow'}{abs(skew):g}".replace(".", "_")


def lesson_workers(skews: Sequence[float] = SKEWS) -> list[dict[str, Any]]:
    """One single-process worker per skew, each on its own queue; events on for the drift demo."""
    return [{"name": worker_for(s), "queues": [worker_for(s)], "concurrency": 1, "clock_offset": s,
             "events": s != 0} for s in skews]


NOTEBOOK = "11_clock_skew.ipynb"
CLUSTER: dict[str, Any] = {"workers": lesson_workers(), "zookeeper": 0}
WORKSHOP = {"COUNTDOWN": 20, "WINDOW": 30, "PER_WORKER": 3, "N_EXPIRES": 12, "EXPIRES": 20}


# --------------------------------------------------------------------------- time, pure


def redis_now(client: Any = None) -> float:
    """The true time: Redis ``TIME`` (seconds since the epoch, microsecond resolution)."""
    sec, usec = (client or redis_client()).time()
    return sec + usec / 1e6


def period_key(ts: float) -> str:
    """The lesson's period key of a Unix timestamp, in local time: ``"HHMM00"``.

    The talk's key is ``'{:%H}0000'`` (the hour); this is the same format one
    field further (the minute), so that a boundary comes within a minute.
    """
    return f"{datetime.datetime.fromtimestamp(ts):%H%M}00"


def period_offset(picked: str, intended: str) -> int:
    """How many periods ``picked`` lies after ``intended`` (``-1``: the previous minute); wraps at midnight."""
    def minutes(key: str) -> int:
        return int(key[:2]) * 60 + int(key[2:4])

    return (minutes(picked) - minutes(intended) + 720) % 1440 - 720


def expected_delay(countdown: float, skew: float) -> float:
    """When a task sent with ``countdown`` runs on a worker ``skew`` s ahead: ``max(0, countdown − skew)``."""
    return max(0.0, countdown - skew)


def beat_skew(start: float, direction: int, *, want: float = 25.0, least: float = 12.0, most: float = 115.0,
              avoid: Sequence[float] = SKEWS, clearance: float = 3.0, guard: float = 5.0,
              leads: tuple[float, float] = (6.0, 17.0), steps: int = 44) -> tuple[float, float]:
    """A skew and a lead that make a beat started at true time ``start`` reach a minute boundary soon.

    Returns ``(skew, lead)``: a beat whose clock is ``skew`` s off reads
    ``hh:mm:00`` ``lead`` s after ``start``, ``lead`` within ``leads`` (the
    beat has time to start; we do not wait long). ``direction`` +1 asks for a
    fast beat (it fires early), -1 for a slow one (late). The skew is
    realistic — ``least <= |skew| <= most``, under two minutes — and chosen so
    that every outcome is clear-cut: at least ``guard`` s from a whole number
    of minutes (the beat never fires within ``guard`` s of a *true* minute
    boundary), and at least ``clearance`` s, modulo a minute, from each worker
    skew in ``avoid`` (no worker's clock reads within ``clearance`` s of
    beat's boundary when the beat fires). Among the candidates, the one
    nearest ``want`` s wins.
    """
    if direction not in (1, -1):
        raise ValueError("direction must be +1 (fast) or -1 (slow)")

    def apart(a: float, b: float) -> float:  # distance between two times of the minute
        d = (a - b) % PERIOD
        return min(d, PERIOD - d)

    best: tuple[float, float] | None = None
    for i in range(steps + 1):
        lead = leads[0] + (leads[1] - leads[0]) * i / steps
        target = start + lead  # true time at which beat's clock should read hh:mm:00
        first = math.floor((target + direction * least) / PERIOD) - 3
        for k in range(first, first + 8):
            skew = k * PERIOD - target
            size = direction * skew
            if not least <= size <= most or apart(skew, 0) < guard:
                continue
            if any(apart(skew, s) < clearance for s in avoid):
                continue
            if best is None or abs(size - want) < abs(abs(best[0]) - want):
                best = (skew, lead)
    if best is None:
        raise ValueError(f"no skew in [{least}, {most}] s reaches a minute boundary within {leads} s")
    return round(best[0], 3), round(best[1], 3)


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
    """The talk's task: pick this period's reports, "this period" read from the worker's clock.

    ``time`` is the period key (``"140500"``); when the caller leaves it out
    the worker decides, with ``datetime.now()``. (The talk: ``'{:%H}0000'``.)
    """
    if not time:
        time = "{:%H%M}00".format(datetime.datetime.now())  # noqa: UP032 - the talk's line, one field finer
    return _pick_reports(run, time)


@shared_task(name="clocks.find_reports_redis_time")
def find_reports_redis_time(run: str) -> list[str]:
    """Variant: "this period" read from the one shared clock, Redis ``TIME``."""
    return _pick_reports(run, period_key(redis_now()))


def _pick_reports(run: str, period: str) -> list[str]:
    r = redis_client()
    reports = sorted(m.decode() for m in r.smembers(_key("reports", period)))
    r.rpush(_key(run, "picked"), json.dumps({"worker": worker_name(), "period": period, "true": redis_now(r)}))
    return reports


def _key(*parts: str) -> str:
    return ":".join(("clocks", *parts))


def _seed_reports(r: Any, around: float, minutes: int = 10) -> None:
    """The talk's reports table: two reports for every minute within ``minutes`` of ``around``."""
    with r.pipeline() as p:
        for k in range(-minutes, minutes + 1):
            period = period_key(around + k * PERIOD)
            p.sadd(_key("reports", period), f"report-{period}-a", f"report-{period}-b")
            p.expire(_key("reports", period), 3600)
        p.execute()


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
    redis_client().rpush(_key(run, "ticks"), json.dumps({"beat": beat, "beat_clock": beat_clock,
                                                         "true_clock": true_clock}))


# --------------------------------------------------------------------------- the calls under test


def send_with_countdown(task: Any, args: tuple, countdown: float, queue: str) -> Any:
    """The pitfall: Celery turns ``countdown`` into an absolute ETA on *this* (the producer's) clock."""
    return task.apply_async(args, countdown=countdown, queue=queue)


def send_when_due(task: Any, args: tuple, countdown: float, queue: str) -> threading.Timer:
    """A fix: keep the delay on one clock — the producer waits, then sends the task to run now."""
    timer = threading.Timer(countdown, task.apply_async, (args,), {"queue": queue})
    timer.daemon = True
    timer.start()
    return timer


def send_with_expires(task: Any, args: tuple, seconds: float, queue: str) -> Any:
    """The pitfall: ``expires`` too becomes an absolute time on the producer's clock."""
    return task.apply_async(args, expires=seconds, queue=queue)


def send_with_deadline(task: Any, args: tuple, seconds: float, queue: str, redis: Any) -> Any:
    """The fix: the deadline travels in the message; the task checks it against Redis ``TIME``."""
    deadline = redis_now(redis) + seconds  # the time authority's clock, not this process's
    return task.apply_async((*args, deadline), queue=queue)


# --------------------------------------------------------------------------- beat


class StampingScheduler(Scheduler):
    """A beat scheduler that sends the lesson's tasks every minute, on the minute (beat's minute).

    Schedule (``crontab(minute="*")``): a ``beat_tick`` that records beat's
    clock and the true clock at the moment of sending, and, to each queue in
    ``LABKIT_BEAT_QUEUES``, three ``find_reports``: the talk's (the worker
    decides the period), one with the period *in the message* (beat decides),
    and one that asks Redis ``TIME``. Configured from the environment:
    ``LABKIT_BEAT_NAME``, ``LABKIT_BEAT_RUN``, ``LABKIT_BEAT_QUEUES``.
    """

    def setup_schedule(self) -> None:
        super().setup_schedule()
        name = os.environ.get("LABKIT_BEAT_NAME", "beat")
        run = os.environ.get("LABKIT_BEAT_RUN", "beat")
        queues = [q for q in os.environ.get("LABKIT_BEAT_QUEUES", "celery").split(",") if q]
        every_minute = crontab(minute="*")
        entries: dict[str, dict[str, Any]] = {
            "tick": {"task": "clocks.beat_tick", "schedule": every_minute, "kwargs": {"beat": name, "run": run},
                     "options": {"queue": queues[0], "expires": 120}},
        }
        for q in queues:
            for variant, task in (("talk", "clocks.find_reports"), ("message", "clocks.find_reports"),
                                  ("redis", "clocks.find_reports_redis_time")):
                entries[f"{variant}-{q}"] = {"task": task, "schedule": every_minute,
                                             "kwargs": {"run": f"{run}:{name}:{variant}"},
                                             "options": {"queue": q, "expires": 120}}
        self.merge_inplace(entries)

    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        now = time.time()  # beat's own clock: it decided that the minute has come
        if entry.task == "clocks.beat_tick":
            entry.kwargs = {**entry.kwargs, "beat_clock": now, "true_clock": redis_now()}
        elif entry.name.startswith("message-"):
            entry.kwargs = {**entry.kwargs, "time": period_key(now)}  # one decision, carried to the worker
        self._note_sent(entry.name)
        return super().apply_async(entry, producer, advance, **kwargs)

    def _note_sent(self, name: str) -> None:
        """The true time (Redis TIME) each entry left beat: the start of its delivery delay."""
        run = os.environ.get("LABKIT_BEAT_RUN", "beat")
        r = redis_client()
        r.hset(_key(run, "sent", os.environ.get("LABKIT_BEAT_NAME", "beat")), name, repr(redis_now(r)))


VARIANTS = {"talk": "talk: worker's datetime.now()", "message": "fix: period in the message",
            "redis": "variant: Redis TIME"}


class BeatRun:
    """Two real ``celery beat`` services, one fast and one slow, each about to reach the top of a minute.

    Starting it adds the beats to the cluster (``cluster.add_beat``) with
    skews from :func:`beat_skew`; at the top of its minute each beat sends
    ``find_reports`` three ways to every lesson worker. :meth:`collect` waits
    for the first tick of both, removes the beats and returns Measurements.
    """

    BEATS = {"fast beat": ("fast-beat", +1), "slow beat": ("slow-beat", -1)}

    def __init__(self, cluster: LocalCluster, *, want: float = 25.0, leads: tuple[float, float] = (6.0, 17.0),
                 workers: Sequence[str] | None = None) -> None:
        self.cluster = cluster
        self.run = uuid.uuid4().hex[:8]
        self.workers = list(workers) if workers is not None else [
            worker_for(s) for s in SKEWS if worker_for(s) in cluster.workers]
        self.worker_skews = {w: cluster.workers[w].spec.clock_offset for w in self.workers}
        r = cluster.redis_client()
        self.started = redis_now(r)
        _seed_reports(r, self.started)
        self.skews: dict[str, float] = {}
        self.leads: dict[str, float] = {}  # seconds from the start until the beat reaches its boundary
        self.stop()  # a beat left over from an earlier run of this cell
        try:
            for label, (service, direction) in self.BEATS.items():
                for _attempt in range(3):
                    now = redis_now(r)
                    skew, lead = beat_skew(now, direction, want=want, leads=leads)
                    cluster.add_beat(service, scheduler="labkit.lessons.clocks:StampingScheduler", clock_offset=skew,
                                     env={"LABKIT_BEAT_NAME": label, "LABKIT_BEAT_RUN": self.run,
                                          "LABKIT_BEAT_QUEUES": ",".join(self.workers)})
                    if redis_now(r) < now + lead - 1.0:  # running before its boundary: it will fire there
                        break
                    cluster.remove_beat(service)  # it started too slowly and may miss it: plan again
                else:
                    raise RuntimeError(f"{label}: celery beat took longer than {leads[0]:g} s to start, three "
                                       f"times; the machine is overloaded (see cluster.logs({service!r}))")
                self.skews[label] = skew
                self.leads[label] = round(now + lead - self.started, 3)
        except BaseException:
            self.stop()
            raise

    def _sent(self, r: Any, beat: str) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in r.hgetall(_key(self.run, "sent", beat)).items()}

    def _lists(self, r: Any) -> tuple[list[dict], dict[tuple[str, str], list[dict]]]:
        ticks = [json.loads(x) for x in r.lrange(_key(self.run, "ticks"), 0, -1)]
        picks = {(b, v): [json.loads(x) for x in r.lrange(_key(f"{self.run}:{b}:{v}", "picked"), 0, -1)]
                 for b in self.BEATS for v in VARIANTS}
        return ticks, picks

    def collect(self, timeout: float | None = None) -> dict[str, Measurement]:
        """Wait for both beats' first tick and every pick, stop the beats, return Measurements.

        Keys: ``"talk"``, ``"message"``, ``"redis"`` (wrong picks: 1 per pick
        of a period other than the one beat meant; ``meta["picks"]`` has every
        pick), and each beat's label (seconds between the true minute boundary
        and the moment the beat fired: negative is early).
        """
        r = self.cluster.redis_client()
        timeout = max(self.leads.values()) + 15 if timeout is None else timeout
        remaining = max(1.0, timeout - (redis_now(r) - self.started))

        def complete() -> bool:
            ticks, picks = self._lists(r)
            return {t["beat"] for t in ticks} >= set(self.BEATS) and all(
                len(p) >= len(self.workers) for p in picks.values())

        try:
            poll_until(complete, remaining, 0.1)
        finally:
            self.stop()
        ticks, picks = self._lists(r)
        first: dict[str, dict] = {}
        for t in ticks:
            first.setdefault(t["beat"], t)
        out: dict[str, Measurement] = {}
        for variant, label in VARIANTS.items():
            rows = []
            for beat in self.BEATS:
                tick = first.get(beat)
                if tick is None:
                    continue
                intended = period_key(tick["beat_clock"])
                sent = self._sent(r, beat)
                for p in picks[(beat, variant)][: len(self.workers)]:
                    # delivery delay: from the moment beat sent this entry to the worker's decision (true clock)
                    lag = p["true"] - sent.get(f"{variant}-{p['worker']}", tick["true_clock"])
                    rel = self.worker_skews[p["worker"]] - self.skews[beat]
                    rows.append({"beat": beat, "beat_skew": self.skews[beat], "worker": p["worker"],
                                 "worker_skew": self.worker_skews[p["worker"]], "intended": intended,
                                 "picked": p["period"], "offset": period_offset(p["period"], intended),
                                 "lag": round(lag, 3), "rel": rel, "x": round(rel + lag, 3)})
            rows.sort(key=lambda row: (row["beat"], row["worker_skew"]))
            out[variant] = Measurement(
                label, "wrong picks", "picks", [1.0 if row["offset"] else 0.0 for row in rows], stat="sum",
                meta={"variant": variant, "picks": rows, "beats": dict(self.skews), "workers": list(self.workers),
                      "expected_picks": len(self.BEATS) * len(self.workers)})
        for beat, skew in self.skews.items():
            tick = first.get(beat)
            error = math.nan
            if tick is not None:
                boundary = math.floor(tick["beat_clock"] / PERIOD + 1e-6) * PERIOD
                error = tick["true_clock"] - boundary
            out[beat] = Measurement(f"{beat} ({skew:+.0f} s)", "fired after the minute", "s", [error],
                                    stat="last", meta={"skew": skew})
        return out

    def sent_lines(self) -> dict[str, str]:
        """Each beat's last "Sending due task" log line: its timestamp is beat's own clock."""
        out = {}
        for label, (service, _) in self.BEATS.items():
            path = self.cluster.run_dir / "logs" / f"{service}.log"
            with contextlib.suppress(OSError):
                lines = [x for x in path.read_text().splitlines() if "Sending due task" in x]
                if lines:
                    out[label] = lines[-1]
        return out

    def stop(self) -> None:
        """Remove this run's beats from the cluster (idempotent)."""
        for service, _ in self.BEATS.values():
            if service in self.cluster.beats:
                self.cluster.remove_beat(service)

    def __enter__(self) -> BeatRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def picks_table(m: Measurement) -> Table:
    """Every pick of a find_reports run: which beat, which worker, the skews, the minute meant and picked."""
    return Table(["beat", "beat skew s", "worker", "worker skew s", "worker − beat s", "beat meant", "picked",
                  "right?"],
                 [[p["beat"], p["beat_skew"], p["worker"], p["worker_skew"], p["rel"], p["intended"], p["picked"],
                   "yes" if p["offset"] == 0 else f"no ({p['offset']:+d} min)"] for p in m.meta["picks"]],
                 title=m.label)


@claim("find_reports on the worker's clock: workers behind beat's clock pick an earlier minute, the others beat's")
def workers_behind_beat_pick_an_earlier_period(talk: Measurement) -> None:
    """Judged on every pick whose clock reading was at least 0.5 s from a boundary (x = skew gap + delivery lag)."""
    picks = talk.meta["picks"]
    verify("every beat's tick reached every worker", len(picks) == talk.meta["expected_picks"],
           picks=len(picks), expected=talk.meta["expected_picks"])
    behind = [p for p in picks if p["x"] <= -0.5]
    ahead = [p for p in picks if 0.5 <= p["x"] <= PERIOD - 0.5]
    verify("some workers read their clock before beat's boundary, some after", behind and ahead,
           behind=len(behind), ahead=len(ahead))
    wrong_behind = [f"{p['worker']}/{p['beat']}" for p in behind if p["offset"] >= 0]
    wrong_ahead = [f"{p['worker']}/{p['beat']}" for p in ahead if p["offset"] != 0]
    verify("every worker behind beat's clock picked an earlier minute", not wrong_behind,
           not_earlier=wrong_behind, behind=len(behind))
    verify("every worker ahead of beat's clock (by less than a minute) picked beat's minute", not wrong_ahead,
           not_beats_minute=wrong_ahead, ahead=len(ahead))


@claim("with the period in the message, every worker picks the minute beat meant")
def period_in_the_message_is_always_right(message: Measurement) -> None:
    picks = message.meta["picks"]
    verify("every beat's tick reached every worker", len(picks) == message.meta["expected_picks"],
           picks=len(picks), expected=message.meta["expected_picks"])
    verify("no wrong pick", message.value == 0,
           wrong=[f"{p['worker']}/{p['beat']}" for p in picks if p["offset"]])


@claim("asking Redis TIME, every worker picks the same minute for the same tick")
def redis_time_makes_workers_agree(redis: Measurement) -> None:
    picks = redis.meta["picks"]
    verify("every beat's tick reached every worker", len(picks) == redis.meta["expected_picks"],
           picks=len(picks), expected=redis.meta["expected_picks"])
    for beat in redis.meta["beats"]:
        seen = {p["worker"]: p["picked"] for p in picks if p["beat"] == beat}
        verify(f"{beat}: one minute for all workers", len(set(seen.values())) == 1, picked=seen)


def beat_table(beat_ms: Sequence[Measurement]) -> Table:
    """Each beat's skew and how far from the true minute it fired."""
    return Table(["beat", "skew s", "fired s after the true minute"],
                 [[m.label, m.meta["skew"], round(m.value, 2)] for m in beat_ms],
                 title="celery beat on a skewed clock (− = early)")


# --------------------------------------------------------------------------- countdown


class CountdownRun:
    """Tasks due ``countdown`` s from now, to one worker per skew, sent two ways; collect the delays later.

    ``countdown``: :func:`send_with_countdown` (the ETA is the producer's
    clock + countdown, compared with the worker's clock). ``producer``:
    :func:`send_when_due` (the producer waits on its own clock and sends a
    task to run at once). Each task records the true time it ran.
    """

    def __init__(self, cluster: ClusterLike, *, countdown: float = 10.0, per_worker: int = 2,
                 skews: Sequence[float] = SKEWS) -> None:
        if countdown <= 0:
            raise ValueError(f"countdown must be positive, not {countdown!r}")
        self.cluster, self.countdown, self.skews = cluster, float(countdown), list(skews)
        self.run = uuid.uuid4().hex[:8]
        r = cluster.redis_client()
        task = cluster.task(stamp)
        self.sent: dict[str, tuple[str, float, float]] = {}  # key -> (how, skew, true send time)
        self.timers: list[threading.Timer] = []
        self.started = redis_now(r)
        for skew in self.skews:
            q = worker_for(skew)
            for i in range(per_worker):
                key = f"countdown-{q}-{i}"
                self.sent[key] = ("countdown", skew, redis_now(r))
                send_with_countdown(task, (self.run, key), self.countdown, q)
                key = f"producer-{q}-{i}"
                self.sent[key] = ("producer", skew, redis_now(r))
                self.timers.append(send_when_due(task, (self.run, key), self.countdown, q))

    def collect(self, window: float = 15.0) -> dict[str, Measurement]:
        """Wait until every task ran or ``window`` s after sending; delays per way of sending.

        A delay is the true run time minus the true send time; a task that did
        not run inside the window counts as ``inf``. Values: one delay per task;
        ``meta["skews"]``: the worker skew of each value, in order.
        """
        r = self.cluster.redis_client()

        def done() -> bool:
            return r.hlen(_key(self.run, "ran")) >= len(self.sent) or redis_now(r) >= self.started + window

        poll_until(done, window + 5, 0.1)
        ran = r.hgetall(_key(self.run, "ran"))
        out = {}
        labels = {"countdown": f"apply_async(countdown={self.countdown:g})",
                  "producer": f"fix: the producer waits {self.countdown:g} s, then sends"}
        for how, label in labels.items():
            delays, skews = [], []
            for key, (sent_how, skew, t_sent) in self.sent.items():
                if sent_how != how:
                    continue
                t_ran = ran.get(key.encode())
                delay = float(t_ran) - t_sent if t_ran is not None else math.inf
                delays.append(delay if delay <= window else math.inf)
                skews.append(skew)
            out[how] = Measurement(label, "delay", "s", delays, stat="median",
                                   meta={"how": how, "skews": skews, "countdown": self.countdown, "window": window})
        return out

    def stop(self) -> None:
        for timer in self.timers:
            timer.cancel()


def delays_by_skew(m: Measurement) -> dict[float, list[float]]:
    """A countdown Measurement's delays grouped by worker skew."""
    out: dict[float, list[float]] = {}
    for skew, d in zip(m.meta["skews"], m.values, strict=True):
        out.setdefault(skew, []).append(d)
    return out


def _judge_delays(m: Measurement, expect: Any) -> tuple[list[str], int, int]:
    """Compare each delay with ``expect(skew)``; returns problems, early cases and late cases checked.

    Tolerance: 15 % of the countdown. A task expected beyond the window (by
    more than the tolerance) must not have run in it; one expected within the
    tolerance of the window's end is not judged.
    """
    countdown, window = m.meta["countdown"], m.meta["window"]
    tol = 0.15 * countdown
    problems, early, late = [], 0, 0
    for skew, d in zip(m.meta["skews"], m.values, strict=True):
        e = expect(skew)
        if e > window + tol:
            late += e > countdown
            if math.isfinite(d):
                problems.append(f"skew {skew:+g}: ran after {d:.2f} s, expected not within {window:g} s")
        elif e < window - tol:
            early += e < countdown
            late += e > countdown
            if not abs(d - e) <= tol:
                problems.append(f"skew {skew:+g}: ran after {d:.2f} s, expected {e:.2f} s")
    return problems, early, late


@claim("countdown follows the worker's clock: a task runs max(0, countdown − skew) s after it was sent")
def countdown_follows_the_workers_clock(m: Measurement) -> None:
    countdown, window = m.meta["countdown"], m.meta["window"]
    problems, early, late = _judge_delays(m, lambda s: expected_delay(countdown, s))
    verify("some tasks are due early (a worker ahead) and some late (a worker behind)", early and late,
           early=early, late=late, countdown=countdown, window=window)
    verify("every delay matches countdown − skew (15 % of the countdown)", not problems, problems=problems)


@claim("a delay kept on the producer's clock runs countdown s later on every worker")
def producer_held_delay_is_on_time(m: Measurement) -> None:
    countdown, window = m.meta["countdown"], m.meta["window"]
    verify("the window is long enough to see a task run on time", window > 1.15 * countdown,
           window=window, countdown=countdown)
    problems, _, _ = _judge_delays(m, lambda s: countdown)
    verify("every task ran countdown s after it was sent, whatever the worker's skew", not problems,
           problems=problems)


def plot_countdown(ms: Sequence[Measurement], ax: Any = None) -> Any:
    """Actual delay against the worker's skew, for each way of sending; the model as a dashed line."""
    from labkit import plots  # noqa: PLC0415

    ax = plots.axis(ax)
    countdown, window = ms[0].meta["countdown"], ms[0].meta["window"]
    skews = sorted(set(ms[0].meta["skews"]))
    lo, hi = min(skews) - 5, max(skews) + 5
    xs = [lo + (hi - lo) * i / 200 for i in range(201)]
    ax.plot(xs, [expected_delay(countdown, x) for x in xs], ls="--", color="grey", lw=1,
            label="countdown − skew (model)")
    ax.axhline(window, color="black", lw=0.8, ls=":", label=f"window {window:g} s")
    for i, m in enumerate(ms):
        colour = plots.colour_for(m.label, i)
        ran = [(s, d) for s, d in zip(m.meta["skews"], m.values, strict=True) if math.isfinite(d)]
        missed = [s for s, d in zip(m.meta["skews"], m.values, strict=True) if not math.isfinite(d)]
        shift = (i - (len(ms) - 1) / 2) * 1.2
        if ran:
            ax.plot([s + shift for s, _ in ran], [d for _, d in ran], "o", color=colour, ms=7, label=m.label)
        if missed:
            ax.plot([s + shift for s in missed], [window] * len(missed), "^", color=colour, mfc="white", ms=9,
                    label=f"{m.label}: not within {window:g} s")
    ax.set_ylim(-1, window * 1.3)
    ax.legend(frameon=False, fontsize=8, loc="upper right")
    ax.set_xticks(skews)
    return plots.style(ax, f"countdown={countdown:g}: actual delay vs worker clock skew",
                       "actual delay [s]", "worker clock skew [s] (+ = ahead)")


# --------------------------------------------------------------------------- experiments: clocks


def probe_clocks(cluster: LocalCluster, workers: Sequence[str] | None = None, wait: float = 0.3) -> Measurement:
    """Run :func:`clock_probe` on each worker (in parallel): measured skew per worker.

    ``meta["probes"]`` holds each worker's full answer (its wall clock, what
    ``datetime.now()`` said, and how long its sleeps and timed waits took).
    """
    workers = list(workers or cluster.workers)
    task = cluster.task(clock_probe)
    results = {w: task.apply_async((wait,), queue=cluster.workers[w].spec.queues[0]) for w in workers}
    probes = [results[w].get(timeout=30) for w in workers]
    return Measurement("measured skew", "wall clock − Redis TIME", "s", [p["skew"] for p in probes], stat="max",
                       meta={"probes": probes, "workers": workers})


def probes_table(m: Measurement) -> Table:
    """One row per worker: set and measured skew, what it says the time is, its waits."""
    rows = []
    for p in m.meta["probes"]:
        rows.append([p["worker"], p["offset"], round(p["skew"], 2), p["now"],
                     " ".join(f"{k}={v:.2f}" for k, v in p["waits"].items())])
    return Table(["worker", "offset set s", "skew measured s", "worker says it is", "waits (s)"], rows)


# --------------------------------------------------------------------------- experiments: expires


def expires(cluster: LocalCluster, variant: str = "celery", worker: str = "fast30", n: int = 6,
            seconds: float = 10.0, timeout: float = 20.0) -> Measurement:
    """Send ``n`` tasks that may run for ``seconds`` from now; count those discarded.

    ``variant``: ``"celery"`` uses ``expires=seconds`` (:func:`send_with_expires`);
    ``"deadline"`` puts the deadline in the message and the task checks it
    against Redis TIME (:func:`send_with_deadline`). Discarded counts come
    from the result backend (state ``REVOKED``) or, for the fix, from the
    task's own "skipped" records. Values: 1 per discarded task.
    """
    if variant not in ("celery", "deadline"):
        raise ValueError("variant must be 'celery' or 'deadline'")
    run = uuid.uuid4().hex[:8]
    r = cluster.redis_client()
    q = cluster.workers[worker].spec.queues[0]
    results = []
    for i in range(n):
        if variant == "celery":
            results.append(send_with_expires(cluster.task(stamp), (run, f"t{i}"), seconds, q))
        else:
            results.append(send_with_deadline(cluster.task(stamp_before), (run, f"t{i}"), seconds, q, r))
    states = []
    for res in results:
        with contextlib.suppress(Exception):
            res.get(timeout=timeout, propagate=False)
        states.append(res.state)
    ran = r.hlen(_key(run, "ran"))
    if variant == "deadline":
        skipped = r.hlen(_key(run, "late"))
        discarded = [1.0] * skipped + [0.0] * (n - skipped)
        label = f"fix: deadline vs Redis TIME on {worker}"
    else:
        discarded = [1.0 if s == "REVOKED" else 0.0 for s in states]
        label = f"expires={seconds:g} on {worker}"
    offset = cluster.workers[worker].spec.clock_offset
    return Measurement(label, "discarded", "tasks", discarded, stat="sum",
                       meta={"n": n, "ran": ran, "states": states, "worker": worker, "offset": offset,
                             "seconds": seconds, "variant": variant})


@claim("expires is judged on the worker's clock: a worker ahead by more than expires discards every task")
def expires_follows_the_workers_clock(fast: Measurement, true: Measurement) -> None:
    """``fast``: a worker ahead by more than ``expires`` discards all; ``true``: the true-clock worker none."""
    verify("the fast worker is ahead by more than the expiry (by a margin of 20 %)",
           fast.meta["offset"] > 1.2 * fast.meta["seconds"] and true.meta["offset"] == 0,
           offset=fast.meta["offset"], expires=fast.meta["seconds"], true_offset=true.meta["offset"])
    verify("the fast worker discards every task, the true-clock worker runs every one",
           fast.value == fast.meta["n"] and fast.meta["ran"] == 0 and true.value == 0
           and true.meta["ran"] == true.meta["n"],
           fast_discarded=fast.value, true_discarded=true.value, n=fast.meta["n"])


@claim("a deadline in the message, checked against Redis TIME, discards nothing on the fast worker")
def deadline_against_redis_time_discards_none(fast: Measurement, fixed: Measurement) -> None:
    """Same worker, same ``seconds``: Celery's ``expires`` discards all; the deadline check runs all."""
    verify("same worker and expiry for both", fast.meta["worker"] == fixed.meta["worker"]
           and fast.meta["seconds"] == fixed.meta["seconds"], fast=fast.meta["worker"], fixed=fixed.meta["worker"])
    verify("expires discarded every task", fast.value == fast.meta["n"], discarded=fast.value, n=fast.meta["n"])
    verify("the deadline checked against Redis TIME discarded none, every task ran",
           fixed.value == 0 and fixed.meta["ran"] == fixed.meta["n"], discarded=fixed.value, ran=fixed.meta["ran"])


def expires_table(ms: Sequence[Measurement]) -> Table:
    return Table(["run", "worker skew s", "discarded", "of", "ran"],
                 [[m.label, m.meta["offset"], m.value, m.meta["n"], m.meta["ran"]] for m in ms])


# --------------------------------------------------------------------------- experiments: drift warning


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def drift_warnings(cluster: LocalCluster, workers: Sequence[str] = ("fast30", "fast10", "slow30"),
                   timeout: float = 10.0) -> Measurement:
    """Listen to the workers' task events with Celery's own ``events.State``; collect its drift warnings.

    The kernel plays the monitor (what Flower, ``celery events`` or a peer
    worker with gossip does): it receives each worker's ``task-*`` events,
    whose ``timestamp`` comes from the worker's clock, and ``State`` compares
    it with the time of arrival. Values: measured drift per worker (event
    timestamp − arrival); ``meta["warnings"]``: what Celery logged.
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
        # the receiver must be subscribed before the events are published
        poll_until(lambda: _subscriptions(r) > subscribed_before, timeout, 0.02)
        for w in workers:
            cluster.task(stamp).apply_async(("drift", w), queue=cluster.workers[w].spec.queues[0])
        poll_until(lambda: done >= set(workers), timeout, 0.05)
    finally:
        if "recv" in box:
            box["recv"].should_stop = True
        thread.join(3)
        state_log.removeHandler(capture)
    return Measurement("event timestamp − arrival", "drift", "s", [drift.get(w, math.nan) for w in workers],
                       stat="max", meta={"workers": list(workers), "drift": drift,
                                         "warnings": [m for m in capture.messages if "drift" in m.lower()],
                                         "offsets": {w: cluster.workers[w].spec.clock_offset for w in workers}})


def _subscriptions(r: Any) -> int:
    """Pub/sub channels and patterns with a subscriber on this Redis (event receivers subscribe)."""
    return int(r.pubsub_numpat()) + len(r.pubsub_channels())


def _quiet(fn: Any) -> Any:
    def run() -> None:
        try:
            fn()
        except Exception as exc:  # a socket timeout at the end of the window is not an error here
            log.debug("drift receiver stopped: %r", exc)
    return run


# --------------------------------------------------------------------------- the lesson in one figure


def summary_figure(picks: Sequence[Measurement], countdown_ms: Sequence[Measurement],
                   expires_ms: Sequence[Measurement], beat_ms: Sequence[Measurement]) -> Any:
    """The lesson in four panels: wrong picks, countdown delay vs skew, discarded tasks, beat timing."""
    import textwrap  # noqa: PLC0415

    import matplotlib.pyplot as plt  # noqa: PLC0415

    from labkit import plots  # noqa: PLC0415

    fig, grid = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    axes = list(grid.flat)
    plots.bars(list(picks), axes[0], title="find_reports at beat's minute: wrong picks", show_points=False)
    plot_countdown(countdown_ms, axes[1])
    axes[1].set_title("countdown: actual delay vs skew", fontsize=11, loc="left")
    plots.bars(list(expires_ms), axes[2], title="expires: tasks discarded", show_points=False)
    plots.bars(list(beat_ms), axes[3], title="celery beat: fired after the minute (− = early)", show_points=False)
    axes[3].axhline(0, color="black", lw=0.8)
    for ax in (axes[0], axes[2], axes[3]):
        labels = [textwrap.fill(t.get_text(), 22) for t in ax.get_xticklabels()]
        ax.set_xticks(ax.get_xticks(), labels, rotation=0, ha="center", fontsize=8)
    return fig


# --------------------------------------------------------------------------- one skew, every symptom


def try_skew(cluster: LocalCluster, skew: float = 10.0, countdown: float = 12.0, expires_s: float = 8.0,
             max_wait: float = 30.0) -> Measurement:
    """Every symptom of one clock skew, measured on a worker with that skew.

    Uses the lesson worker with exactly this skew if there is one, otherwise
    (re)starts a worker ``custom`` with it. Values: the actual delay of one
    ``countdown`` task (``inf`` if it did not run within ``max_wait`` s);
    ``meta``: the measured skew, whether an ``expires=expires_s`` task was
    discarded, and the minute ``find_reports`` picked versus the true minute.
    """
    name = next((n for n, w in cluster.workers.items() if w.spec.clock_offset == float(skew)), None)
    if name is None:
        name = "custom"
        if name in cluster.workers:
            cluster.remove_worker(name)
        cluster.add_worker(name, queues=[name], concurrency=1, clock_offset=skew)
    q = cluster.workers[name].spec.queues[0]
    run = uuid.uuid4().hex[:8]
    r = cluster.redis_client()
    _seed_reports(r, redis_now(r))
    sent = redis_now(r)
    cd = send_with_countdown(cluster.task(stamp), (run, "countdown"), countdown, q)
    ex = send_with_expires(cluster.task(stamp), (run, "expires"), expires_s, q)
    intended = period_key(redis_now(r))
    picked = cluster.task(find_reports).apply_async((run,), queue=q).get(timeout=30)
    probe = cluster.task(clock_probe).apply_async((0.1,), queue=q).get(timeout=30)
    with contextlib.suppress(Exception):
        ex.get(timeout=30, propagate=False)
    with contextlib.suppress(Exception):
        cd.get(timeout=max_wait, propagate=False)
    t_ran = r.hget(_key(run, "ran"), "countdown")
    delay = round(float(t_ran) - sent, 2) if t_ran is not None else math.inf
    return Measurement(f"{name} ({float(skew):+g} s)", "delay", "s", [delay], stat="last", meta={
        "worker": name, "skew set": float(skew), "skew measured": round(probe["skew"], 3), "countdown": countdown,
        "expected delay": expected_delay(countdown, probe["skew"]), "expires": expires_s,
        "discarded": ex.state == "REVOKED", "find_reports minute": picked[0].split("-")[1] if picked else None,
        "true minute": intended})
