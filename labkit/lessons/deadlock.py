"""Lesson 15: the Friday deadlock — tasks that wait for tasks, and locks that wait for themselves.

The talk ends with "I got careless and introduced a deadlock Friday". The
two ways a Celery deployment deadlocks, measured on a real prefork worker:

* **A task waits for a subtask's result.** The subtask needs a pool slot;
  if every slot holds a parent that waits, nothing runs until the parents
  time out. Celery refuses by default (``result.get()`` inside a task raises
  ``RuntimeError``); ``disable_sync_subtasks=False`` turns the guard off.
  The fix is to not wait: a chain, a chord or a callback (``link``) runs the
  rest of the workflow when the subtask is done, and no slot is held.
* **A lock waits for its own holder.** kazoo's ``Lock`` is not re-entrant: a
  helper that takes the lock its caller already holds queues behind its own
  caller. Held while waiting for a subtask that needs the same lock, it
  deadlocks across processes even with free pool slots.

Every wait here has a timeout, so the deadlock shows as a measured time and a
count of completions instead of a hung notebook.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import chain, chord, shared_task

from labkit.app import redis_client, zk_client
from labkit.measure import Comparison, Measurement, claim, verify
from labkit.poll import poll_until

if TYPE_CHECKING:  # pragma: no cover - workers import this module and do not need it
    from labkit.client import ClusterLike

NOTEBOOK = "15_deadlock.ipynb"
POOL = 2  # the worker's prefork pool size: how many tasks run at once
CLUSTER: dict[str, Any] = {"workers": [{"name": "w1", "concurrency": POOL}], "zookeeper": 1}
WORKSHOP = {"PARENTS": [1, 2, 3, 4], "SUBTASK_S": 0.5, "TIMEOUT_S": 4.0}
FORMS = ("chain", "callback", "chord")
GUARD_MESSAGE = "Never call result.get() within a task!"


# ----------------------------------------------------------------------------- tasks
@shared_task(name="deadlock.fetch")
def fetch(x: int, seconds: float, run: str = "") -> int:
    """The subtask: some I/O that takes ``seconds``; counts itself done in Redis."""
    time.sleep(seconds)
    if run:
        redis_client().incr(f"{run}:fetched")
    return 2 * x


@shared_task(name="deadlock.report")
def report(x: int, seconds: float, timeout: float, guard: bool = True, run: str = "") -> int:
    """The pitfall: start the subtask, then wait for its result in this pool slot."""
    subtask = fetch.delay(x, seconds, run)
    value = subtask.get(timeout=timeout, disable_sync_subtasks=guard)  # guard=True is Celery's default
    return value + 1


@shared_task(name="deadlock.finish")
def finish(value: int) -> int:
    """The rest of the workflow, as a callback: it runs when the subtask's result exists."""
    return value + 1


@shared_task(name="deadlock.total")
def total(values: list[int]) -> int:
    """A chord's body: runs once every subtask in the header is done."""
    return sum(values) + 1


def _lock(path: str, timeout: float):
    from kazoo.exceptions import LockTimeout  # noqa: PLC0415

    lock = zk_client().Lock(path)
    try:
        lock.acquire(timeout=timeout)
    except LockTimeout:
        raise LockTimeout(f"gave up on {path} after {timeout} s: somebody holds it") from None
    return lock


def update_totals(path: str, timeout: float, held: Any = None) -> str:
    """A helper that needs the lock. Given ``held`` (the caller's lock) it does not take it again."""
    if held is not None and held.is_acquired:
        return "updated under the caller's lock"
    lock = _lock(path, timeout)  # a second Lock on the same path: queues behind the first one
    try:
        return "updated under its own lock"
    finally:
        lock.release()


@shared_task(name="deadlock.locked_job")
def locked_job(path: str, timeout: float, pass_lock: bool) -> str:
    """Take the lock, then call a helper that needs it: re-entrancy, or not."""
    lock = _lock(path, timeout)
    try:
        return update_totals(path, timeout, held=lock if pass_lock else None)
    finally:
        lock.release()


@shared_task(name="deadlock.locked_fetch")
def locked_fetch(path: str, timeout: float, seconds: float) -> str:
    """A subtask that needs the same lock as its parent."""
    lock = _lock(path, timeout)
    try:
        time.sleep(seconds)
        return "fetched under the lock"
    finally:
        lock.release()


@shared_task(name="deadlock.hold_and_wait")
def hold_and_wait(path: str, timeout: float, seconds: float) -> str:
    """The distributed Friday: hold the lock while waiting for a subtask that needs it."""
    lock = _lock(path, timeout)
    try:
        sub = locked_fetch.delay(path, timeout, seconds)
        return sub.get(timeout=2 * timeout, disable_sync_subtasks=False)
    finally:
        lock.release()


