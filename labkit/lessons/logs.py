"""Lesson 06: logs and errors you can find — per-worker files vs records with context, collected centrally.

(The module is ``logs``, not ``logging``: a notebook that runs
``from labkit.lessons import logging`` would hide the standard library's
``logging`` behind the lesson.)

One "request" is three tasks in a chain on two workers — hop 1 on ``w1``,
hop 2 on ``w2``, hop 3 on ``w1`` — each logging three lines. ``w2``'s wall
clock runs ``CLOCK_OFFSET`` seconds behind (libfaketime), as a host without
NTP would. Several requests run at once.

* **Before**: the tasks log with ``logging.getLogger(__name__)``. Celery's
  worker format stamps a time, a level and a process name
  (``ForkPoolWorker-1`` — the same on every worker): no request, task,
  worker or host. To trace a request you take its time window and read
  every worker's file. We count, per request, lines of other requests
  picked up and lines of its own missed, and, merging its lines by
  timestamp, lines out of order.
* **After**: ``get_task_logger(__name__)`` (Celery adds the task id and
  name), a ``LoggerAdapter`` for business context (the talk's idea), and a
  handler on Celery's task logger that stamps every record with task id,
  root id, parent id, worker, host, pid and a per-process sequence number,
  and ships it as JSON to a Redis list the cluster owns — standing in for a
  log shipper feeding Logstash/Elasticsearch or Loki (Logstash's ``redis``
  input reads exactly such a list). A trace is every record with the
  request's root id, ordered by the causal chain (parent ids), then by
  sequence within a task: no clock involved.
* **Errors**: the same failures — exceptions on both workers, and one pool
  child killed outright (a segfault or the OOM killer) — as reported by the
  talk's ``after_failure`` handler, by a base class's ``on_failure``, and by
  Celery's ``task_failure`` signal feeding a central list.

Shipping is switched on per worker by the environment (``LABKIT_LOG_SINK``)
in :data:`CLUSTER`, so other lessons' workers, which import this module
too, ship nothing.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import socket
import time
import uuid
from collections import defaultdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery import Task, chain, shared_task
from celery.signals import after_setup_task_logger, task_failure
from celery.utils.log import get_task_logger

from labkit.app import redis_client
from labkit.measure import Measurement, claim, verify
from labkit.poll import poll_until
from labkit.table import Table

if TYPE_CHECKING:  # pragma: no cover
    from labkit.cluster import LocalCluster

NOTEBOOK = "06_logging.ipynb"
CLOCK_OFFSET = -1.5  # seconds w2's wall clock runs behind (chosen: any skew longer than a hop does this)
SINK_ENV = "LABKIT_LOG_SINK"
LOG_KEY, ERROR_KEY, MAIL_KEY = "logs:records", "logs:failures", "logs:mail"
QUEUE_A, QUEUE_B = "logs.a", "logs.b"
CLUSTER = {
    "workers": [
        {"name": "w1", "queues": [QUEUE_A], "env": {SINK_ENV: "1"}},
        {"name": "w2", "queues": [QUEUE_B], "env": {SINK_ENV: "1"}, "clock_offset": CLOCK_OFFSET},
    ],
    "zookeeper": 0,
}
WORKSHOP = {"REQUESTS": 16, "PAUSE": 0.03, "BAD": 10}
HOPS = ((1, QUEUE_A), (2, QUEUE_B), (3, QUEUE_A))
LINES = ("reading batch {batch}", "parsed {rows} rows of batch {batch}", "wrote batch {batch}")

# Two names, not one: get_task_logger(name) re-parents the logger *called* name under Celery's
# task logger, so a module logger of the same name would silently become a task logger too.
plain_log = logging.getLogger(f"{__name__}.before")  # before: a module logger, as in most code bases
task_log = get_task_logger(f"{__name__}.after")  # after: Celery's task logger (task id and name in the format)


# ----------------------------------------------------------------------------- shipping (worker side)
_seq = itertools.count(1)


class TaskContext(logging.Filter):
    """Stamp every record with where and in which task it was written (the talk's "extra info")."""

    host = socket.gethostname()

    def filter(self, record: logging.LogRecord) -> bool:
        from celery import current_task  # noqa: PLC0415

        request = current_task.request if current_task else None
        record.task_id = getattr(request, "id", None)
        record.task_name = getattr(current_task, "name", None)
        record.root_id = getattr(request, "root_id", None)
        record.parent_id = getattr(request, "parent_id", None)
        record.worker = getattr(request, "hostname", None) or os.environ.get("LABKIT_WORKER_NAME", "")
        record.host = self.host
        record.seq = next(_seq)  # per process: the order this process wrote its lines in
        return True


class RedisListHandler(logging.Handler):
    """Ship each record as one JSON object to a Redis list (what a log shipper would carry)."""

    FIELDS = ("task_id", "task_name", "root_id", "parent_id", "worker", "host", "seq", "dealer")

    def __init__(self, key: str = LOG_KEY) -> None:
        super().__init__()
        self.key = key
        self.addFilter(TaskContext())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            doc = {"ts": record.created, "level": record.levelname, "logger": record.name, "pid": record.process,
                   "msg": record.getMessage(), **{f: getattr(record, f, None) for f in self.FIELDS}}
            redis_client().rpush(self.key, json.dumps(doc))
        except Exception:  # a logging handler must never break the task
            self.handleError(record)


@after_setup_task_logger.connect
def _ship_task_logs(logger: logging.Logger, **_kwargs: Any) -> None:
    """In workers started with ``LABKIT_LOG_SINK``: task-logger records go to Redis too."""
    if os.environ.get(SINK_ENV):
        logger.addHandler(RedisListHandler())


def _summary(args: Any, kwargs: Any, limit: int = 120) -> str:
    text = ", ".join([*(repr(a) for a in args or ()), *(f"{k}={v!r}" for k, v in (kwargs or {}).items())])
    return text if len(text) <= limit else text[: limit - 1] + "…"


@task_failure.connect
def _collect_failure(sender: Task | None = None, task_id: str | None = None, exception: BaseException | None = None,
                     args: Any = None, kwargs: Any = None, einfo: Any = None, **_: Any) -> None:
    """Every failure on a worker with ``LABKIT_LOG_SINK``, with its context, to one Redis list.

    ``task_failure`` is sent by the process that noticed the failure: the
    pool child for an exception in the task, the worker's main process
    when the child died (``WorkerLostError``) or hit the hard time limit.
    """
    if not os.environ.get(SINK_ENV) or sender is None:
        return
    request = sender.request
    doc = {"reporter": "task_failure", "task_id": task_id, "task": sender.name, "args": _summary(args, kwargs),
           "worker": getattr(request, "hostname", None) or os.environ.get("LABKIT_WORKER_NAME", ""),
           "host": socket.gethostname(), "pid": os.getpid(),
           "exception": f"{type(exception).__name__}: {exception}",
           "traceback": str(getattr(einfo, "traceback", "") or "")}
    redis_client().rpush(ERROR_KEY, json.dumps(doc))


# ----------------------------------------------------------------------------- tasks
def _lines(hop: int) -> list[str]:
    batch = uuid.uuid4().hex[:8]  # makes every line unique: the measurement matches lines by text
    rows = 100 + int(batch[:2], 16)
    return [f"hop {hop}: " + text.format(batch=batch, rows=rows) for text in LINES]


@shared_task(name="logs.step_plain")
def step_plain(trail: list, hop: int, pause: float) -> list:
    """Before: three lines through a module logger; returns the trail of what was logged."""
    lines = _lines(hop)
    for line in lines:
        plain_log.info(line)
        time.sleep(pause)
    return [*trail, *lines]


@shared_task(name="logs.step")
def step(trail: list, hop: int, pause: float, dealer: str) -> list:
    """After: the same lines through Celery's task logger, with the dealer as business context."""
    log = logging.LoggerAdapter(task_log, {"dealer": dealer})  # the talk's LoggerAdapter, for what only we know
    lines = _lines(hop)
    for line in lines:
        log.info(line)
        time.sleep(pause)
    return [*trail, *lines]


class TalkTask(Task):
    """The talk's base class (slide 49), reduced to its failure handler, plus the real hook.

    ``after_failure`` is the slide's name and body (``send_email`` becomes an
    ``RPUSH`` to a Redis list standing in for the mailbox). Celery has no
    such hook: nothing calls it. ``on_failure`` is the nearest real one,
    written well: it reports the task, its arguments, the worker and the
    traceback.
    """

    def after_failure(self, *args: Any, **kwargs: Any) -> None:
        redis_client().rpush(MAIL_KEY, json.dumps({"reporter": "after_failure", "body": "The task failed!"}))

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        redis_client().rpush(MAIL_KEY, json.dumps({
            "reporter": "on_failure", "task_id": task_id, "task": self.name, "args": _summary(args, kwargs),
            "worker": self.request.hostname, "host": socket.gethostname(), "pid": os.getpid(),
            "exception": f"{type(exc).__name__}: {exc}", "traceback": str(einfo.traceback or "")}))


@shared_task(base=TalkTask, name="logs.import_feed")
def import_feed(dealer: str, mode: str = "ok") -> str:
    """Import one dealer's feed: ``bad`` raises, ``crash`` kills its own pool process (SIGKILL),
    ``slow`` takes 10 s (send it with a ``time_limit``)."""
    if mode == "slow":
        time.sleep(10)
    if mode == "bad":
        raise ValueError(f"feed of dealer {dealer} has no header row")
    if mode == "crash":  # stands in for a segfault in a C extension, or the kernel's OOM killer
        os.kill(os.getpid(), signal.SIGKILL)
    return dealer


# ----------------------------------------------------------------------------- reading logs
LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): (\w+)/([\w-]+)\] (.*)$")


