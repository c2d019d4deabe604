"""Lesson 07: a testing strategy — which kind of test catches which Celery bug, measured.

The 2014 talk's testing strategy (slides 71–73): test outside of Celery;
with a single worker and job; with one worker and concurrent jobs; with
several servers; ramp up as much as possible. This module turns it into six
levels and runs one test suite (``labkit/lessons/_testing_suite/``) at each:

1. **call** the task's function in the test process (anything it sends runs
   eagerly — the only way such a function runs without a broker);
2. **eager**: ``task_always_eager`` — ``.delay()`` runs the task in the caller;
3. **in-process worker**: ``celery.contrib.testing.worker.start_worker`` — a
   real consumer in a thread of the test process, solo pool, in-memory broker;
4. **prefork worker**: one real ``celery worker`` subprocess, one job at a time;
5. **two workers**, one of them with a skewed clock (libfaketime);
6. **ramp up**: the suite once per step, on a worker running 1, 2, 4, then 8
   jobs at once.

Levels 4–6 run through labkit's pytest plugin (:mod:`labkit.testing`):
the suite asks for ``labkit_cluster`` and the level chooses its shape.

The suite tests seven pieces of application code, each in a buggy and a
fixed version (:class:`Buggy`, :class:`Fixed`). A level **catches** a bug
when its test fails on the buggy code and passes on the fixed code; a test
that fails on both is a false alarm, and the matrix shows it as such.

What Celery 5.7 really does in eager mode (read in ``celery/app/task.py``):
``apply_async`` with ``task_always_eager`` *does* serialise the arguments
(a round trip through the task serializer, since Celery 4.3) and runs the
task inside ``denied_join_result()`` (since 4.2), so ``result.get()`` in an eager task
raises. It does not serialise the *result*, enforces no time limit and runs
in the caller's process, on the caller's clock.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import shared_task

from labkit.app import redis_client
from labkit.measure import Comparison, Measurement, claim, verify
from labkit.table import Table

if TYPE_CHECKING:  # pragma: no cover - workers import this module: keep it light
    from celery import Celery

    from labkit.cluster import LocalCluster

NOTEBOOK = "07_testing.ipynb"

SUITE = Path(__file__).resolve().parent / "_testing_suite"
LEVELS = {1: "call the function", 2: "eager mode", 3: "in-process worker",
          4: "prefork worker", 5: "two workers, one skewed", 6: "ramp up"}
BUGS = {
    "non_json_argument": "a set passed as a task argument",
    "json_result": "a dict with int keys returned",
    "get_in_task": "result.get() inside a task",
    "module_state": "module-level state per pool child",
    "shared_temp_file": "a race on one shared temp file",
    "soft_time_limit": "a soft time limit that fires",
    "clock": "a query on the worker's clock",
}
HOLD = 0.02  # seconds a task "works" (a stand-in for I/O), so that concurrent jobs overlap
SOFT_LIMIT = 0.5  # the export task's soft time limit (seconds)
ROW_SECONDS = 0.025  # time per exported row (a sleep: never shorter, often longer under load)
EXPORT_ROWS = 24  # rows the test exports: 0.6 s in one task, over the limit however fast the machine
CHUNK_ROWS = 2  # the fixed export's rows per task: 0.05 s, a tenth of the limit — 0.45 s of headroom
# for a loaded machine: the limit counts from the worker's main process seeing the child start the
# task to it seeing the result, so scheduling delays of both processes count against it.
GET_WAIT = 0.5  # how long the buggy order_total waits for each price
LEVEL3_DB = 1  # the Redis database level 3's in-process worker uses as its broker


def cluster_config(workers: int = 1) -> dict[str, Any]:
    """Level 4's cluster (and the notebook's): prefork workers running one job at a time."""
    return {"workers": [{"name": f"w{i}", "concurrency": 1} for i in range(1, workers + 1)], "zookeeper": 0}


CLUSTER = cluster_config()
WORKSHOP = {"JOBS": 16, "SKEW": 120}


def level5_config(skew: float = 60.0) -> dict[str, Any]:
    """Level 5: a true-clock worker and one ``skew`` seconds ahead, one job at a time each.

    ``worker_direct`` gives each worker a queue of its own, so a test can run
    a task on every worker (``run.each``).
    """
    return {"workers": [{"name": "w1", "concurrency": 1}, {"name": "skewed", "concurrency": 1, "clock_offset": skew}],
            "zookeeper": 0, "settings": {"worker_direct": True}}


# ============================================================================ the code under test
# Each bug is a task (or two) plus the few lines of application code that call
# it; `run` is how the test runs a task at its level (see the runners below).

@shared_task(name="testing.distinct_tags")
def distinct_tags(tags: list[str]) -> int:
    return len(set(tags))


@shared_task(name="testing.stock_by_sku")
def stock_by_sku(skus: list[int]) -> dict[int, int]:
    return {sku: 10 * sku for sku in skus}  # int keys: JSON turns them into strings


@shared_task(name="testing.stock_pairs")
def stock_pairs(skus: list[int]) -> list[list[int]]:
    return [[sku, 10 * sku] for sku in skus]


def price_of(item: int) -> int:
    return 3 * item


@shared_task(name="testing.price")
def price(item: int) -> int:
    return price_of(item)


@shared_task(name="testing.order_total_waits")
def order_total_waits(items: list[int], wait: float = GET_WAIT) -> int:
    return sum(price.delay(i).get(timeout=wait) for i in items)  # waits on another task, inside a task


@shared_task(name="testing.order_total")
def order_total(items: list[int]) -> int:
    return sum(price_of(i) for i in items)


_welcomed: set[str] = set()  # per process: each pool child has its own


@shared_task(name="testing.welcome_once_per_process")
def welcome_once_per_process(user: str) -> bool:
    time.sleep(HOLD)
    if user in _welcomed:
        return False
    _welcomed.add(user)
    return True  # "the e-mail was sent"


@shared_task(name="testing.welcome_once")
def welcome_once(user: str) -> bool:
    time.sleep(HOLD)
    return bool(redis_client().set(f"testing:welcomed:{user}", 1, nx=True, ex=600))


def _write_slowly(fh: Any, report_id: int, lines: int = 4) -> None:
    for k in range(lines):
        fh.write(f"report {report_id} line {k}\n")
        fh.flush()
        time.sleep(HOLD / lines)


@shared_task(name="testing.render_shared_tmp")
def render_shared_tmp(report_id: int, out_dir: str) -> str:
    tmp = Path(out_dir) / "report.tmp"  # one name for every task
    with open(tmp, "w") as fh:
        _write_slowly(fh, report_id)
    final = Path(out_dir) / f"report-{report_id}.txt"
    shutil.copy(tmp, final)
    return str(final)


@shared_task(name="testing.render_own_tmp")
def render_own_tmp(report_id: int, out_dir: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")  # a name per task
    with os.fdopen(fd, "w") as fh:
        _write_slowly(fh, report_id)
    final = Path(out_dir) / f"report-{report_id}.txt"
    os.replace(tmp, final)  # atomic publish
    return str(final)


@shared_task(name="testing.export_rows", soft_time_limit=SOFT_LIMIT)
def export_rows(rows: int, step: float = ROW_SECONDS) -> int:
    for _ in range(rows):
        time.sleep(step)
    return rows


@shared_task(name="testing.due_by_worker_clock")
def due_by_worker_clock(reminders: list[list[Any]]) -> list[str]:
    now = time.time()  # the worker's clock
    return sorted(name for name, at in reminders if at <= now)


@shared_task(name="testing.due_at")
def due_at(reminders: list[list[Any]], now: float) -> list[str]:
    return sorted(name for name, at in reminders if at <= now)  # the caller's clock, in the message


class Buggy:
    """The application code with the seven bugs."""

    @staticmethod
    def count_tags(run: Runner, words: list[str]) -> int:
        return run(distinct_tags, set(words))  # a set is not JSON

    @staticmethod
    def stock_level(run: Runner, skus: list[int], sku: int) -> int:
        return run(stock_by_sku, skus)[sku]

    @staticmethod
    def total(run: Runner, items: list[int]) -> int:
        return run(order_total_waits, items)

    @staticmethod
    def welcomes_sent(run: Runner, user: str, times: int) -> int:
        return sum(run.many(welcome_once_per_process, [(user,)] * times))

    @staticmethod
    def render(run: Runner, ids: list[int], out_dir: str) -> list[str]:
        return run.many(render_shared_tmp, [(i, out_dir) for i in ids])

    @staticmethod
    def export(run: Runner, rows: int) -> int:
        return run(export_rows, rows)

    @staticmethod
    def due(run: Runner, reminders: list[list[Any]]) -> list[list[str]]:
        return run.each(due_by_worker_clock, reminders)


class Fixed:
    """The same application code, fixed."""

    @staticmethod
    def count_tags(run: Runner, words: list[str]) -> int:
        return run(distinct_tags, sorted(set(words)))

    @staticmethod
    def stock_level(run: Runner, skus: list[int], sku: int) -> int:
        return dict(run(stock_pairs, skus))[sku]

    @staticmethod
    def total(run: Runner, items: list[int]) -> int:
        return run(order_total, items)

    @staticmethod
    def welcomes_sent(run: Runner, user: str, times: int) -> int:
        return sum(run.many(welcome_once, [(user,)] * times))

    @staticmethod
    def render(run: Runner, ids: list[int], out_dir: str) -> list[str]:
        return run.many(render_own_tmp, [(i, out_dir) for i in ids])

    @staticmethod
    def export(run: Runner, rows: int) -> int:
        chunks = [min(CHUNK_ROWS, rows - start) for start in range(0, rows, CHUNK_ROWS)]
        return sum(run.many(export_rows, [(n,) for n in chunks]))  # each task well inside its limit

    @staticmethod
    def due(run: Runner, reminders: list[list[Any]]) -> list[list[str]]:
        return run.each(due_at, reminders, time.time())


CODE = {"buggy": Buggy, "fixed": Fixed}


# ============================================================================ runners: one per level
class Runner:
    """How a test runs a task: ``run(task, *args)``, ``run.many(task, args_list)``, ``run.each(task, *args)``.

    ``many`` sends every call before waiting for any (they may run at once);
    ``each`` runs one call on every worker and returns every answer (one
    answer where there is only one place to run).
    """

    level = 0
    timeout = 30.0
    interval = 0.5  # how often get() polls a backend that cannot push results (Celery's default)

    def __init__(self, app: Celery) -> None:
        self.app = app

    def __call__(self, task: Any, *args: Any) -> Any:
        return self.app.tasks[task.name].delay(*args).get(timeout=self.timeout, interval=self.interval)

    def many(self, task: Any, args_list: Sequence[tuple]) -> list[Any]:
        t = self.app.tasks[task.name]
        results = [t.delay(*args) for args in args_list]
        return [r.get(timeout=self.timeout, interval=self.interval) for r in results]

    def each(self, task: Any, *args: Any) -> list[Any]:
        return [self(task, *args)]

    @contextlib.contextmanager
    def active(self) -> Iterator[Runner]:
        """Make this runner's app current while the suite runs."""
        previous = _current_app()
        self.app.set_current()
        try:
            yield self
        finally:
            previous.set_current()


