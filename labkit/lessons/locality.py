"""Lesson 02: data locality — it is easy to forget where your data is.

Each worker of a :class:`~labkit.LocalCluster` has a private directory,
``cluster.workers[name].local_dir`` (``$LABKIT_LOCAL_DIR`` inside the worker),
standing in for the local disk of a separate host. The experiments:

* **1 file, 2 tasks** (:func:`pairs`). Task A writes an intermediate file to
  its local disk and returns the path; task B, picked up by whichever worker
  is free, opens it. Whenever B lands on the other "host", the file is not
  there. Fixes, measured on the same pairs: keep both steps on one node — A
  sends B to its own worker's ``worker_direct`` queue, A and B become one
  task, or the whole chain is routed to one worker's queue — or write to
  shared storage and pass the path, or pass small data by value.
* **By value vs by reference** (:func:`compare_broker_memory`,
  :func:`compare_latency`). A multi-MB payload sent through Redis sits in the
  broker's memory until a worker takes it (``MEMORY USAGE`` of the waiting
  queue), and costs latency on the way; a path costs about a kilobyte.
* **The ladder** "memory > file system > NAS > carrier pigeon"
  (:func:`ladder`): the same bytes read from process memory, a local file,
  Redis over loopback, and an *emulated* NAS (:class:`EmulatedNAS`: an HTTP
  server in the notebook process that charges a fixed latency per request and
  sends at a fixed bandwidth). The NAS rung is slower than Redis by
  construction: an illustration, which no claim checks.

Every count comes from the run: a pair failed if task B raised, and the
worker that ran each task is read from its result.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import chain, shared_task
from celery.utils.nodenames import worker_direct

from labkit.app import local_dir, redis_client, worker_name
from labkit.client import short_name
from labkit.loopback import LoopbackServer, QuietHandler
from labkit.measure import Comparison, Measurement, claim, verify

if TYPE_CHECKING:  # workers import this module: keep them from loading the cluster machinery
    from labkit.cluster import LocalCluster

NOTEBOOK = "02_data_locality.ipynb"
# worker_direct: every worker also consumes a queue named after its hostname.
# prefetch 1: a worker holds one waiting message per child, so B goes to whichever worker is free.
CLUSTER = {"workers": 2, "zookeeper": 0, "settings": {"worker_direct": True, "worker_prefetch_multiplier": 1}}
WORKSHOP = {"N_PAIRS": 300, "PAYLOAD_MB": 20, "LADDER_BYTES": 1024 * 1024, "LADDER_REPEATS": 60}

MODES = ("local", "shared", "value")
LOCAL = "$LABKIT_LOCAL_DIR"  # each worker's own "local disk"; B expands it in its own environment


def payload(pair_id: int, size: int) -> bytes:
    """Deterministic bytes for one pair (what step A produces and step B checks)."""
    seed = hashlib.sha256(str(pair_id).encode()).hexdigest().encode()
    return (seed * (size // len(seed) + 1))[:size]


# --------------------------------------------------------------------------- 1 file, 2 tasks


@shared_task(name="locality.extract", bind=True)
def extract(self, pair_id: int, size: int, mode: str = "local", shared_dir: str = "") -> dict[str, Any]:
    """Step A: produce an intermediate result and say where it is.

    ``local``: a file on this worker's own disk (the pitfall when B runs elsewhere);
    ``shared``: a file on storage every worker mounts; ``value``: the bytes themselves.
    """
    data = payload(pair_id, size)
    ref: dict[str, Any] = {"pair": pair_id, "made_on": worker_name(), "hostname": self.request.hostname}
    if mode == "value":
        ref["data"] = data.decode()
        return ref
    name = f"intermediate-{pair_id}-{uuid.uuid4().hex[:6]}.dat"
    if mode == "local":
        (local_dir() / name).write_bytes(data)
        # A host-local path: like /var/tmp/x on a real host, it names a different disk on each
        # worker. Here every worker's $LABKIT_LOCAL_DIR plays the part of its own /var/tmp.
        ref["path"] = f"{LOCAL}/{name}"
    else:
        (Path(shared_dir) / name).write_bytes(data)
        ref["path"] = str(Path(shared_dir) / name)
    return ref


@shared_task(name="locality.transform")
def transform(ref: dict[str, Any]) -> dict[str, Any]:
    """Step B: read A's result (from the path, or the value) and check it."""
    if "data" in ref:
        data = ref["data"].encode()
    else:
        with open(os.path.expandvars(ref["path"]), "rb") as fh:  # FileNotFoundError on another "host"
            data = fh.read()
    return {"pair": ref["pair"], "made_on": ref["made_on"], "read_on": worker_name(),
            "ok": hashlib.sha256(data).hexdigest() == hashlib.sha256(payload(ref["pair"], len(data))).hexdigest()}


