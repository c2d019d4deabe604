"""Lesson 08: race conditions — overlapping producers, a shared temp file, redelivery.

Three races from the same import pipeline, each run on real workers. Effects
are counted by observers the fixes do not control:

* an **execution log**: every import task appends its file name to a Redis
  list the moment it starts, before any de-duplication logic runs;
* the **table itself**: the "sales" table is a Redis list with no unique key
  (one ``RPUSH`` per row insert), so a file imported twice leaves its rows
  twice, whoever inserted them;
* a **ledger** for the account effect in the redelivery demo (one entry per
  application), and a **mailer** that reads every report the moment it
  appears, as a downstream reader would.

The races and their fixes:

* **Two producers, one inbox.** Two overlapping runs of a scheduled producer
  list the same directory and both enqueue every file. Fix 1: the producer
  *claims* each file atomically (Redis ``SET NX EX``). Fix 2: the consumer
  is idempotent (an atomic "apply once" script), so a file delivered twice is
  applied once. Each fix is measured on its own: claims with a plain
  consumer, and the idempotent consumer fed the naive producers' duplicates.
* **One fixed temp file.** Concurrent report builds copy their export to the
  same ``data.xml``; one build reads the other's data. Fix: a temp file per
  task (``mkstemp``). Writing the output straight to its final name lets a
  reader see it half-written; publishing with ``os.replace`` from a temp
  name in the same directory does not.
* **At-least-once delivery.** A message is delivered twice (a child died
  after the effect and before the late ack, or a producer published twice).
  Only an idempotent consumer turns "delivered twice" into "applied once".
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from celery import shared_task
from celery.result import ResultSet

from labkit.app import local_dir, redis_client, worker_name
from labkit.client import ClusterLike
from labkit.measure import Comparison, Measurement, claim, verify
from labkit.poll import poll_until

if TYPE_CHECKING:  # pragma: no cover
    from labkit.cluster import LocalCluster

NOTEBOOK = "08_race_conditions.ipynb"
#: Two prefork workers (two children each) and Redis. The de-duplication switch
#: Celery has had since 5.1 is ON here, to show it does not catch these cases.
CLUSTER = {"workers": 2, "zookeeper": 0, "settings": {"worker_deduplicate_successful_tasks": True}}
WORKSHOP = {"N_FILES": 200, "N_REPORTS": 300, "PRODUCERS": 3}

# --------------------------------------------------------------------------- the data

STYLESHEET = b"""<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:output method="xml" encoding="utf-8"/>
  <xsl:template match="/report">
    <html><body>
      <h1 data-report="{@id}">Report <xsl:value-of select="@id"/></h1>
      <table><xsl:for-each select="row">
        <tr><td><xsl:value-of select="@n"/></td><td><xsl:value-of select="."/></td></tr>
      </xsl:for-each></table>
    </body></html>
  </xsl:template>
</xsl:stylesheet>"""


@functools.lru_cache(maxsize=1024)
def report_xml(report_id: int, rows: int = 1000) -> bytes:
    """The deterministic "database export" for one report: every row names its report."""
    body = "".join(f'<row n="{k}">{report_id}-{k}</row>' for k in range(rows))
    return f'<?xml version="1.0"?>\n<report id="{report_id}">{body}</report>\n'.encode()


def inbox_file(i: int, records: int = 20) -> bytes:
    """One small delivery file for the import pipeline."""
    body = "".join(f"<sale n='{k}'>{i * 1000 + k}</sale>" for k in range(records))
    return f"<?xml version='1.0'?><sales file='{i}'>{body}</sales>".encode()


def _new_run(cluster: ClusterLike, kind: str) -> tuple[str, Path]:
    """A fresh run id and a directory for it in the cluster's shared run directory."""
    run = f"races:{kind}:{uuid.uuid4().hex[:8]}"
    base = Path(cluster.run_dir) / "shared" / run.replace(":", "-")  # type: ignore[attr-defined]
    base.mkdir(parents=True, exist_ok=True)
    return run, base


# --------------------------------------------------------------------------- race 1: producers