def _file_offsets(cluster: LocalCluster) -> dict[str, int]:
    return {name: w.log_path.stat().st_size if w.log_path.exists() else 0 for name, w in cluster.workers.items()}


def read_worker_logs(cluster: LocalCluster, since: dict[str, int] | None = None) -> list[dict]:
    """Every line each worker wrote to its own log file (from ``since`` offsets): time, process, text."""
    out = []
    for name, w in cluster.workers.items():
        with open(w.log_path, "rb") as fh:
            fh.seek((since or {}).get(name, 0))
            text = fh.read().decode("utf-8", "replace")
        for raw in text.splitlines():
            m = LINE.match(raw)
            if m:
                ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append({"file": f"{name}.log", "ts": ts, "level": m.group(2), "process": m.group(3),
                            "msg": m.group(4), "raw": raw})
    return out


def out_of_order(listed: list[str], truth: list[str]) -> int:
    """Lines listed before some line that really happened earlier (``truth`` is the real order)."""
    rank = {line: i for i, line in enumerate(truth)}
    ranks = [rank[x] for x in listed if x in rank]
    return sum(1 for i, r in enumerate(ranks) if any(later < r for later in ranks[i + 1:]))


def _send_requests(cluster: LocalCluster, plain: bool, requests: int, pause: float, timeout: float
                   ) -> list[dict]:
    """Send ``requests`` three-hop chains at once; returns what each logged and its true time window."""
    sent = []
    for k in range(requests):
        dealer = f"D{k:03d}"
        if plain:
            sigs = [step_plain.s([], 1, pause)] + [step_plain.s(h, pause) for h, _ in HOPS[1:]]
        else:
            sigs = [step.s([], 1, pause, dealer)] + [step.s(h, pause, dealer) for h, _ in HOPS[1:]]
        for sig, (_, queue) in zip(sigs, HOPS, strict=True):
            sig.set(queue=queue)
        t0 = time.time()
        sent.append({"dealer": dealer, "start": t0, "result": chain(*sigs).apply_async()})
    for s in sent:
        s["truth"] = s["result"].get(timeout=timeout)
        first = s["result"]
        while first.parent is not None:  # chain() returns the last task's result; walk back to hop 1
            first = first.parent
        s["root_id"] = first.id
    return sent