@shared_task(name="locality.extract_then_forward", bind=True)
def extract_then_forward(self, pair_id: int, size: int, b_id: str) -> dict[str, Any]:
    """Step A, which sends step B itself, to the queue that only A's own worker consumes.

    With ``worker_direct = True`` every worker also consumes a queue named
    after its hostname (``w1@<cluster id>.dq2``); ``self.request.hostname`` is
    the worker running this task. ``b_id`` lets the caller wait for B.
    """
    ref = extract.run(pair_id, size, "local")
    transform.apply_async((ref,), queue=worker_direct(self.request.hostname), task_id=b_id)
    return ref


@shared_task(name="locality.extract_and_transform")
def extract_and_transform(pair_id: int, size: int) -> dict[str, Any]:
    """Steps A and B as one task: the file never leaves the process that wrote it."""
    return transform.run(extract.run(pair_id, size, "local"))


PLACEMENTS = {  # (mode, placement) -> label
    ("local", "anywhere"): "naive: local file, B anywhere",
    ("local", "forward"): "fix: A sends B to its own worker",
    ("local", "one task"): "fix: A and B as one task",
    ("local", "routed chain"): "fix: chain routed to one worker",
    ("shared", "anywhere"): "fix: shared storage + path",
    ("value", "anywhere"): "fix: small data by value",
}


def _hostnames(cluster: LocalCluster, queue: str) -> list[str]:
    """Full hostnames (``w1@<id>``) of the workers consuming ``queue``."""
    return [w.hostname for w in cluster.workers.values() if queue in w.spec.queues]


def _send(cluster: LocalCluster, n: int, mode: str, placement: str, size: int, shared_dir: str,
          queue: str) -> tuple[list[Any], list[Any]]:
    """Send ``n`` pairs the way ``placement`` says; ``(A results or None, B results)``."""
    a_task, b_task = cluster.task(extract), cluster.task(transform)
    if placement == "anywhere":  # a chain on the shared queue: B goes to whoever asks first
        bs = [chain(a_task.s(i, size, mode, shared_dir).set(queue=queue), b_task.s().set(queue=queue)).apply_async()
              for i in range(n)]
        return [b.parent for b in bs], bs
    if placement == "forward":  # A routes B itself (extract_then_forward)
        ids = [str(uuid.uuid4()) for _ in range(n)]
        first = cluster.task(extract_then_forward)
        return ([first.apply_async((i, size, ids[i]), queue=queue) for i in range(n)],
                [b_task.AsyncResult(b) for b in ids])
    if placement == "one task":
        one = cluster.task(extract_and_transform)
        return [None] * n, [one.apply_async((i, size), queue=queue) for i in range(n)]
    # "routed chain": the caller picks a worker per pair and routes both steps to its direct queue.
    # A chain's options travel inside the message as JSON: route by the queue's name, not a Queue object.
    hosts = _hostnames(cluster, queue)
    bs = []
    for i in range(n):
        q = worker_direct(hosts[i % len(hosts)]).name
        bs.append(chain(a_task.s(i, size, mode, shared_dir).set(queue=q), b_task.s().set(queue=q)).apply_async())
    return [b.parent for b in bs], bs


def pairs(cluster: LocalCluster, *, n: int = 100, mode: str = "local", placement: str = "anywhere",
          size: int = 16_384, shared_dir: str | Path | None = None, queue: str = "celery",
          timeout: float = 60) -> Measurement:
    """Run ``n`` A -> B pairs; values are 1 per failed pair (B could not read A's result).

    ``mode`` is where A puts its result (``local`` disk, ``shared`` storage,
    or the ``value`` itself); ``placement`` is where B runs: ``anywhere`` (a
    chain on ``queue``: whichever worker takes it), ``forward`` (A sends B to
    its own worker), ``one task`` (A and B in one task), ``routed chain``
    (both steps routed to one worker's direct queue). The cluster needs
    ``worker_direct`` for ``forward`` and ``routed chain``.
    """
    label = PLACEMENTS.get((mode, placement))
    if label is None:
        raise ValueError(f"(mode, placement) must be one of {sorted(PLACEMENTS)}, not {(mode, placement)!r}")
    if mode == "shared" and shared_dir is None:
        shared_dir = Path(cluster.run_dir) / "shared" / "locality"
    if shared_dir is not None:
        Path(shared_dir).mkdir(parents=True, exist_ok=True)
    firsts, seconds = _send(cluster, n, mode, placement, size, str(shared_dir or ""), queue)
    failed, crossed, errors = [], 0, {}
    for first, b in zip(firsts, seconds, strict=True):
        value = b.get(timeout=timeout, propagate=False)
        if b.failed():
            failed.append(1)
            errors[type(value).__name__] = errors.get(type(value).__name__, 0) + 1
            read_on = short_name(b.worker or "")
            made_on = first.get(timeout=timeout)["made_on"] if first is not None else read_on
        else:
            failed.append(0 if value["ok"] else 1)
            made_on, read_on = value["made_on"], value["read_on"]
        crossed += int(bool(made_on and read_on and made_on != read_on))
    return Measurement(label, "failed pairs", "pairs", failed, stat="sum",
                       meta={"pairs": n, "b_on_other_worker": crossed, "errors": errors, "mode": mode,
                             "placement": placement, "same_node": placement != "anywhere", "size": size,
                             "workers": len(_hostnames(cluster, queue))})