@shared_task(name="races.produce_naive")
def produce_naive(inbox: str, run: str, idempotent: bool = False) -> list[str]:
    """The talk's producer: list the inbox and enqueue every file found there (by value)."""
    importer = import_idempotent if idempotent else import_naive
    ids = []
    for file_name in sorted(os.listdir(inbox)):
        try:
            data = (Path(inbox) / file_name).read_text()
        except FileNotFoundError:  # imported and cleaned up since we listed it
            continue
        ids.append(importer.delay(inbox, file_name, data, run).id)
    return ids


@shared_task(name="races.produce_claiming")
def produce_claiming(inbox: str, run: str, idempotent: bool = False, ttl: int = 600) -> list[str]:
    """List the inbox, but enqueue a file only if this run wins its claim (SET NX EX)."""
    importer = import_idempotent if idempotent else import_naive
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
        ids.append(importer.delay(inbox, file_name, data, run).id)
    return ids


def _log_execution(run: str, file_name: str) -> None:
    """The observer: every execution of an import, appended before anything else happens."""
    redis_client().rpush(f"{run}:executions", file_name)


@shared_task(name="races.import_naive")
def import_naive(inbox: str, file_name: str, data: str, run: str) -> str:
    """Insert the file's rows one by one, then delete the file (``clean=True``). Not idempotent."""
    _log_execution(run, file_name)
    r = redis_client()
    for record in _records(data):
        r.rpush(f"{run}:sales", f"{file_name}|{record}")  # one INSERT per row; the table has no unique key
    (Path(inbox) / file_name).unlink(missing_ok=True)
    return "imported"


# Insert the rows and remember that this file was applied, in one atomic step
# (a Lua script runs alone inside Redis): either both happen or neither, so a
# second delivery of the same file finds the marker and inserts nothing.
# KEYS: done marker, table; ARGV: the rows.
APPLY_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX') then
  if #ARGV > 0 then redis.call('RPUSH', KEYS[2], unpack(ARGV)) end
  return 1
