"""Lesson 08: race conditions — overlapping producers, a shared temp file, redelivery.

Three races from the same import pipeline, each run on real workers and
counted by the real system:

* **Two producers, one inbox.** Two overlapping runs of a scheduled producer
  list the same directory and both enqueue every file. Each import bumps a
  Redis counter per file (``INCR``), so a duplicate import is a counter above 1.
  Fix: the producer *claims* each file atomically (Redis ``SET NX EX``: exactly
  one caller wins) and the consumer is idempotent (an atomic "apply once"
  script), so even a file enqueued twice is applied once.
* **One fixed temp file.** Concurrent report builds copy their data to the same
  ``data.xml`` in the worker's local directory and run an XSLT stylesheet over
  it; one build reads the other's data (or half of it). Every published report
  is checked afterwards: wrong report id, wrong rows or unreadable = corrupted.
  Fix: a temp file per task (``mkstemp``) and an atomic publish (``os.replace``).
* **At-least-once delivery.** A broker may deliver the same message twice (a
  worker died before acknowledging it, or a producer published it twice). Only
  an idempotent consumer turns "delivered twice" into "applied once".

Every experiment takes ``cluster`` first and returns
:class:`~labkit.measure.Measurement` objects; the notebook and the tests call
the same functions.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from celery import shared_task

from labkit.app import local_dir, redis_client, worker_name
from labkit.measure import Comparison, Measurement

# --------------------------------------------------------------------------- the data

STYLESHEET = b"""<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:template match="/report">
    <html><body>
      <h1 data-report="{@id}">Report <xsl:value-of select="@id"/></h1>
      <table><xsl:for-each select="row">
        <tr><td><xsl:value-of select="@n"/></td><td><xsl:value-of select="."/></td></tr>
      </xsl:for-each></table>
    </body></html>
  </xsl:template>
</xsl:stylesheet>"""


def report_xml(report_id: int, rows: int = 1000) -> bytes:
    """The deterministic "database export" for one report: every row names its report."""
    body = "".join(f'<row n="{k}">{report_id}-{k}</row>' for k in range(rows))
    return f'<?xml version="1.0"?>\n<report id="{report_id}">{body}</report>\n'.encode()


def inbox_file(i: int, records: int = 20) -> bytes:
    """One small delivery file for the import pipeline."""
    body = "".join(f"<sale n='{k}'>{i * 1000 + k}</sale>" for k in range(records))
    return f"<?xml version='1.0'?><sales file='{i}'>{body}</sales>".encode()


def _new_run(cluster, kind: str) -> tuple[str, Path]:
    """A fresh run id and a directory for it in the cluster's shared run directory."""
    run = f"races:{kind}:{uuid.uuid4().hex[:8]}"
    base = Path(cluster.run_dir) / "shared" / run.replace(":", "-")
    base.mkdir(parents=True, exist_ok=True)
    return run, base


# --------------------------------------------------------------------------- race 1: producers


@shared_task(name="races.produce_naive")
def produce_naive(inbox: str, run: str) -> list[str]:
    """The talk's producer: list the inbox and enqueue every file found there (by value)."""
    ids = []
    for file_name in sorted(os.listdir(inbox)):
        try:
            data = (Path(inbox) / file_name).read_text()
        except FileNotFoundError:  # imported and cleaned up since we listed it
            continue
        ids.append(import_naive.delay(inbox, file_name, data, run).id)
    return ids


@shared_task(name="races.import_naive")
def import_naive(inbox: str, file_name: str, data: str, run: str) -> str:
    """Load the file's records row by row, then delete it (``clean=True``). Not idempotent."""
    r = redis_client()
    r.incr(f"{run}:imports:{file_name}")  # the "database" counts every import of this file
    for record in _records(data):
        r.hset(f"{run}:sales", record, file_name)  # one INSERT per row, as a plain loader does
        r.incr(f"{run}:rows")
    (Path(inbox) / file_name).unlink(missing_ok=True)
    return "imported"


@shared_task(name="races.produce_claiming")
def produce_claiming(inbox: str, run: str, ttl: int = 600) -> list[str]:
    """List the inbox, but enqueue a file only if this run wins its claim (SET NX EX)."""
    r = redis_client()
    me = f"{worker_name()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    ids = []
    for file_name in sorted(os.listdir(inbox)):
        # exactly one SET NX succeeds per key; the expiry frees the claim if this producer dies
        if not r.set(f"{run}:claim:{file_name}", me, nx=True, ex=ttl):
            continue
        try:
            data = (Path(inbox) / file_name).read_text()
        except FileNotFoundError:
            continue
        ids.append(import_idempotent.delay(inbox, file_name, data, run).id)
    return ids


# Apply the import's effect and remember that it was applied, in one atomic step
# (a Lua script runs alone inside Redis): either both happen or neither, so a
# second delivery of the same file finds the marker and changes nothing.
# KEYS: done marker, import counter, row counter, table; ARGV: row count, then field/value pairs.
APPLY_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX') then
  redis.call('INCR', KEYS[2])
  redis.call('INCRBY', KEYS[3], ARGV[1])
  if #ARGV > 1 then redis.call('HSET', KEYS[4], unpack(ARGV, 2)) end
  return 1