def pairs_on_workers(cluster: LocalCluster, *, n: int = 100, workers: int = 3,
                     placements: tuple[str, ...] = ("anywhere", "forward")) -> list[Measurement]:
    """:func:`pairs` (local files) for each placement, on ``workers`` temporary one-child workers sharing a queue."""
    queue = f"locality-{uuid.uuid4().hex[:6]}"
    names = [f"{queue}-{k}" for k in range(workers)]
    try:
        for name in names:
            cluster.add_worker(name, queues=[queue], concurrency=1)
        return [pairs(cluster, n=n, placement=placement, queue=queue) for placement in placements]
    finally:
        for name in names:
            if name in cluster.workers:
                cluster.remove_worker(name)


def locality_fixes(cluster: LocalCluster, *, n: int = 100, size: int = 16_384) -> list[Measurement]:
    """Every fix in :data:`PLACEMENTS`, each on the same ``n`` pairs."""
    return [pairs(cluster, n=n, mode=mode, placement=placement, size=size)
            for mode, placement in PLACEMENTS if (mode, placement) != ("local", "anywhere")]


@claim("with B anywhere, a large share of pairs fail, exactly those whose B ran on another worker")
def a_local_path_breaks_on_other_hosts(m: Measurement) -> None:
    """At least 0.6x the share (W-1)/W expected with W workers, and every failure a crossing."""
    workers, n = m.meta["workers"], m.meta["pairs"]
    expected = (workers - 1) / workers
    verify(f"at least {0.6 * expected:.0%} of the pairs fail with {workers} workers",
           m.value >= 0.6 * expected * n, failed=m.value, pairs=n)
    verify("every failure is a pair whose B ran on the other worker", m.value == m.meta["b_on_other_worker"],
           failed=m.value, b_on_other_worker=m.meta["b_on_other_worker"])


@claim("a fix loses no pair (and a same-node fix never lets B cross)")
def no_pair_fails(m: Measurement) -> None:
    verify(f"{m.label}: no pair fails", m.value == 0, failed=m.value, pairs=m.meta["pairs"])
    if m.meta["same_node"]:
        verify(f"{m.label}: B always ran where A ran", m.meta["b_on_other_worker"] == 0,
               b_on_other_worker=m.meta["b_on_other_worker"])


# --------------------------------------------------------------------------- by value vs by reference


@shared_task(name="locality.digest")
def digest(data: str = "", path: str = "") -> str:
    """Consume a payload given by value (``data``) or by reference (``path``)."""
    raw = Path(path).read_bytes() if path else data.encode()
    return hashlib.sha256(raw).hexdigest()


PARKED = "locality-parked"  # a queue no worker consumes: messages wait in Redis
MIN_PAYLOAD_MB = 0.1  # below this a message's own headers (about 1 KB) are a fair share of it


def _shared_dir(cluster: LocalCluster) -> Path:
    path = Path(cluster.run_dir) / "shared" / "locality"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _parked(cluster: LocalCluster, label: str, kwargs: dict[str, str], messages: int,
            payload_bytes: int) -> Measurement:
    """Publish ``messages`` copies of one :func:`digest` call to :data:`PARKED`; ask Redis what they hold."""
    task = cluster.task(digest)
    r = cluster.redis_client()
    try:
        r.delete(PARKED)
        used_before = int(r.info("memory")["used_memory"])
        for _ in range(messages):
            task.apply_async(kwargs=kwargs, queue=PARKED)
        held = r.memory_usage(PARKED, samples=0)  # every element of the list counted, overhead included
        body = len(r.lindex(PARKED, 0))  # one message as published (all are the same)
        used_after = int(r.info("memory")["used_memory"])
    finally:
        r.delete(PARKED)
        r.close()
    return Measurement(label, "broker memory per waiting message", "bytes", [held / messages],
                       meta={"messages": messages, "payload_bytes": payload_bytes, "message_bytes": body,
                             "used_memory_delta": used_after - used_before})