def before(cluster: LocalCluster, *, requests: int = 8, pause: float = 0.05, timeout: float = 60.0
           ) -> dict[str, Measurement]:
    """Trace each request the only way its logs allow: its time window, across every worker's file.

    The window is exact: from the moment the kernel sent the request to its
    last line on a worker whose clock is right. Returns ``{"find": errors per request (lines of others picked
    up + own lines missed), "order": lines out of order per request when
    its lines are merged by timestamp}``.
    """
    offsets = _file_offsets(cluster)
    sent = _send_requests(cluster, True, requests, pause, timeout)
    expected = {m for s in sent for m in s["truth"]}

    def all_lines() -> list[dict] | None:  # written before each task returned; read until all are there
        found = [x for x in read_worker_logs(cluster, offsets) if x["msg"].startswith("hop ")]
        return found if expected <= {x["msg"] for x in found} else None

    lines = poll_until(all_lines, 5.0, 0.05) or [x for x in read_worker_logs(cluster, offsets)
                                                 if x["msg"].startswith("hop ")]
    where = {x["msg"]: x for x in lines}
    right_clock = {f"{name}.log" for name, w in cluster.workers.items() if not w.spec.clock_offset}
    errors, disorder, foreign_total, missed_total = [], [], 0, 0
    for s in sent:
        truth = s["truth"]
        s["end"] = max(where[m]["ts"] for m in truth if m in where and where[m]["file"] in right_clock)
        window = {x["msg"] for x in lines if s["start"] <= x["ts"] <= s["end"]}
        foreign, missed = len(window - set(truth)), len(set(truth) - window)
        foreign_total, missed_total = foreign_total + foreign, missed_total + missed
        errors.append(foreign + missed)
        merged = sorted((m for m in truth if m in where), key=lambda m: where[m]["ts"])
        disorder.append(out_of_order(merged, truth))
    files = sorted({x["file"] for x in lines})
    meta = {"requests": requests, "lines_per_request": 3 * len(HOPS), "foreign": foreign_total,
            "missed": missed_total, "files": files, "clock_offset": cluster.workers["w2"].spec.clock_offset,
            "example": {"truth": sent[0]["truth"], "start": sent[0]["start"], "end": sent[0]["end"]},
            "lines": lines}
    return {
        "find": Measurement("before: time window over every file", "wrong or missing lines per request", "lines",
                            errors, stat="sum", meta=meta),
        "order": Measurement("before: merged by timestamp", "lines out of order per request", "lines",
                             disorder, stat="sum", meta=meta),
    }