end
return 0
"""


@shared_task(name="races.import_idempotent")
def import_idempotent(inbox: str, file_name: str, data: str, run: str) -> str:
    """Import a file at most once per run, however many times the message arrives."""
    r = redis_client()
    records = _records(data)
    rows = {record: file_name for record in records}
    applied = r.eval(APPLY_ONCE, 4, f"{run}:done:{file_name}", f"{run}:imports:{file_name}",
                     f"{run}:rows", f"{run}:sales", len(records), *[x for kv in rows.items() for x in kv])
    (Path(inbox) / file_name).unlink(missing_ok=True)
    return "imported" if applied else "already imported"


def _records(data: str) -> list[str]:
    from xml.etree import ElementTree as ET  # noqa: PLC0415

    return [el.text or "" for el in ET.fromstring(data)]


def _import_counts(cluster, run: str, names: list[str]) -> tuple[list[int], int]:
    r = cluster.redis_client()
    try:
        counts = [int(c or 0) for c in r.mget([f"{run}:imports:{n}" for n in names])]
        rows = int(r.get(f"{run}:rows") or 0)
    finally:
        r.close()
    return counts, rows


def producers(cluster, n: int = 100, *, claim: bool = False, producers: int = 2,
              records: int = 20, timeout: float = 60) -> Measurement:
    """Run ``producers`` overlapping producer runs over one inbox of ``n`` files.

    Returns duplicate imports per file (``sum`` = total duplicates). ``meta``
    holds the raw counts: messages enqueued, files never imported, rows inserted.
    """
    run, base = _new_run(cluster, "dup")
    inbox = base / "inbox"
    inbox.mkdir()
    names = [f"sales-{i:04d}.xml" for i in range(n)]
    for i, name in enumerate(names):
        (inbox / name).write_bytes(inbox_file(i, records))
    task = cluster.task(produce_claiming if claim else produce_naive)
    # the scheduler fires twice while the first run is still going: both runs are in flight
    runs = [task.delay(str(inbox), run) for _ in range(producers)]
    import_ids = [tid for res in runs for tid in res.get(timeout=timeout)]
    for tid in import_ids:
        cluster.app.AsyncResult(tid).get(timeout=timeout, propagate=False)
    counts, rows = _import_counts(cluster, run, names)
    duplicates = [max(0, c - 1) for c in counts]
    label = "fix: claim + idempotent" if claim else "naive: list and enqueue"
    return Measurement(
        label, "duplicate imports", "imports", duplicates, stat="sum",
        meta={"files": n, "producers": producers, "enqueued": len(import_ids),
              "imported_once_or_more": sum(c > 0 for c in counts), "never_imported": sum(c == 0 for c in counts),
              "rows_inserted": rows, "rows_expected": n * records},
    )


# --------------------------------------------------------------------------- race 2: data.xml


@shared_task(name="races.build_report_naive")
def build_report_naive(report_path: str, report_id: int, out_dir: str) -> str:
    """The talk's build(): copy the export to a fixed ``data.xml``, transform it, write the output."""
    work = local_dir()
    shutil.copy(report_path, work / "data.xml")
    html = apply_stylesheet(work / "data.xml")  # ... unless another task replaced data.xml meanwhile
    (Path(out_dir) / f"report-{report_id}.html").write_bytes(html)
    return worker_name()


@shared_task(name="races.build_report_safe")
def build_report_safe(report_path: str, report_id: int, out_dir: str) -> str:
    """The same build with a temp file per task and an atomic publish of the output."""
    work = local_dir()
    fd, tmp = tempfile.mkstemp(prefix=f"data-{report_id}-", suffix=".xml", dir=work)
    os.close(fd)
    try:
        shutil.copy(report_path, tmp)
        html = apply_stylesheet(Path(tmp))  # nobody else knows this file's name
    finally:
        os.unlink(tmp)
    final = Path(out_dir) / f"report-{report_id}.html"
    fd, partial = tempfile.mkstemp(prefix=f".{final.name}.", dir=out_dir)  # same file system
    with os.fdopen(fd, "wb") as fh:
        fh.write(html)
    os.replace(partial, final)  # readers see no file or the whole file, never half of one
    return worker_name()


def apply_stylesheet(path: Path) -> bytes:
    """Transform a report export to HTML with an XSLT stylesheet (lxml)."""
    from lxml import etree  # noqa: PLC0415

    transform = etree.XSLT(etree.XML(STYLESHEET))
    return etree.tostring(transform(etree.parse(str(path))))


def report_ok(html: bytes, report_id: int, rows: int) -> bool:
    """Is this published report the whole report ``report_id`` and nothing else?"""
    from lxml import etree  # noqa: PLC0415

    try:
        doc = etree.fromstring(html)
    except etree.XMLSyntaxError:
        return False
    if doc.xpath("string(//h1/@data-report)") != str(report_id):
        return False
    cells = doc.xpath("//tr/td[2]/text()")
    return cells == [f"{report_id}-{k}" for k in range(rows)]