@shared_task(name="deadlock.prepare_locked")
def prepare_locked(path: str, timeout: float) -> str:
    """The fix: do the locked part, release, and let a chain start the subtask."""
    lock = _lock(path, timeout)
    lock.release()
    return path


# ----------------------------------------------------------------------------- measuring
def _outcomes(results: list, sent: float, wait: float) -> tuple[list[float], list[str], list[str]]:
    """Seconds from ``sent`` until each result was ready, and its outcome (``ok`` or the exception)."""
    done: dict[int, float] = {}

    def all_ready() -> bool:
        now = time.perf_counter() - sent
        for i, r in enumerate(results):
            if i not in done and r.ready():
                done[i] = now
        return len(done) == len(results)

    poll_until(all_ready, wait, 0.02)
    seconds, outcomes, messages = [], [], []
    for i, r in enumerate(results):
        seconds.append(done.get(i, wait))
        if i not in done:
            outcomes.append("never finished")
            messages.append("")
        elif r.successful():
            outcomes.append("ok")
            messages.append("")
        else:
            outcomes.append(type(r.result).__name__)
            messages.append(str(r.result))
    return seconds, outcomes, messages


def _measure(label: str, results: list, sent: float, wait: float, **meta: Any) -> Measurement:
    seconds, outcomes, messages = _outcomes(results, sent, wait)
    meta.update(n=len(results), completed=outcomes.count("ok"), outcomes=outcomes, messages=messages)
    return Measurement(label, "time until the workflow's result", "s", seconds, stat="max", meta=meta)


def _drain(cluster: ClusterLike, run: str, expected: int, wait: float) -> None:
    """Wait until every subtask of ``run`` has run, so the next experiment starts on an idle pool."""
    r = cluster.redis_client()
    try:
        poll_until(lambda: int(r.get(f"{run}:fetched") or 0) >= expected, wait, 0.05)
        r.delete(f"{run}:fetched")
    finally:
        r.close()


def guarded(cluster: ClusterLike, *, subtask_s: float = 0.3, timeout_s: float = 3.0,
            guard: bool = True) -> Measurement:
    """One parent calls ``result.get()`` on its subtask with Celery's guard on (or off)."""
    run = f"dl:{uuid.uuid4().hex[:8]}"
    sent = time.perf_counter()
    res = cluster.task(report).delay(1, subtask_s, timeout_s, guard, run)
    label = "guard on (default)" if guard else "guard off: disable_sync_subtasks=False"
    m = _measure(label, [res], sent, timeout_s + 10, guard=guard, timeout=timeout_s)
    _drain(cluster, run, 1, timeout_s + 10)
    return m


def _queued_together(cluster: ClusterLike, send: Callable[[], list]) -> list:
    """Run ``send()`` while the cluster's workers are paused, so all its messages queue before any starts.

    "Sent at once" must mean queued ahead of every subtask: a kernel
    descheduled between two publishes (a loaded laptop, a CI machine) lets
    the first parent start and queue its subtask ahead of the second parent;
    the subtask then finds a free slot and the deadlock never forms. Pausing
    (SIGSTOP) the workers while publishing removes that race; an attached
    cluster, whose workers the kernel cannot pause, is published to as is.
    """
    workers = [name for name, w in getattr(cluster, "workers", {}).items() if w.alive()]
    for name in workers:
        cluster.pause(name)  # type: ignore[attr-defined]
    try:
        return send()
    finally:
        for name in workers:
            cluster.resume(name)  # type: ignore[attr-defined]