def fetch_records(cluster: LocalCluster, key: str = LOG_KEY) -> list[dict]:
    """Every record the workers shipped to the central list, oldest first (and empty it)."""
    r = cluster.redis_client()
    pipe = r.pipeline()
    pipe.lrange(key, 0, -1)
    pipe.delete(key)
    raw, _ = pipe.execute()
    r.close()
    return [json.loads(x) for x in raw]


def trace(records: list[dict], root_id: str) -> list[dict]:
    """One request's records in causal order: tasks along the parent chain, then each task's own order."""
    mine = [r for r in records if r.get("root_id") == root_id]
    parent = {r["task_id"]: r.get("parent_id") for r in mine}

    def depth(task_id: str) -> int:
        d = 0
        while parent.get(task_id) and parent[task_id] != task_id and d < 100:
            task_id, d = parent[task_id], d + 1
        return d

    return sorted(mine, key=lambda r: (depth(r["task_id"]), r["seq"]))


def after(cluster: LocalCluster, *, requests: int = 8, pause: float = 0.05, timeout: float = 60.0
          ) -> dict[str, Measurement]:
    """Trace each request by its root id in the central records, ordered causally.

    Returns ``{"find": ..., "order": ...}`` like :func:`before`; ``meta``
    also counts how many lines a *timestamp* sort of the same central
    records still puts out of order (central is not the same as ordered).
    """
    fetch_records(cluster)  # start from an empty list
    sent = _send_requests(cluster, False, requests, pause, timeout)
    records = fetch_records(cluster)  # each hop shipped its lines before it returned
    errors, disorder, by_time = [], [], []
    for s in sent:
        truth, found = s["truth"], trace(records, s["root_id"])
        msgs = [r["msg"] for r in found]
        errors.append(len(set(msgs) - set(truth)) + len(set(truth) - set(msgs)))
        disorder.append(out_of_order(msgs, truth))
        by_time.append(out_of_order([r["msg"] for r in sorted(found, key=lambda r: r["ts"])], truth))
    example = trace(records, sent[0]["root_id"])
    meta = {"requests": requests, "lines_per_request": 3 * len(HOPS), "records": len(records),
            "timestamp_out_of_order": sum(by_time), "example": example,
            "workers": sorted({r["worker"] for r in records}), "hosts": sorted({r["host"] for r in records})}
    return {
        "find": Measurement("after: root id in the central records", "wrong or missing lines per request", "lines",
                            errors, stat="sum", meta=meta),
        "order": Measurement("after: causal order (parent ids, then sequence)", "lines out of order per request",
                             "lines", disorder, stat="sum", meta=meta),
    }