def compare_broker_memory(cluster: LocalCluster, *, size_mb: float = 5.0, messages: int = 5,
                          by_reference: bool = True) -> Comparison:
    """Broker memory per waiting message: the payload by value vs a path to it on shared storage.

    Publishes ``messages`` copies to a queue nobody consumes and asks Redis how
    much the queue's key holds (``MEMORY USAGE key SAMPLES 0``: exact, unlike
    the difference of two ``used_memory`` readings, which other clients move).
    ``by_reference=False`` sends the payload by value on both sides.
    """
    if size_mb < MIN_PAYLOAD_MB:
        raise ValueError(f"PAYLOAD_MB = {size_mb}: use at least {MIN_PAYLOAD_MB} MB, or the payload is no "
                         "bigger than the message's own headers and there is nothing to compare")
    size = int(size_mb * 1_000_000)
    data = payload(0, size)
    path = _shared_dir(cluster) / f"payload-{uuid.uuid4().hex[:6]}.dat"
    path.write_bytes(data)
    try:
        before = _parked(cluster, "naive: by value", {"data": data.decode()}, messages, size)
        after = (_parked(cluster, "fix: by reference", {"path": str(path)}, messages, size) if by_reference
                 else _parked(cluster, "naive: by value, again", {"data": data.decode()}, messages, size))
    finally:
        path.unlink(missing_ok=True)
    return Comparison(before, after, better="lower", title=f"broker memory, {size_mb:g} MB payload")


@claim("a waiting message holds its whole payload by value; a reference costs the broker at least 10x less")
def a_reference_spares_the_broker(mem: Comparison) -> None:
    mem.check(factor=10, before_at_least=mem.before.meta["payload_bytes"])


def compare_latency(cluster: LocalCluster, *, size_mb: float = 5.0, repeats: int = 5,
                    timeout: float = 60) -> Comparison:
    """End-to-end seconds from "I have the bytes" to "a worker has digested them", by value vs by reference.

    The reference side includes writing the file to shared storage.
    """
    size = int(size_mb * 1_000_000)
    data = payload(1, size)
    text = data.decode()
    shared = _shared_dir(cluster)
    task = cluster.task(digest)
    expected = hashlib.sha256(data).hexdigest()
    by_value, by_ref = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        assert task.delay(data=text).get(timeout=timeout) == expected
        by_value.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        path = shared / f"payload-{uuid.uuid4().hex[:6]}.dat"
        path.write_bytes(data)  # the writer pays for putting it on shared storage
        assert task.delay(path=str(path)).get(timeout=timeout) == expected
        by_ref.append(time.perf_counter() - t0)
        path.unlink()
    meta = {"payload_bytes": size, "repeats": repeats}
    return Comparison(Measurement("naive: by value", "end-to-end latency", "s", by_value, meta=meta),
                      Measurement("fix: by reference", "end-to-end latency", "s", by_ref, meta=meta),
                      better="lower", title=f"end-to-end latency, {size_mb:g} MB payload")


# --------------------------------------------------------------------------- the ladder


class _ThrottledHandler(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        nas = self.server.owner
        path = nas.root / self.path.lstrip("/")
        if not path.is_file() or nas.root not in path.resolve().parents:
            self.send_error(404)
            return
        time.sleep(nas.latency)  # the per-request budget: network round trips, NAS protocol, its disk
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        start = time.perf_counter()
        for off in range(0, len(body), nas.chunk):
            self.wfile.write(body[off:off + nas.chunk])
            # never faster than the bandwidth budget: byte k leaves no earlier than k / bandwidth
            ahead = (off + nas.chunk) / nas.bandwidth - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)


class EmulatedNAS(LoopbackServer):
    """An *emulated* network share: an HTTP server on 127.0.0.1 with a latency and bandwidth budget.

    Each GET waits ``latency`` seconds (the round trips of a real NAS protocol
    plus its own disk), then streams the file no faster than ``bandwidth``
    bytes/s. The defaults stand for gigabit Ethernet (about 110 MB/s of
    payload) and 2 ms per request. It runs in a thread of the calling process;
    use it as a context manager.
    """

    thread_name = "emulated-nas"

    def __init__(self, root: str | Path, *, latency: float = 0.002, bandwidth: float = 110e6,
                 chunk: int = 65_536) -> None:
        super().__init__()
        self.root = Path(root).resolve()
        self.latency, self.bandwidth, self.chunk = latency, bandwidth, chunk

    def handler(self) -> type[QuietHandler]:
        return _ThrottledHandler