def _current_app() -> Celery:
    from celery import current_app  # noqa: PLC0415

    return current_app._get_current_object()


def _local_app(name: str, **conf: Any) -> Celery:
    """An app for the test process's own levels (1–3): the kit's settings plus ``conf``."""
    from celery import Celery  # noqa: PLC0415

    from labkit.app import DEFAULT_SETTINGS  # noqa: PLC0415

    app = Celery(name, set_as_current=False)
    app.conf.update({**DEFAULT_SETTINGS, "worker_hijack_root_logger": False, **conf})
    return app


class CallRunner(Runner):
    """Level 1: call the task's function; whatever it sends runs eagerly (there is no broker)."""

    level = 1

    def __init__(self) -> None:
        super().__init__(_local_app("level1", task_always_eager=True, task_eager_propagates=True))

    def __call__(self, task: Any, *args: Any) -> Any:
        return self.app.tasks[task.name](*args)

    def many(self, task: Any, args_list: Sequence[tuple]) -> list[Any]:
        return [self(task, *args) for args in args_list]


class EagerRunner(Runner):
    """Level 2: ``task_always_eager`` — ``.delay()`` runs the task right here, in the caller."""

    level = 2

    def __init__(self) -> None:
        super().__init__(_local_app("level2", task_always_eager=True, task_eager_propagates=True))