end
return 0
"""


@shared_task(name="races.import_idempotent")
def import_idempotent(inbox: str, file_name: str, data: str, run: str) -> str:
    """Import a file at most once per run, however many times the message arrives."""
    _log_execution(run, file_name)
    rows = [f"{file_name}|{record}" for record in _records(data)]
    applied = redis_client().eval(APPLY_ONCE, 2, f"{run}:done:{file_name}", f"{run}:sales", *rows)
    (Path(inbox) / file_name).unlink(missing_ok=True)
    return "imported" if applied else "already imported"


def _records(data: str) -> list[str]:
    from xml.etree import ElementTree as ET  # noqa: PLC0415

    return [el.text or "" for el in ET.fromstring(data)]


def run_producers(cluster: ClusterLike, n: int = 100, *, claim: bool = False, idempotent: bool = False,
                  producers: int = 2, records: int = 20, timeout: float = 60) -> Measurement:
    """Run ``producers`` overlapping producer runs over one inbox of ``n`` files.

    ``claim`` switches the producer to claiming, ``idempotent`` the consumer.
    Values: duplicate imports per file, read from the table (copies of the
    file's rows − 1); ``sum`` = total duplicates. ``meta``: messages enqueued,
    executions logged, rows inserted vs expected, files never imported.
    """
    run, base = _new_run(cluster, "dup")
    inbox = base / "inbox"
    inbox.mkdir()
    names = [f"sales-{i:04d}.xml" for i in range(n)]
    for i, name in enumerate(names):
        (inbox / name).write_bytes(inbox_file(i, records))
    task = cluster.task(produce_claiming if claim else produce_naive)
    # the scheduler fires again while the first run is still going: all runs are in flight
    runs = [task.delay(str(inbox), run, idempotent) for _ in range(producers)]
    import_ids = [tid for res in runs for tid in res.get(timeout=timeout)]
    for tid in import_ids:
        cluster.app.AsyncResult(tid).get(timeout=timeout, propagate=False)
    r = cluster.redis_client()
    try:
        table = [row.decode() for row in r.lrange(f"{run}:sales", 0, -1)]
        executions = [x.decode() for x in r.lrange(f"{run}:executions", 0, -1)]
    finally:
        r.close()
    rows_per_file = Counter(row.split("|", 1)[0] for row in table)
    copies = [rows_per_file[name] / records for name in names]
    producer = "claim" if claim else "naive"
    consumer = "idempotent" if idempotent else "naive"
    label = {("naive", "naive"): "naive: list and enqueue", ("claim", "naive"): "fix 1: claims",
             ("naive", "idempotent"): "fix 2: idempotent consumer",
             ("claim", "idempotent"): "fix: claims + idempotent"}[(producer, consumer)]
    return Measurement(
        label, "duplicate imports", "imports", [max(0.0, c - 1) for c in copies], stat="sum",
        meta={"files": n, "producers": producers, "producer": producer, "consumer": consumer,
              "enqueued": len(import_ids), "executions": len(executions),
              "executed_twice_or_more": sum(c > 1 for c in Counter(executions).values()),
              "rows_inserted": len(table), "rows_expected": n * records, "distinct_rows": len(set(table)),
              "never_imported": sum(c == 0 for c in copies)},
    )


def compare_producers(cluster: ClusterLike, n: int = 100, *, producers: int = 2) -> Comparison:
    """Naive producers vs claiming producers (same plain consumer): duplicate imports."""
    return Comparison(run_producers(cluster, n, producers=producers),
                      run_producers(cluster, n, producers=producers, claim=True),
                      better="lower", title="two producers, one inbox: claims")


@claim("overlapping naive producers enqueue files twice and the table holds their rows twice")
def overlapping_producers_import_twice(naive: Measurement) -> None:
    """The pitfall, seen by the observers: more messages than files, duplicated rows."""
    m = naive.meta
    verify("two or more overlapping producer runs", m["producers"] >= 2, producers=m["producers"])
    verify("overlapping producers enqueue more messages than there are files, and import some twice",
           m["enqueued"] > m["files"] and naive.value > 0 and m["rows_inserted"] > m["rows_expected"],
           enqueued=m["enqueued"], files=m["files"], duplicates=naive.value, rows=m["rows_inserted"],
           expected=m["rows_expected"])


@claim("claiming producers enqueue every file exactly once")
def claims_enqueue_each_file_once(comparison: Comparison) -> None:
    """Before: duplicates; after: enqueued == executions == files, every row once."""
    overlapping_producers_import_twice(comparison.before)
    a = comparison.after.meta
    verify("with claims, every file is enqueued and executed exactly once and its rows inserted once",
           a["enqueued"] == a["files"] and a["executions"] == a["files"] and comparison.after.value == 0
           and a["never_imported"] == 0 and a["rows_inserted"] == a["rows_expected"],
           enqueued=a["enqueued"], executions=a["executions"], files=a["files"],
           duplicates=comparison.after.value, rows=a["rows_inserted"], expected=a["rows_expected"])


@claim("an idempotent consumer fed real duplicates inserts every file's rows once")
def idempotent_consumer_applies_duplicates_once(consumer: Measurement) -> None:
    """The consumer ran more often than there are files (real duplicates), the table holds each row once."""
    m = consumer.meta
    verify("the consumer was fed duplicates: more executions than files", m["executions"] > m["files"],
           executions=m["executions"], files=m["files"])
    verify("every file's rows are in the table exactly once",
           consumer.value == 0 and m["never_imported"] == 0 and m["rows_inserted"] == m["rows_expected"]
           == m["distinct_rows"],
           duplicates=consumer.value, rows=m["rows_inserted"], expected=m["rows_expected"],
           distinct=m["distinct_rows"], executions=m["executions"])


# --------------------------------------------------------------------------- race 2: data.xml

BUILDS = ("shared", "private", "atomic")


def apply_stylesheet(source: Path, output: Path) -> None:
    """Transform a report export to HTML (lxml XSLT) and write it to ``output``.

    libxslt serialises the result straight into the file, a few KiB per
    ``write()``: while it runs, ``output`` exists and is incomplete.
    """
    from lxml import etree  # noqa: PLC0415

    transform = etree.XSLT(etree.XML(STYLESHEET))
    transform(etree.parse(str(source))).write_output(str(output))


@shared_task(name="races.build_report_naive")
def build_report_naive(report_path: str, report_id: int, out_dir: str) -> str:
    """The talk's build(): copy the export to a fixed ``data.xml``, transform it into the report."""
    work = local_dir()
    shutil.copy(report_path, work / "data.xml")
    # ... unless another task replaced data.xml meanwhile
    apply_stylesheet(work / "data.xml", Path(out_dir) / f"report-{report_id}.html")
    return worker_name()


@shared_task(name="races.build_report_private")
def build_report_private(report_path: str, report_id: int, out_dir: str) -> str:
    """Half a fix: a temp file per task, but the report is written in place."""
    fd, tmp = tempfile.mkstemp(prefix=f"data-{report_id}-", suffix=".xml", dir=local_dir())
    os.close(fd)
    try:
        shutil.copy(report_path, tmp)
        apply_stylesheet(Path(tmp), Path(out_dir) / f"report-{report_id}.html")  # readers may see it half-written
    finally:
        os.unlink(tmp)
    return worker_name()


@shared_task(name="races.build_report_safe")
def build_report_safe(report_path: str, report_id: int, out_dir: str) -> str:
    """The fix: a temp file per task, and the report published atomically with ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f"data-{report_id}-", suffix=".xml", dir=local_dir())
    os.close(fd)
    final = Path(out_dir) / f"report-{report_id}.html"
    # the partial output gets a dot-name in the *same directory* (same file system: rename is atomic)
    fd, partial = tempfile.mkstemp(prefix=f".{final.name}.", dir=out_dir)
    os.close(fd)
    try:
        shutil.copy(report_path, tmp)
        apply_stylesheet(Path(tmp), Path(partial))  # nobody else knows either name
        os.replace(partial, final)  # readers see no report or the whole report, never half of one
    finally:
        os.unlink(tmp)
        Path(partial).unlink(missing_ok=True)
    return worker_name()


@functools.lru_cache(maxsize=1024)
def expected_report(report_id: int, rows: int = 1000) -> bytes:
    """The one right rendering of report ``report_id`` (the stylesheet is deterministic)."""
    from lxml import etree  # noqa: PLC0415

    transform = etree.XSLT(etree.XML(STYLESHEET))
    return bytes(transform(etree.fromstring(report_xml(report_id, rows)).getroottree()))


def report_ok(html: bytes, report_id: int, rows: int) -> bool:
    """Is this report the whole report ``report_id`` and nothing else?"""
    from lxml import etree  # noqa: PLC0415

    try:
        doc = etree.fromstring(html)
    except etree.XMLSyntaxError:
        return False
    if doc.xpath("string(//h1/@data-report)") != str(report_id):
        return False
    cells = doc.xpath("//tr/td[2]/text()")
    return cells == [f"{report_id}-{k}" for k in range(rows)]


class Mailer:
    """The downstream reader: mails each report the moment it appears in the out folder.

    It skips dot-names (the convention for "not finished"), reads each new
    ``report-<id>.html`` once and keeps what it read. A thread of the notebook's
    process, so what it sees is what any other reader of that folder would see.
    """

    def __init__(self, out: Path, n: int) -> None:
        self.out, self.n = out, n
        self.read: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labkit-mailer", daemon=True)

    def _scan(self) -> bool:
        for name in os.listdir(self.out):
            if name.startswith(".") or name in self.read:
                continue
            try:
                self.read[name] = (self.out / name).read_bytes()
            except FileNotFoundError:
                continue
        return len(self.read) >= self.n or self._stop.is_set()

    def _run(self) -> None:
        poll_until(self._scan, timeout=600, interval=0.002)

    def __enter__(self) -> Mailer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._scan()  # anything published after the last scan


def reports(cluster: ClusterLike, n: int = 200, *, build: str = "shared", rows: int = 1000,
            queue: str | None = None, timeout: float = 60) -> dict[str, Measurement]:
    """Build ``n`` reports concurrently while a mailer reads each one as soon as it appears.

    ``build``: ``"shared"`` (the talk: one ``data.xml``), ``"private"`` (a temp
    file per task, output written in place) or ``"atomic"`` (temp file +
    ``os.replace``). Returns two Measurements, 1 per bad report, 0 per good
    one (``sum``): ``"published"`` checks the final files after the run;
    ``"mailed"`` checks what the mailer read.
    """
    if build not in BUILDS:
        raise ValueError(f"build must be one of {BUILDS}, not {build!r}")
    _, base = _new_run(cluster, "xml")
    exports, out = base / "exports", base / "out"
    exports.mkdir()
    out.mkdir()
    for i in range(n):
        (exports / f"export-{i}.xml").write_bytes(report_xml(i, rows))
    task = cluster.task({"shared": build_report_naive, "private": build_report_private,
                         "atomic": build_report_safe}[build])
    opts = {"queue": queue} if queue else {}
    with Mailer(out, n) as mailer:
        results = ResultSet([task.apply_async((str(exports / f"export-{i}.xml"), i, str(out)), **opts)
                             for i in range(n)], app=cluster.app)
        results.join_native(timeout=timeout, propagate=False)
    failed = sum(res.failed() for res in results.results)
    workers = Counter(res.result for res in results.results if res.successful())

    def good(html: bytes | None, i: int) -> bool:  # the right bytes, else the full check (same verdict, slower)
        return html is not None and (html == expected_report(i, rows) or report_ok(html, i, rows))

    published, mailed = [], []
    for i in range(n):
        path = out / f"report-{i}.html"
        published.append(0 if good(path.read_bytes() if path.exists() else None, i) else 1)
        mailed.append(0 if good(mailer.read.get(path.name), i) else 1)
    label = {"shared": "naive: shared data.xml", "private": "temp file, written in place",
             "atomic": "fix: temp file + os.replace"}[build]
    meta = {"reports": n, "rows": rows, "build": build, "tasks_failed": failed, "ran_on": dict(workers),
            "mailed": len(mailer.read), "leftover_partials": sum(p.name.startswith(".") for p in out.iterdir())}
    return {"published": Measurement(label, "wrong reports published", "reports", published, stat="sum", meta=meta),
            "mailed": Measurement(label, "broken reports mailed", "reports", mailed, stat="sum", meta=meta)}


def reports_with_concurrency(cluster: LocalCluster, n: int = 200, concurrency: int = 2, *,
                             build: str = "shared") -> dict[str, Measurement]:
    """Same as :func:`reports`, on a temporary worker with ``concurrency`` pool children."""
    name = f"rx{uuid.uuid4().hex[:4]}"
    queue = f"races-{name}"
    cluster.add_worker(name, queues=[queue], concurrency=concurrency)
    try:
        ms = reports(cluster, n, build=build, queue=queue)
    finally:
        cluster.remove_worker(name)
    for m in ms.values():
        m.meta["concurrency"] = concurrency
    return ms


def compare_temp_files(cluster: ClusterLike, n: int = 200) -> Comparison:
    """Shared ``data.xml`` vs a temp file per task: wrong reports published."""
    return Comparison(reports(cluster, n, build="shared")["published"],
                      reports(cluster, n, build="private")["published"],
                      better="lower", title="one shared data.xml")


def compare_publish(cluster: ClusterLike, n: int = 200) -> Comparison:
    """Writing the report in place vs ``os.replace``: broken reports the mailer read."""
    return Comparison(reports(cluster, n, build="private")["mailed"],
                      reports(cluster, n, build="atomic")["mailed"],
                      better="lower", title="a reader during the write")


@claim("a temp file per task stops builds from publishing each other's data")
def temp_file_per_task_stops_crosstalk(comparison: Comparison) -> None:
    """Before (shared data.xml): wrong reports; after (private temp file): none, and no task failed."""
    b, a = comparison.before, comparison.after
    verify("a shared data.xml publishes wrong or broken reports", b.value > 0,
           wrong=b.value, reports=b.meta["reports"])
    verify("a temp file per task publishes every report right", a.value == 0 and a.meta["tasks_failed"] == 0,
           wrong=a.value, failed=a.meta["tasks_failed"], reports=a.meta["reports"])


@claim("publishing with os.replace: a reader never gets a half-written report")
def atomic_publish_stops_torn_reads(comparison: Comparison) -> None:
    """Before (written in place): the mailer read broken reports; after (os.replace): none, all mailed."""
    b, a = comparison.before, comparison.after
    verify("written in place, the mailer reads some reports half-written", b.value > 0,
           broken=b.value, reports=b.meta["reports"])
    verify("published with os.replace, the mailer reads every report whole",
           a.value == 0 and a.meta["mailed"] == a.meta["reports"] and a.meta["leftover_partials"] == 0,
           broken=a.value, mailed=a.meta["mailed"], reports=a.meta["reports"])


# --------------------------------------------------------------------------- at-least-once


@shared_task(name="races.apply", bind=True, acks_late=True, reject_on_worker_lost=True)
def apply_effect(self, run: str, key: str, idempotent: bool, crash_after_first_apply: bool = False) -> str:
    """Apply one business effect (+1 on an account); optionally die right after the first time.

    ``acks_late`` + ``reject_on_worker_lost``: the message is acknowledged only
    after the task returns, so a child killed mid-task gets it redelivered.
    """
    r = redis_client()
    attempt = r.rpush(f"{run}:deliveries:{key}", self.request.id)  # the observer: every execution
    if idempotent:
        applied = r.eval(APPLY_ONCE, 2, f"{run}:done:{key}", f"{run}:ledger:{key}", "+1")
    else:
        r.rpush(f"{run}:ledger:{key}", "+1")
        applied = 1
    if crash_after_first_apply and attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # the effect is in the database; the ack is not sent
    r.rpush(f"{run}:finished:{key}", self.request.id)
    return "applied" if applied else "skipped"


def redelivery(cluster: ClusterLike, *, idempotent: bool = False, how: str = "crash",
               timeout: float = 30) -> Measurement:
    """Deliver one message twice and count how often its effect landed in the ledger.

    ``how="crash"``: the worker child dies after applying the effect and before
    the late ack, so the broker hands the message out again.
    ``how="duplicate"``: the producer publishes the same task id twice (a
    retried publish after a lost confirmation looks exactly like this).
    Values: ``[entries in the ledger]``; ``meta["deliveries"]``: executions seen.
    """
    return _Redelivery(cluster, idempotent, how).collect(timeout)


class _Redelivery:
    """One redelivery run, sent at once and collected later (so two can run side by side)."""

    def __init__(self, cluster: ClusterLike, idempotent: bool, how: str) -> None:
        if how not in ("crash", "duplicate"):
            raise ValueError("how must be 'crash' or 'duplicate'")
        self.cluster, self.idempotent, self.how = cluster, idempotent, how
        self.run, _ = _new_run(cluster, "redeliver")
        self.key = "invoice-42"
        self.copies = 1 if how == "crash" else 2
        task = cluster.task(apply_effect)
        for _ in range(self.copies):
            self.res = task.apply_async((self.run, self.key, idempotent, how == "crash"), task_id=f"{self.run}:msg")

    def collect(self, timeout: float = 30) -> Measurement:
        run, key = self.run, self.key
        r = self.cluster.redis_client()
        try:
            # wait for two executions, and for every one that was not killed to finish
            poll_until(lambda: r.llen(f"{run}:deliveries:{key}") >= 2
                       and r.llen(f"{run}:finished:{key}") >= self.copies, timeout, 0.05)
            self.res.get(timeout=timeout, propagate=False)
            deliveries = r.llen(f"{run}:deliveries:{key}")
            applied = r.llen(f"{run}:ledger:{key}")
        finally:
            r.close()
        label = f"fix: idempotent, {self.how}" if self.idempotent else f"naive: {self.how}"
        dedup = bool(self.cluster.app.conf.worker_deduplicate_successful_tasks)
        return Measurement(label, "effects applied", "times", [applied], stat="last",
                           meta={"how": self.how, "idempotent": self.idempotent, "deliveries": int(deliveries),
                                 "state": self.res.state, "worker_deduplicate_successful_tasks": dedup})


def compare_redelivery(cluster: ClusterLike, how: str = "crash") -> Comparison:
    """One message delivered twice: naive vs idempotent consumer (run side by side), effects in the ledger."""
    naive, fixed = _Redelivery(cluster, False, how), _Redelivery(cluster, True, how)
    return Comparison(naive.collect(), fixed.collect(), better="lower", title=f"delivered twice ({how})")


@claim("a message delivered twice is applied twice by a naive consumer and once by an idempotent one")
def idempotent_consumer_applies_redelivery_once(comparison: Comparison) -> None:
    """Both consumers really got two deliveries; the ledger has 2 entries before, 1 after."""
    b, a = comparison.before, comparison.after
    verify(f"{b.meta['how']}: both consumers received the message twice",
           b.meta["deliveries"] == 2 and a.meta["deliveries"] == 2,
           naive=b.meta["deliveries"], idempotent=a.meta["deliveries"])
    verify(f"{b.meta['how']}: the naive consumer applied it twice, the idempotent one once",
           b.value == 2 and a.value == 1, naive=b.value, idempotent=a.value)