def before(cluster: ClusterLike, *, parents: int = POOL, subtask_s: float = 0.3, timeout_s: float = 3.0,
           pool: int = POOL, snapshot: bool = False) -> Measurement:
    """``parents`` tasks each wait (guard off) for their subtask; the pool has ``pool`` slots.

    With ``snapshot=True`` it also asks the worker what it is running while
    the parents wait (``inspect().active()``), as you would when you find it.
    """
    run = f"dl:{uuid.uuid4().hex[:8]}"
    sent = time.perf_counter()
    results = _queued_together(cluster, lambda: [cluster.task(report).delay(i, subtask_s, timeout_s, False, run)
                                                  for i in range(parents)])
    active: dict[str, list[str]] = {}
    if snapshot:
        time.sleep(min(1.0, timeout_s / 3))  # let the parents take their slots
        replies = cluster.app.control.inspect(timeout=1.0).active() or {}
        active = {host.split("@")[0]: [t["name"] for t in tasks] for host, tasks in replies.items()}
    wait = (parents // pool + 1) * timeout_s + parents * subtask_s + 10
    m = _measure(f"before: {parents} parent(s) wait, {pool} slot(s)", results, sent, wait,
                 parents=parents, pool=pool, timeout=timeout_s, subtask_s=subtask_s, active=active)
    _drain(cluster, run, parents, parents * subtask_s + timeout_s + 10)
    return m


def sweep(cluster: ClusterLike, *, parents: tuple[int, ...] | list[int] = (1, 2, 3), subtask_s: float = 0.3,
          timeout_s: float = 3.0, pool: int = POOL) -> list[Measurement]:
    """:func:`before` for each number of parents: what happens as they outgrow the pool.

    The run with exactly ``pool`` parents also records ``inspect().active()``.
    """
    return [before(cluster, parents=p, subtask_s=subtask_s, timeout_s=timeout_s, pool=pool, snapshot=p == pool)
            for p in parents]


def _send_after(cluster: ClusterLike, form: str, i: int, subtask_s: float, run: str):
    if form == "chain":
        return chain(cluster.task(fetch).s(i, subtask_s, run), cluster.task(finish).s()).apply_async()
    if form == "callback":
        callback = cluster.task(finish).s().set(task_id=uuid.uuid4().hex)
        cluster.task(fetch).apply_async((i, subtask_s, run), link=callback)
        return cluster.app.AsyncResult(callback.id)
    if form == "chord":
        return chord([cluster.task(fetch).s(i, subtask_s, run)], cluster.task(total).s()).apply_async()
    raise ValueError(f"form must be one of {FORMS}, not {form!r}")


def after(cluster: ClusterLike, *, parents: int = POOL, subtask_s: float = 0.3, timeout_s: float = 3.0,
          pool: int = POOL, form: str = "chain") -> Measurement:
    """The same ``parents`` workflows, with the rest of each as a chain / callback / chord: nobody waits."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    run = f"dl:{uuid.uuid4().hex[:8]}"
    sent = time.perf_counter()
    results = [_send_after(cluster, form, i, subtask_s, run) for i in range(parents)]
    m = _measure(f"after: {form}", results, sent, 2 * timeout_s + 10, parents=parents, pool=pool,
                 timeout=timeout_s, subtask_s=subtask_s, form=form)
    _drain(cluster, run, parents, 10)
    return m


def compare(cluster: ClusterLike, *, parents: int = POOL, subtask_s: float = 0.3, timeout_s: float = 3.0,
            pool: int = POOL, form: str = "chain") -> Comparison:
    """Waiting parents vs the same workflow as ``form``."""
    kw = {"parents": parents, "subtask_s": subtask_s, "timeout_s": timeout_s, "pool": pool}
    return Comparison(before(cluster, **kw), after(cluster, form=form, **kw), better="lower",
                      title="time until every workflow's result")


def lock_reentry(cluster: ClusterLike, *, tasks: int = POOL, lock_timeout_s: float = 1.5,
                 pass_lock: bool = False) -> Measurement:
    """``tasks`` jobs each take a lock, then call a helper that takes the same lock (or is handed it)."""
    sent = time.perf_counter()
    base = f"/labkit/deadlock/{uuid.uuid4().hex[:8]}"
    results = [cluster.task(locked_job).delay(f"{base}/{i}", lock_timeout_s, pass_lock) for i in range(tasks)]
    label = "after: pass the held lock down" if pass_lock else "before: the helper takes the lock again"
    return _measure(label, results, sent, 2 * lock_timeout_s + 10, n_tasks=tasks, timeout=lock_timeout_s)


def lock_and_wait(cluster: ClusterLike, *, lock_timeout_s: float = 1.5, subtask_s: float = 0.3,
                  fixed: bool = False) -> Measurement:
    """One job holds a lock while it waits for a subtask that needs that lock (or releases, then chains)."""
    path = f"/labkit/deadlock/{uuid.uuid4().hex[:8]}"
    sent = time.perf_counter()
    if fixed:
        res = chain(cluster.task(prepare_locked).s(path, lock_timeout_s),
                    cluster.task(locked_fetch).s(lock_timeout_s, subtask_s)).apply_async()
        label = "after: release, then chain the subtask"
    else:
        res = cluster.task(hold_and_wait).delay(path, lock_timeout_s, subtask_s)
        label = "before: hold the lock, wait for the subtask"
    return _measure(label, [res], sent, 3 * lock_timeout_s + 10, timeout=lock_timeout_s, subtask_s=subtask_s)


def compare_locks(cluster: ClusterLike, *, tasks: int = POOL, lock_timeout_s: float = 1.5,
                  subtask_s: float = 0.3) -> dict[str, Comparison]:
    """Both lock pitfalls next to their fixes."""
    return {
        "reentry": Comparison(lock_reentry(cluster, tasks=tasks, lock_timeout_s=lock_timeout_s),
                              lock_reentry(cluster, tasks=tasks, lock_timeout_s=lock_timeout_s, pass_lock=True),
                              better="lower", title="a helper that takes its caller's lock"),
        "wait": Comparison(lock_and_wait(cluster, lock_timeout_s=lock_timeout_s, subtask_s=subtask_s),
                           lock_and_wait(cluster, lock_timeout_s=lock_timeout_s, subtask_s=subtask_s, fixed=True),
                           better="lower", title="a lock held while waiting for a subtask that needs it"),
    }


# ----------------------------------------------------------------------------- claims
@claim("Celery refuses result.get() inside a task with a RuntimeError that says why")
def guard_refuses(m: Measurement) -> None:
    refused = [msg for out, msg in zip(m.meta["outcomes"], m.meta["messages"], strict=True)
               if out == "RuntimeError" and GUARD_MESSAGE in msg]
    verify("the parent failed with Celery's guard RuntimeError", bool(refused),
           outcomes=m.meta["outcomes"], messages=m.meta["messages"])


@claim("the fixed workflow completes every run, before the pitfall's own timeout, where the pitfall "
       "completed at most the runs beyond what the slots (or the lock) could hold")
def fix_completes(comparison: Comparison) -> None:
    b, a = comparison.before, comparison.after
    stuck = min(b.meta.get("pool", b.n), b.n)  # parents that hold every slot, or every lock holder
    timeout = b.meta["timeout"]
    verify("the fix completes every run", a.meta["completed"] == a.n, completed=a.meta["completed"], n=a.n,
           outcomes=a.meta["outcomes"])
    verify("the fix needs less time than the pitfall's timeout", a.value < timeout,
           after_s=a.value, timeout=timeout)
    verify("the pitfall held every slot: at most the runs beyond them completed",
           b.meta["completed"] <= max(0, b.n - stuck), completed=b.meta["completed"], n=b.n, stuck=stuck)
    verify("the pitfall's slowest run waited out its timeout", b.value >= 0.9 * timeout,
           before_s=b.value, timeout=timeout)


# ----------------------------------------------------------------------------- tables and plots
def table(measurements: list[Measurement]):
    """One row per run: completions, slowest time, what the runs ended with."""
    from labkit.table import Table  # noqa: PLC0415

    rows = []
    for m in measurements:
        kinds = sorted(set(m.meta["outcomes"]))
        rows.append([m.label, f"{m.meta['completed']}/{m.n}", m.value,
                     ", ".join(f"{m.meta['outcomes'].count(k)}× {k}" for k in kinds)])
    return Table(["run", "completed", "slowest [s]", "outcomes"], rows)


def plot_sweep(runs: list[Measurement], fixed: list[Measurement] | None = None):
    """Completions and slowest time against the number of parents, pool size marked."""
    from labkit.plots import AFTER, BEFORE, panels, style  # noqa: PLC0415

    fig, (ax1, ax2) = panels(2, width=4.8)
    xs = [m.meta["parents"] for m in runs]
    pool, timeout = runs[0].meta["pool"], runs[0].meta["timeout"]
    ax1.plot(xs, [m.meta["completed"] for m in runs], "o-", color=BEFORE, label="parents wait")
    ax1.plot(xs, xs, ":", color="grey", label="all of them")
    ax2.plot(xs, [m.value for m in runs], "o-", color=BEFORE, label="parents wait")
    if fixed:
        fx = [m.meta["parents"] for m in fixed]
        ax1.plot(fx, [m.meta["completed"] for m in fixed], "s--", color=AFTER, label=fixed[0].label)
        ax2.plot(fx, [m.value for m in fixed], "s--", color=AFTER, label=fixed[0].label)
    for ax in (ax1, ax2):
        ax.axvline(pool, ls="--", color="grey", lw=1)
        ax.annotate(f" pool = {pool}", (pool, ax.get_ylim()[1] * 0.9), fontsize=8, color="grey")
        ax.legend(frameon=False, fontsize=8)
    ax2.axhline(timeout, ls=":", color=BEFORE, lw=1)
    style(ax1, "workflows completed", "completed", "parents sent at once")
    style(ax2, "time until the last result", "seconds", "parents sent at once")
    return fig


def find_it(m: Measurement, logs: str) -> None:
    """Print what ``inspect().active()`` showed during the run, and the worker's log lines about it."""
    for worker, names in m.meta.get("active", {}).items():
        print(f"{worker}: {len(names)} active task(s): {names}")
    keep = [line for line in logs.splitlines() if "deadlock." in line or "TimeoutError" in line]
    print("\n".join(keep[-8:]))