class InProcessWorkerRunner(Runner):
    """Level 3: ``start_worker`` — a real consumer in a thread of this process, solo pool.

    Its broker and result backend are database ``LEVEL3_DB`` of ``redis_url``
    (a database of its own: the cluster's workers never see its messages).
    With Celery's in-memory transport instead, every round trip waits for a
    one-second poll and stopping the worker takes about four seconds.
    """

    level = 3

    def __init__(self, redis_url: str) -> None:
        url = f"{redis_url.rsplit('/', 1)[0]}/{LEVEL3_DB}"
        super().__init__(_local_app("level3", broker_url=url, result_backend=url))

    @contextlib.contextmanager
    def active(self) -> Iterator[Runner]:
        import celery.contrib.testing.tasks  # noqa: F401, PLC0415 - registers celery.ping for the ping check
        from celery.contrib.testing.worker import start_worker  # noqa: PLC0415

        with super().active(), start_worker(self.app, pool="solo", perform_ping_check=True):
            yield self


class ClusterRunner(Runner):
    """Levels 4–6: the real cluster's workers (prefork subprocesses) run the tasks.

    ``queue`` sends every call to one queue (a ramp step's worker).
    ``each`` reaches every worker through its ``worker_direct`` queue when
    the cluster has that setting on; otherwise it is one ordinary call.
    """

    def __init__(self, cluster: LocalCluster, level: int, queue: str | None = None) -> None:
        super().__init__(cluster.app)
        self.cluster = cluster
        self.level = level
        self.queue = queue

    def __call__(self, task: Any, *args: Any) -> Any:
        return self.many(task, [args])[0]

    def many(self, task: Any, args_list: Sequence[tuple]) -> list[Any]:
        t = self.app.tasks[task.name]
        options = {"queue": self.queue} if self.queue else {}
        results = [t.apply_async(args, **options) for args in args_list]
        return [r.get(timeout=self.timeout) for r in results]

    def each(self, task: Any, *args: Any) -> list[Any]:
        if not self.app.conf.worker_direct:
            return [self(task, *args)]
        from celery.utils.nodenames import worker_direct  # noqa: PLC0415

        t = self.app.tasks[task.name]
        results = [t.apply_async(args, queue=worker_direct(w.hostname)) for w in self.cluster.workers.values()]
        return [r.get(timeout=self.timeout) for r in results]


