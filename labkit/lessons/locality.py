"""Lesson 02: data locality — it is easy to forget where your data is.

Each worker of a :class:`~labkit.LocalCluster` has a private directory,
``cluster.workers[name].local_dir`` (``$LABKIT_LOCAL_DIR`` inside the worker),
standing in for the local disk of a separate host. The experiments:

* **1 file, 2 tasks.** Task A writes an intermediate file to its local disk and
  returns the path; task B, picked up by whichever worker is free, opens it.
  Whenever B lands on the other "host", the file is not there. Fixes, measured
  on the same pairs: route B to A's own node (Celery's ``worker_direct`` queue,
  chosen at run time from the hostname A reports), write to shared storage and
  pass the path, or pass small data by value.
* **By value vs by reference.** A multi-MB payload sent through Redis sits in
  the broker's memory until a worker takes it (``INFO memory``), and costs
  latency on the way; a path to shared storage costs a few hundred bytes.
* **The ladder** "memory > file system > NAS > carrier pigeon": the same bytes
  read from process memory, a local file, Redis over loopback, and an
  *emulated* NAS (:class:`EmulatedNAS`: an HTTP server in the notebook process
  that charges a fixed latency per request and sends at a fixed bandwidth).

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
from typing import Any

from celery import chain, shared_task

from labkit.app import local_dir, redis_client, worker_name
from labkit.loopback import LoopbackServer, QuietHandler
from labkit.measure import Measurement

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


def on_same_node(b_task, ref: dict[str, Any]):
    """Send step B to the worker that ran step A: its ``worker_direct`` queue, chosen at run time.

    With ``worker_direct = True`` every worker also consumes a queue named
    after its hostname (``w1@<cluster id>.dq2``); A reports its hostname.
    """
    from celery.utils.nodenames import worker_direct  # noqa: PLC0415

    return b_task.apply_async((ref,), queue=worker_direct(ref["hostname"]))


def pairs(cluster, n: int = 120, *, mode: str = "local", same_node: bool = False, size: int = 16_384,
          shared_dir: str | Path | None = None, queue: str | None = None, timeout: float = 60) -> Measurement:
    """Run ``n`` A -> B pairs; values are 1 per failed pair (B could not read A's result).

    ``same_node=False``: A and B form a chain on one queue, so B runs on
    whichever worker takes it. ``same_node=True``: B goes to the worker that
    ran A (:func:`on_same_node`; the cluster needs ``worker_direct``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if mode == "shared" and shared_dir is None:
        shared_dir = Path(cluster.run_dir) / "shared" / "locality"
    if shared_dir is not None:
        Path(shared_dir).mkdir(parents=True, exist_ok=True)
    a_task, b_task = cluster.task(extract), cluster.task(transform)
    opts = {"queue": queue} if queue else {}
    a_sigs = [a_task.s(i, size, mode, str(shared_dir or "")).set(**opts) for i in range(n)]
    if same_node:
        firsts = [sig.apply_async() for sig in a_sigs]
        seconds = [on_same_node(b_task, a.get(timeout=timeout)) for a in firsts]
    else:
        seconds = [chain(sig, b_task.s().set(**opts)).apply_async() for sig in a_sigs]
    failed, crossed, errors = [], 0, {}
    for i, b in enumerate(seconds):
        value = b.get(timeout=timeout, propagate=False)
        if b.failed():
            failed.append(1)
            errors[type(value).__name__] = errors.get(type(value).__name__, 0) + 1
            made_on = (firsts[i] if same_node else b.parent).get(timeout=timeout)["made_on"]
            read_on = (b.worker or "").split("@")[0]
        else:
            failed.append(0 if value["ok"] else 1)
            made_on, read_on = value["made_on"], value["read_on"]
        crossed += int(bool(made_on and read_on and made_on != read_on))
    label = {
        ("local", False): "naive: local file, B anywhere",
        ("local", True): "fix: same node (worker_direct)",
        ("shared", False): "fix: shared storage + path",
        ("value", False): "fix: small data by value",
    }.get((mode, same_node), f"{mode}, same_node={same_node}")
    return Measurement(label, "failed pairs", "pairs", failed, stat="sum",
                       meta={"pairs": n, "b_on_other_worker": crossed, "errors": errors,
                             "mode": mode, "same_node": same_node, "size": size})


def pairs_on_workers(cluster, n: int = 120, workers: int = 3, *, mode: str = "local",
                     same_node: bool = False) -> Measurement:
    """:func:`pairs` on ``workers`` temporary workers (one child each) sharing a private queue."""
    queue = f"locality-{uuid.uuid4().hex[:6]}"
    names = [f"{queue}-{k}" for k in range(workers)]
    try:
        for name in names:
            cluster.add_worker(name, queues=[queue], concurrency=1)
        m = pairs(cluster, n, mode=mode, same_node=same_node, queue=queue)
    finally:
        for name in names:
            if name in cluster.workers:
                cluster.remove_worker(name)
    m.meta["workers"] = workers
    return m


def locality_fixes(cluster, n: int = 120, size: int = 16_384) -> list[Measurement]:
    """The pitfall and the three fixes, each on the same ``n`` pairs."""
    return [
        pairs(cluster, n, mode="local", size=size),
        pairs(cluster, n, mode="local", same_node=True, size=size),
        pairs(cluster, n, mode="shared", size=size),
        pairs(cluster, n, mode="value", size=size),
    ]


# --------------------------------------------------------------------------- by value vs by reference


@shared_task(name="locality.digest")
def digest(data: str = "", path: str = "") -> str:
    """Consume a payload given by value (``data``) or by reference (``path``)."""
    raw = Path(path).read_bytes() if path else data.encode()
    return hashlib.sha256(raw).hexdigest()


PARKED = "locality-parked"  # a queue no worker consumes: messages wait in Redis


def _used_memory(r) -> int:
    return int(r.info("memory")["used_memory"])


def broker_memory(cluster, size_mb: float = 5.0, messages: int = 5) -> tuple[Measurement, Measurement]:
    """Broker memory per waiting message: the payload by value vs a path to it.

    Publishes ``messages`` copies to a queue nobody consumes, reads Redis's
    ``used_memory`` before and after, then drops the queue.
    """
    size = int(size_mb * 1_000_000)
    data = payload(0, size)
    shared = Path(cluster.run_dir) / "shared" / "locality"
    shared.mkdir(parents=True, exist_ok=True)
    path = shared / f"payload-{uuid.uuid4().hex[:6]}.dat"
    path.write_bytes(data)
    task = cluster.task(digest)
    r = cluster.redis_client()
    out = []
    try:
        for label, kwargs in (("naive: by value", {"data": data.decode()}),
                              ("fix: by reference", {"path": str(path)})):
            r.delete(PARKED)
            before = _used_memory(r)
            for _ in range(messages):
                task.apply_async(kwargs=kwargs, queue=PARKED)
            after = _used_memory(r)
            r.delete(PARKED)
            per_message = max(after - before, 1) / messages
            out.append(Measurement(label, "broker memory per waiting message", "bytes", [per_message],
                                   meta={"messages": messages, "payload_bytes": size,
                                         "used_memory_before": before, "used_memory_after": after}))
    finally:
        r.delete(PARKED)
        r.close()
    return out[0], out[1]


def latency(cluster, size_mb: float = 5.0, repeats: int = 5, timeout: float = 60) -> tuple[Measurement, Measurement]:
    """End-to-end seconds from "I have the bytes" to "a worker has digested them"."""
    size = int(size_mb * 1_000_000)
    data = payload(1, size)
    text = data.decode()
    shared = Path(cluster.run_dir) / "shared" / "locality"
    shared.mkdir(parents=True, exist_ok=True)
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
    return (Measurement("naive: by value", "end-to-end latency", "s", by_value, meta=meta),
            Measurement("fix: by reference", "end-to-end latency", "s", by_ref, meta=meta))


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


def ladder(cluster, size: int = 262_144, repeats: int = 30, *, latency: float = 0.002,
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


def ordered(measurements: list[Measurement]) -> bool:
    """Are the medians strictly increasing in the given order?"""
    medians = [statistics.median(m.values) for m in measurements]
    return all(a < b for a, b in zip(medians, medians[1:], strict=False))