@claim("every request's lines are found by its id — none missing, none from another request")
def trace_by_id_is_exact(m: Measurement) -> None:
    x = m.meta
    verify("each request's trace holds exactly its own lines", m.value == 0 and m.n == x["requests"],
           wrong_or_missing=m.value, requests=x["requests"], per_request=x["lines_per_request"])


@claim("within each request's trace no line is out of order")
def trace_is_in_order(m: Measurement) -> None:
    verify("no line of any trace is listed before a line that happened earlier",
           m.value == 0 and m.n == m.meta["requests"], out_of_order=m.value, requests=m.meta["requests"])


def trace_table(records: list[dict]) -> Table:
    """One trace as the central store shows it: worker, task, sequence, the worker's own clock, message."""
    t0 = min(r["ts"] for r in records) if records else 0.0
    return Table(["worker", "task", "task id", "seq", "worker clock +s", "dealer", "message"],
                 [[(r["worker"] or "").split("@")[0], r["task_name"], (r["task_id"] or "")[:8], r["seq"],
                   round(r["ts"] - t0, 3), r.get("dealer"), r["msg"]] for r in records])


def window_table(m: Measurement) -> Table:
    """The first request's own lines, where the files put them, and whether its time window holds them."""
    x = m.meta["example"]
    truth = x["truth"]
    where = {line["msg"]: line for line in m.meta["lines"]}
    rows = []
    for msg in truth:
        line = where.get(msg)
        if line is None:
            rows.append(["?", None, "?", msg, "not in any file"])
            continue
        inside = x["start"] <= line["ts"] <= x["end"]
        rows.append([line["file"], round(line["ts"] - x["start"], 3), line["process"], msg,
                     "yes" if inside else "no"])
    others = sum(1 for line in m.meta["lines"] if x["start"] <= line["ts"] <= x["end"] and line["msg"] not in truth)
    return Table(["file", "stamped at, s after sending", "process", "message", "in its window"], rows,
                 title=f"request 0: its window is {x['end'] - x['start']:.2f} s long",
                 note=f"the same window also holds {others} lines of other requests")