def reports(cluster, n: int = 200, *, safe: bool = False, rows: int = 1000, queue: str | None = None,
            timeout: float = 60) -> Measurement:
    """Build ``n`` reports concurrently and check every published output.

    The "database" has already written one export per report; each task
    copies its export, transforms it and publishes ``report-<id>.html``.
    Values are 1 per corrupted report (wrong data, unreadable, or missing
    because the task failed), 0 per good one; ``sum`` = corrupted outputs.
    """
    _, base = _new_run(cluster, "xml")
    exports, out = base / "exports", base / "out"
    exports.mkdir()
    out.mkdir()
    for i in range(n):
        (exports / f"export-{i}.xml").write_bytes(report_xml(i, rows))
    task = cluster.task(build_report_safe if safe else build_report_naive)
    opts = {"queue": queue} if queue else {}
    results = [task.apply_async((str(exports / f"export-{i}.xml"), i, str(out)), **opts) for i in range(n)]
    failed = 0
    workers: dict[str, int] = {}
    for res in results:
        value = res.get(timeout=timeout, propagate=False)
        if res.failed():
            failed += 1
        else:
            workers[value] = workers.get(value, 0) + 1
    bad = []
    for i in range(n):
        path = out / f"report-{i}.html"
        bad.append(0 if path.exists() and report_ok(path.read_bytes(), i, rows) else 1)
    label = "fix: temp file + os.replace" if safe else "naive: shared data.xml"
    return Measurement(label, "corrupted outputs", "reports", bad, stat="sum",
                       meta={"reports": n, "rows": rows, "tasks_failed": failed, "ran_on": workers})


def reports_with_concurrency(cluster, n: int = 200, concurrency: int = 2, *, safe: bool = False) -> Measurement:
    """Same as :func:`reports`, on a temporary worker with ``concurrency`` pool children."""
    name = f"rx{uuid.uuid4().hex[:4]}"
    queue = f"races-{name}"
    cluster.add_worker(name, queues=[queue], concurrency=concurrency)
    try:
        m = reports(cluster, n, safe=safe, queue=queue)
    finally:
        cluster.remove_worker(name)
    m.meta["concurrency"] = concurrency
    return m


# --------------------------------------------------------------------------- at-least-once


@shared_task(name="races.apply", bind=True, acks_late=True, reject_on_worker_lost=True)
def apply_effect(self, run: str, key: str, idempotent: bool, crash_after_first_apply: bool = False) -> str:
    """Apply one business effect (+1 on an account); optionally die right after the first time.

    ``acks_late`` + ``reject_on_worker_lost``: the message is acknowledged only
    after the task returns, so a child killed mid-task gets it redelivered.
    """
    r = redis_client()
    attempt = r.incr(f"{run}:deliveries:{key}")
    if idempotent:
        applied = r.eval(APPLY_ONCE, 4, f"{run}:done:{key}", f"{run}:applied:{key}", f"{run}:rows", f"{run}:log", 1)
    else:
        r.incr(f"{run}:applied:{key}")
        applied = 1
    if crash_after_first_apply and attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # the effect is in the database; the ack is not sent
    return "applied" if applied else "skipped"


def _wait_for(r, key: str, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        value = int(r.get(key) or 0)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def redelivery(cluster, *, idempotent: bool, how: str = "crash", timeout: float = 30) -> dict[str, Any]:
    """Deliver one message twice and count how often its effect was applied.

    ``how="crash"``: the worker child dies after applying the effect and before
    the late ack, so the broker hands the message out again.
    ``how="duplicate"``: the producer publishes the same task id twice (a
    retried publish after a lost confirmation looks exactly like this).
    """
    run, _ = _new_run(cluster, "redeliver")
    key = "invoice-42"
    task = cluster.task(apply_effect)
    task_id = f"{run}:msg"
    if how == "crash":
        res = task.apply_async((run, key, idempotent, True), task_id=task_id)
    elif how == "duplicate":
        for _ in range(2):
            res = task.apply_async((run, key, idempotent, False), task_id=task_id)
    else:
        raise ValueError("how must be 'crash' or 'duplicate'")
    r = cluster.redis_client()
    try:
        deliveries = _wait_for(r, f"{run}:deliveries:{key}", 2, timeout)
        res.get(timeout=timeout, propagate=False)
        # the second delivery has finished once the result is stored; read the counts now
        applied = int(r.get(f"{run}:applied:{key}") or 0)
    finally:
        r.close()
    return {"how": how, "idempotent": idempotent, "deliveries": deliveries, "applied": applied,
            "state": res.state}


# --------------------------------------------------------------------------- the lesson in one call


def compare(cluster, n_files: int = 100, n_reports: int = 200) -> tuple[Comparison, Comparison]:
    """Both races, before and after: ``n_files`` inbox files, ``n_reports`` report builds."""
    dup = Comparison(producers(cluster, n_files), producers(cluster, n_files, claim=True),
                     better="lower", title="two producers, one inbox")
    xml = Comparison(reports(cluster, n_reports), reports(cluster, n_reports, safe=True),
                     better="lower", title="one shared data.xml")
    return dup, xml