def _time_tiers(tiers: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each tier; tiers take turns, so a busy moment hits all of them."""
    for fn in tiers.values():
        fn()  # warm up: page cache, connection, allocator
    samples: dict[str, list[float]] = {name: [] for name in tiers}
    for _ in range(repeats):
        for name, fn in tiers.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return samples


@shared_task(name="locality.ladder_probe")
def ladder_probe(key: str, nas_url: str, size: int, repeats: int) -> dict[str, list[float]]:
    """Inside a worker: time reading the same ``size`` bytes from each tier."""
    r = redis_client()
    data = r.get(key)
    assert data is not None and len(data) == size
    in_memory = bytearray(data)
    path = local_dir() / f"ladder-{os.getpid()}.dat"
    path.write_bytes(data)

    def from_file() -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    def from_nas() -> bytes:
        with urllib.request.urlopen(nas_url, timeout=30) as resp:
            return resp.read()

    tiers = {
        "memory": lambda: bytes(in_memory),  # a private copy of bytes already in RAM
        "local file": from_file,  # the page cache, through open/read/close
        "Redis (loopback)": lambda: r.get(key),  # a round trip over TCP to another process
        "emulated NAS": from_nas,
    }
    try:
        out = _time_tiers(tiers, repeats)
        assert from_nas() == data and from_file() == data
    finally:
        path.unlink(missing_ok=True)
    return out


def ladder(cluster: LocalCluster, *, size: int = 262_144, repeats: int = 30, latency: float = 0.002,
           bandwidth: float = 110e6, timeout: float = 120) -> list[Measurement]:
    """Read the same ``size`` bytes from memory, a local file, Redis and an emulated NAS, in a worker.

    Returns one Measurement per tier (seconds per read, median of ``repeats``).
    """
    data = payload(2, size)
    shared = Path(cluster.run_dir) / "shared" / "locality-nas"
    shared.mkdir(parents=True, exist_ok=True)
    name = f"ladder-{uuid.uuid4().hex[:6]}.dat"
    (shared / name).write_bytes(data)
    key = f"locality:ladder:{name}"
    r = cluster.redis_client()
    try:
        r.set(key, data)
        with EmulatedNAS(shared, latency=latency, bandwidth=bandwidth) as nas:
            res = cluster.task(ladder_probe).delay(key, f"{nas.url}/{name}", size, repeats)
            samples = res.get(timeout=timeout)
    finally:
        r.delete(key)
        r.close()
    meta = {"bytes": size, "repeats": repeats, "nas_latency_s": latency, "nas_bandwidth_Bps": bandwidth}
    return [Measurement(tier, "read time", "s", values, meta=dict(meta)) for tier, values in samples.items()]


SMALL_READ = 256 * 1024  # up to this size a read from memory is clearly cheaper than one from the page cache


def ordered(measurements: list[Measurement]) -> bool:
    """Are the medians strictly increasing in the given order?"""
    medians = [statistics.median(m.values) for m in measurements]
    return all(a < b for a, b in zip(medians, medians[1:], strict=False))


@claim("closer is faster: memory and the local disk beat Redis over loopback (and memory beats the disk for small reads)")
def closer_is_faster(tiers: list[Measurement]) -> None:
    """Median read times of the measured rungs, in the order given; the emulated NAS is left out.

    A local file read from the page cache is one more copy of bytes already
    in memory, so for reads above :data:`SMALL_READ` memory and file may tie:
    then only ``local file < Redis`` and ``memory < Redis`` are checked.
    """
    by_label = {t.label: t for t in tiers}
    rungs = [label for label in by_label if label in ("memory", "local file", "Redis (loopback)")]
    size = tiers[0].meta["bytes"]
    pairs = [(a, b) for i, a in enumerate(rungs) for b in rungs[i + 1:]
             if size <= SMALL_READ or {a, b} != {"memory", "local file"}]
    slower = [f"{a} !< {b}" for a, b in pairs if not by_label[a].median < by_label[b].median]
    verify(f"{' < '.join(rungs)} (median read time, {size:,} bytes)", len(rungs) == 3 and not slower,
           **{label: by_label[label].median for label in rungs}, out_of_order=", ".join(slower) or "none")