# ----------------------------------------------------------------------------- errors
def error_reports(cluster: LocalCluster, *, bad: int = 6, crashes: int = 1, timeouts: int = 0,
                  time_limit: float = 1.0, timeout: float = 60.0) -> dict[str, Measurement]:
    """``bad`` failing imports (half per worker), ``crashes`` killed children and ``timeouts`` imports
    killed at their hard ``time_limit``: who reported what?

    Ground truth is the result backend: every task whose state is
    ``FAILURE``. Each reporter's measurement counts the failures it
    reported *with* task name, arguments, worker and traceback. ``meta``:
    the failures, what the reporter missed, and in how many worker log
    files the failures' tracebacks are scattered.
    """
    r = cluster.redis_client()
    r.delete(MAIL_KEY, ERROR_KEY)
    offsets = _file_offsets(cluster)
    task = cluster.task(import_feed)
    jobs = [task.apply_async((f"D{k:03d}", "bad"), queue=(QUEUE_A, QUEUE_B)[k % 2]) for k in range(bad)]
    jobs += [task.apply_async((f"X{k:03d}", "crash"), queue=QUEUE_B) for k in range(crashes)]
    jobs += [task.apply_async((f"T{k:03d}", "slow"), queue=QUEUE_A, time_limit=time_limit) for k in range(timeouts)]
    jobs += [task.apply_async((f"OK{k}", "ok"), queue=QUEUE_A) for k in range(2)]
    for job in jobs:
        job.get(timeout=timeout, propagate=False)
    failed = {j.id: j for j in jobs if j.state == "FAILURE"}

    def central_has_all() -> bool:
        # a task's result turns FAILURE before its handlers run (on_failure, then the signal):
        # once the signal's report is in, everything that was going to report it has
        ids = {json.loads(x)["task_id"] for x in r.lrange(ERROR_KEY, 0, -1)}
        return set(failed) <= ids

    poll_until(central_has_all, 15.0, 0.05)
    mail = [json.loads(x) for x in r.lrange(MAIL_KEY, 0, -1)]
    central = [json.loads(x) for x in r.lrange(ERROR_KEY, 0, -1)]
    r.delete(MAIL_KEY, ERROR_KEY)
    r.close()
    logs = read_worker_logs(cluster, offsets)
    scattered = sorted({x["file"] for x in logs if x["level"] == "ERROR"})
    kinds = {j.id: "crash" if "WorkerLostError" in repr(j.result) else
             "time limit" if "TimeLimitExceeded" in repr(j.result) else "exception" for j in failed.values()}

    def measure(label: str, reports: list[dict]) -> Measurement:
        ids = {d.get("task_id") for d in reports if d.get("task_id") in failed}
        full = {d["task_id"] for d in reports if d.get("task_id") in failed
                and all(d.get(k) for k in ("task", "args", "worker", "traceback"))}
        missed = sorted(kinds[i] for i in failed if i not in ids)
        return Measurement(label, "failures reported with task, args, worker, traceback", "failures", [len(full)],
                           stat="sum", meta={"failures": len(failed), "reports": len(reports),
                                             "reported": len(ids), "missed": missed, "error_files": scattered,
                                             "example": reports[0] if reports else None})

    return {
        "after_failure": measure("talk: after_failure()", [d for d in mail if d["reporter"] == "after_failure"]),
        "on_failure": measure("base class on_failure()", [d for d in mail if d["reporter"] == "on_failure"]),
        "task_failure": measure("fix: task_failure signal, central", central),
    }


@claim("every failure, on every worker, reached one place with its task, arguments, worker and traceback")
def every_failure_reported(m: Measurement) -> None:
    x = m.meta
    verify("all failures reported, each with its context", x["failures"] > 0 and m.value == x["failures"],
           reported_with_context=m.value, failures=x["failures"], missed=x["missed"])


def errors_table(results: dict[str, Measurement]) -> Table:
    return Table(["reporter", "failures", "reported", "with full context", "missed"],
                 [[m.label, m.meta["failures"], m.meta["reported"], int(m.value), ", ".join(m.meta["missed"]) or "-"]
                  for m in results.values()], title="one set of failures, three ways to hear about them")


# ----------------------------------------------------------------------------- plots
def plot(before_: dict[str, Measurement], after_: dict[str, Measurement]):
    """Wrong-or-missing lines and out-of-order lines per request, before vs after."""
    from labkit.plots import bars, panels  # noqa: PLC0415

    fig, (ax1, ax2) = panels(2, width=5.2)
    bars([before_["find"], after_["find"]], ax1, title="finding a request's lines").set_ylabel("lines, all requests")
    bars([before_["order"], after_["order"]], ax2, title="putting them in order").set_ylabel("lines, all requests")
    return fig


def group_by_request(records: list[dict]) -> dict[str, list[dict]]:
    """Central records grouped by root id (one group per request)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        out[r.get("root_id") or "-"].append(r)
    return dict(out)