def local_runner(level: int, redis_url: str) -> Runner:
    """The runner for a level the test process runs itself (1, 2 or 3)."""
    if level == 3:
        return InProcessWorkerRunner(redis_url)
    return {1: CallRunner, 2: EagerRunner}[level]()


# ============================================================================ running the suite
class _Collector:
    """A pytest plugin object that keeps each test's outcome, and any error outside a test's body."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple, dict[str, Any]] = {}
        self.errors: list[str] = []

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when != "call":
            if report.failed:  # a fixture broke (a cluster that did not start): not a verdict on the code
                self.errors.append(f"{report.nodeid} ({report.when}): {report.longreprtext[-1500:]}")
            return
        name = report.nodeid.split("::")[-1]  # test_<bug>[buggy] or, in a ramp, test_<bug>[c4-buggy]
        if "[" not in name:
            return
        bug, params = name[len("test_"):].split("[", 1)
        parts = params.rstrip("]").split("-")
        variant = next(p for p in parts if p in CODE)
        step = next((int(p[1:]) for p in parts if p.startswith("c") and p[1:].isdigit()), 0)
        key = (bug, variant, step) if step else (bug, variant)
        entry = {"outcome": report.outcome, "why": "", "props": dict(report.user_properties)}
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            entry["why"] = (crash.message if crash else str(report.longrepr)).splitlines()[0][:160]
        self.outcomes[key] = entry


def run_suite(level: int, *, cluster_options: dict[str, Any] | None = None, redis_url: str = "",
              jobs: int = 8, margin: float = 30.0, ramp: Sequence[int] = (),
              extra: Sequence[str] = ()) -> tuple[dict, str]:
    """Run the seeded suite once, in this process, at ``level``; returns (outcomes, pytest's output).

    For levels 4–6, ``cluster_options`` become the plugin's ``labkit_cluster``
    ini setting; ``labkit_reuse`` lets the plugin use a cluster with the same
    options that this process already runs (the notebook's).
    """
    import pytest  # noqa: PLC0415

    args = [str(SUITE), "-c", str(SUITE / "pytest.ini"), "--rootdir", str(SUITE), "-q", "--color=no",
            "-p", "no:cacheprovider", "-p", "no:timeout", "-p", "no:nbval", "-p", "no:xdist",
            "--level", str(level), "--jobs", str(jobs), "--margin", str(margin),
            "-o", "labkit_reuse=true", "-o", "labkit_max_idle=0", *extra]
    if redis_url:
        args += ["--redis-url", redis_url]
    if cluster_options is not None:
        args += ["-o", f"labkit_cluster={cluster_options!r}"]
    if ramp:
        args += ["--ramp", ",".join(str(c) for c in ramp)]
    collector = _Collector()
    out = io.StringIO()
    caller_app = _current_app()  # a cluster the plugin starts makes its app current; give ours back
    try:
        with contextlib.redirect_stdout(out):
            code = pytest.main(args, plugins=[collector])
    finally:
        caller_app.set_current()
        caller_app.set_default()
    if code not in (0, 1) or collector.errors or len(collector.outcomes) != 2 * len(BUGS) * max(1, len(ramp)):
        details = "\n".join(collector.errors) or out.getvalue()[-3000:]
        raise RuntimeError(f"the seeded suite did not run at level {level} (pytest exit code {code}, "
                           f"{len(collector.outcomes)} test results):\n{details}")
    return collector.outcomes, out.getvalue()


def _verdicts(outcomes: dict) -> dict[str, str]:
    """caught (red on the bug, green on the fix), missed (green on both), false alarm (red on the fix)."""
    out = {}
    for bug in BUGS:
        buggy, fixed = outcomes[(bug, "buggy")]["outcome"], outcomes[(bug, "fixed")]["outcome"]
        out[bug] = "false alarm" if fixed != "passed" else ("caught" if buggy == "failed" else "missed")
    return out


def _level_measurement(level: int, outcomes: dict, outputs: list[str], **meta: Any) -> Measurement:
    verdicts = _verdicts(outcomes)
    return Measurement(f"L{level} {LEVELS[level]}", "bugs caught", "bugs",
                       [1 if verdicts[b] == "caught" else 0 for b in BUGS], stat="sum",
                       meta={"level": level, "bugs": list(BUGS), "verdicts": verdicts,
                             "why": {b: outcomes[(b, "buggy")]["why"] for b in BUGS},
                             "fixed_why": {b: outcomes[(b, "fixed")]["why"] for b in BUGS},
                             "props": {f"{b}[{v}]": outcomes[(b, v)]["props"] for b, v in outcomes},
                             "output": "\n".join(outputs), **meta})


def level(cluster: LocalCluster, n: int = 1, *, jobs: int = 8, skew: float = 60.0,
          steps: Sequence[int] = (1, 2, 4, 8)) -> Measurement:
    """Run the seeded suite at level ``n`` (both versions of the code); one value per bug: 1 = caught.

    Levels 1–3 run in this process (``cluster`` only lends its Redis to the
    fixed code); level 4 uses ``cluster`` itself through the plugin (its
    shape must be ``CLUSTER``); level 5 has the plugin start a cluster of
    two workers, one ``skew`` seconds ahead; level 6 runs the suite once
    per step of ``steps`` concurrent jobs (``meta["ramp"]``).
    """
    margin = skew / 2
    common = {"redis_url": cluster.redis_url, "jobs": jobs, "margin": margin}
    if n in (1, 2, 3):
        outcomes, output = run_suite(n, **common)
        return _level_measurement(n, outcomes, [output], jobs=jobs)
    if n == 4:
        outcomes, output = run_suite(4, cluster_options=CLUSTER, **common)
        return _level_measurement(4, outcomes, [output], jobs=jobs)
    if n == 5:
        outcomes, output = run_suite(5, cluster_options=level5_config(skew), **common)
        return _level_measurement(5, outcomes, [output], jobs=jobs, skew=skew)
    if n == 6:
        return ramp(cluster, steps=steps, jobs=jobs, margin=margin)
    raise ValueError(f"level must be one of {sorted(LEVELS)}, not {n!r}")


def ramp_worker(concurrency: int) -> str:
    """The name — and queue — of the ramp's worker that runs ``concurrency`` jobs at once."""
    return f"c{concurrency}"


def ramp_config(steps: Sequence[int] = (1, 2, 4, 8)) -> dict[str, Any]:
    """Level 6's cluster: one worker per step, with that many pool children, on a queue of its own."""
    return {"workers": [{"name": ramp_worker(c), "queues": [ramp_worker(c)], "concurrency": c}
                        for c in sorted(set(steps))], "zookeeper": 0}


def ramp(cluster: LocalCluster, *, steps: Sequence[int] = (1, 2, 4, 8), jobs: int = 8,
         margin: float = 30.0) -> Measurement:
    """Level 6: the suite once per step of concurrent jobs; a bug is caught if any step catches it.

    The plugin starts one worker per step (``ramp_config``: ``c1`` runs one
    job at a time, ``c8`` eight), all at once; each step of the suite sends
    its tasks to its worker's queue. ``meta["ramp"]`` holds, per step, the
    verdicts and the damage the tests recorded: ``corrupted`` reports (the
    shared temp file) and ``extra_emails`` (module state).
    """
    if not steps or any(c < 1 for c in steps) or jobs < max(steps):
        raise ValueError(f"steps must be positive concurrencies no larger than jobs={jobs}: {steps!r}")
    order = sorted(set(steps))
    outcomes, output = run_suite(6, cluster_options=ramp_config(order), redis_url=cluster.redis_url,
                                 jobs=jobs, margin=margin, ramp=order)
    per_step: dict[int, dict[str, Any]] = {}
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for c in order:
        mine = {(bug, variant): entry for (bug, variant, step), entry in outcomes.items() if step == c}
        props = {key: entry["props"] for key, entry in mine.items()}
        per_step[c] = {"verdicts": _verdicts(mine),
                       "corrupted": props[("shared_temp_file", "buggy")].get("corrupted", 0),
                       "extra_emails": props[("module_state", "buggy")].get("extra_emails", 0),
                       "fixed_corrupted": props[("shared_temp_file", "fixed")].get("corrupted", 0),
                       "fixed_extra_emails": props[("module_state", "fixed")].get("extra_emails", 0)}
        for key, entry in mine.items():  # a step that catches a bug catches it for the level
            if key not in merged or entry["outcome"] != "passed":
                merged[key] = entry
    return _level_measurement(6, merged, [output], jobs=jobs, steps=order, ramp=per_step)


def matrix(cluster: LocalCluster, *, jobs: int = 8, skew: float = 60.0,
           steps: Sequence[int] = (1, 2, 4, 8)) -> dict[int, Measurement]:
    """Every level, in order: ``{level: Measurement}``."""
    return {n: level(cluster, n, jobs=jobs, skew=skew, steps=steps) for n in LEVELS}


def ladder(levels: dict[int, Measurement], upto: int) -> Measurement:
    """Bugs caught by *some* level up to ``upto``: what a team testing that far would know about."""
    picked = [levels[n] for n in sorted(levels) if n <= upto]
    caught = [int(any(m.values[i] for m in picked)) for i in range(len(BUGS))]
    alarms = sorted(f"{b} at L{m.meta['level']}: {m.meta['fixed_why'][b]}" for m in picked
                    for b, v in m.meta["verdicts"].items() if v == "false alarm")
    return Measurement(f"levels 1–{upto}", "bugs caught", "bugs", caught, stat="sum",
                       meta={"bugs": list(BUGS), "levels": [m.meta["level"] for m in picked],
                             "false_alarms": alarms})


def versus_unit_tests(levels: dict[int, Measurement], *, before: int = 2) -> Comparison:
    """The usual unit tests (levels 1–``before``) against the whole ladder."""
    return Comparison(ladder(levels, before), ladder(levels, max(levels)), better="higher",
                      title="seeded bugs caught")


def eager_versus_worker(levels: dict[int, Measurement]) -> Comparison:
    """Eager mode (level 2) against one real prefork worker (level 4)."""
    return Comparison(levels[2], levels[4], better="higher", title="eager mode vs a real worker")


# ============================================================================ claims
@claim("the whole ladder catches every seeded bug, with no false alarm; levels 1–2 alone do not")
def ladder_catches_every_bug(comparison: Comparison) -> None:
    everything = len(comparison.after.meta["bugs"])
    verify("no level failed the fixed code", not comparison.after.meta["false_alarms"],
           false_alarms=comparison.after.meta["false_alarms"])
    comparison.check(after_at_most=everything, before_at_least=0)
    verify(f"all {everything} bugs caught by some level", comparison.after.value == everything,
           caught=comparison.after.value, bugs=everything, levels=comparison.after.meta["levels"])
    verify("levels 1–2 miss at least one bug", comparison.before.value < everything,
           caught_by_unit_tests=comparison.before.value)


@claim("eager mode passes code that a real prefork worker fails: a soft time limit, a non-JSON result")
def eager_passes_what_a_worker_fails(comparison: Comparison) -> None:
    bugs = comparison.after.meta["bugs"]
    eager, worker = comparison.before, comparison.after
    lies = [b for i, b in enumerate(bugs) if worker.values[i] and not eager.values[i]]
    verify("the real worker catches the soft time limit and the non-JSON result; eager mode misses both",
           {"soft_time_limit", "json_result"} <= set(lies), missed_by_eager_caught_by_worker=lies)


@claim("a race on a shared temp file never shows one job at a time, and shows once jobs run concurrently")
def ramp_exposes_the_race(ramp: Measurement) -> None:
    steps = ramp.meta["ramp"]
    verify("one job at a time never corrupts a report", 1 not in steps or steps[1]["corrupted"] == 0,
           corrupted_at_1=steps.get(1, {}).get("corrupted"))
    worst = max(s["corrupted"] for s in steps.values())
    verify("some concurrency corrupts reports", worst >= 1,
           corrupted={c: s["corrupted"] for c, s in steps.items()})
    verify("the fixed code never corrupts", all(s["fixed_corrupted"] == 0 for s in steps.values()),
           fixed={c: s["fixed_corrupted"] for c, s in steps.items()})


def json_round_trip(values: Sequence[Any]) -> Table:
    """What each value becomes after the JSON round trip eager mode (and every real broker) applies.

    Uses kombu's ``json`` serializer — the one Celery uses — in this process:
    no cluster needed.
    """
    from kombu.exceptions import EncodeError  # noqa: PLC0415
    from kombu.serialization import dumps, loads  # noqa: PLC0415

    rows = []
    for value in values:
        try:
            ctype, enc, data = dumps(value, serializer="json")
            back: Any = loads(data, ctype, enc)
            outcome = "same" if back == value and type(back) is type(value) else "changed"
            shown = repr(back)
        except EncodeError as exc:
            outcome, shown = "refused", str(exc)[:60]
        rows.append([repr(value), type(value).__name__, shown, outcome])
    return Table(["sent", "type", "received", "round trip"], rows, title="kombu's JSON serializer, both ways")


# ============================================================================ tables and plots
def matrix_table(levels: dict[int, Measurement]) -> Table:
    """Rows: bugs; columns: levels; cells: caught / missed / false alarm."""
    ms = [levels[n] for n in sorted(levels)]
    mark = {"caught": "caught", "missed": "·", "false alarm": "FALSE ALARM"}
    rows = [[BUGS[b], *[mark[m.meta["verdicts"][b]] for m in ms]] for b in BUGS]
    rows.append(["bugs caught", *[int(m.value) for m in ms]])
    return Table(["seeded bug", *[f"L{m.meta['level']}" for m in ms]], rows,
                 title="which level catches which bug (red on the bug, green on the fix)",
                 note="; ".join(f"L{n} {LEVELS[n]}" for n in sorted(levels)))


def why_table(levels: dict[int, Measurement]) -> Table:
    """What each level's test said about the buggy code (the first line of the failure)."""
    rows = []
    for b in BUGS:
        for n in sorted(levels):
            m = levels[n]
            if m.meta["verdicts"][b] == "caught":
                rows.append([BUGS[b], f"L{n}", m.meta["why"][b]])
                break
    return Table(["seeded bug", "first caught at", "what the test saw"], rows,
                 title="how each bug shows itself, at the first level that catches it")


def ramp_table(ramp: Measurement) -> Table:
    """Per step of concurrent jobs: corrupted reports and extra e-mails (buggy code; the fixed code's in brackets)."""
    rows = [[c, s["corrupted"], s["fixed_corrupted"], s["extra_emails"], s["fixed_extra_emails"],
             sum(v == "caught" for v in s["verdicts"].values())]
            for c, s in sorted(ramp.meta["ramp"].items())]
    return Table(["concurrent jobs", "corrupted reports", "(fixed)", "extra e-mails", "(fixed)", "bugs caught"],
                 rows, title=f"ramp up: {ramp.meta['jobs']} jobs sent at once to a worker running "
                             f"{', '.join(map(str, ramp.meta['steps']))} of them at a time")


def plot_matrix(levels: dict[int, Measurement], ax=None):
    """The matrix as a heatmap: the kit's after-colour where a level catches a bug, before-colour for a false alarm."""
    from matplotlib.colors import ListedColormap  # noqa: PLC0415

    from labkit.plots import AFTER, BEFORE, axis, style  # noqa: PLC0415

    ax = axis(ax)
    ms = [levels[n] for n in sorted(levels)]
    code = {"missed": 0, "caught": 1, "false alarm": 2}
    grid = [[code[m.meta["verdicts"][b]] for m in ms] for b in BUGS]
    ax.imshow(grid, cmap=ListedColormap(["#eeeeee", AFTER, BEFORE]), vmin=0, vmax=2, aspect="auto")
    for i, b in enumerate(BUGS):
        for j, m in enumerate(ms):
            v = m.meta["verdicts"][b]
            ax.text(j, i, "✓" if v == "caught" else ("!" if v == "false alarm" else ""), ha="center",
                    va="center", color="white", fontsize=12)
    ax.set_xticks(range(len(ms)), [f"L{m.meta['level']}\n{LEVELS[m.meta['level']]}" for m in ms], fontsize=8)
    ax.set_yticks(range(len(BUGS)), list(BUGS.values()), fontsize=9)
    style(ax, "which level catches which seeded bug (✓ = red on the bug, green on the fix)")
    ax.grid(False)
    ax.figure.set_size_inches(10, 4)
    return ax


def plot_ramp(ramp: Measurement, ax=None):
    """Damage per step of concurrent jobs: corrupted reports and extra e-mails."""
    from labkit.plots import BEFORE, NEUTRAL, axis, style  # noqa: PLC0415

    ax = axis(ax)
    steps = sorted(ramp.meta["ramp"])
    data = ramp.meta["ramp"]
    ax.plot(steps, [data[c]["corrupted"] for c in steps], "o-", color=BEFORE, label="corrupted reports")
    ax.plot(steps, [data[c]["extra_emails"] for c in steps], "s--", color=NEUTRAL[2], label="extra e-mails")
    ax.plot(steps, [data[c]["fixed_corrupted"] + data[c]["fixed_extra_emails"] for c in steps], "^:",
            color="grey", label="fixed code (both)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(c) for c in steps])
    ax.legend(frameon=False, fontsize=9)
    return style(ax, f"ramp up: {ramp.meta['jobs']} jobs at once", "count", "concurrent jobs (worker concurrency)")

