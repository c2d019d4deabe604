"""RabbitMQ as the broker, on real Erlang VMs: start, ready, kill, restart, teardown, a 3-node cluster.

One single-node cluster, started in the background (``start_soon``), serves
the module: a node takes seconds to boot. The three-node cluster is started
once for the whole suite, by ``tests/lessons/test_single_points.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from labkit import LocalCluster, ServiceError, Status, attach
from labkit.lessons.welcome import add
from labkit.poll import poll_until
from labkit.services.base import labkit_processes
from labkit.services.rabbitmq import epmd_names, stray_erlang

pytestmark = pytest.mark.cluster

ERLANG = ("beam.smp", "epmd", "erl_child_setup", "inet_gethost")


def erlang_of(cluster_id: str) -> list[psutil.Process]:
    out = []
    for p in labkit_processes(cluster_id):
        try:
            if p.name() in ERLANG:
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.fixture(scope="module")
def rabbit():
    c = LocalCluster(workers=1, zookeeper=0, broker="rabbitmq", reuse=False, start=False)
    try:
        t0 = time.monotonic()
        assert c.start_soon() is c
        c.background_returned_in = time.monotonic() - t0
        c.state_after_start_soon = c.state
        assert c.start() is c
        yield c
    finally:
        c.close()
    assert not stray_erlang(c.id), "an Erlang process of the cluster survived close()"


def test_start_soon_boots_in_the_background_and_start_waits_for_it(rabbit):
    assert rabbit.background_returned_in < 1.0 and rabbit.state_after_start_soon in (Status.NEW, Status.STARTING)
    assert rabbit.state == Status.RUNNING


def test_a_task_travels_through_rabbitmq_and_its_result_through_redis(rabbit):
    assert rabbit.broker_url.startswith("pyamqp://") and rabbit.redis_url.startswith("redis://")
    assert rabbit.task(add).delay(2, 3).get(timeout=20) == 5
    stats = rabbit.app.control.inspect(destination=[rabbit.workers["w1"].hostname], timeout=2).stats()
    broker = next(iter(stats.values()))["broker"]
    assert broker["transport"] == "amqp" and broker["port"] == rabbit.rabbitmq_nodes[0].port, broker
    assert rabbit.app.backend.__class__.__name__ == "RedisBackend"


def test_the_node_uses_the_kits_epmd_and_binds_loopback_only(rabbit):
    node, epmd = rabbit.rabbitmq_nodes[0], rabbit.rabbitmq.epmd
    assert node.node.split("@")[0] in epmd_names(epmd.port)
    assert epmd.port != 4369
    epmds = [p for p in erlang_of(rabbit.id) if p.name() == "epmd"]
    assert [p.pid for p in epmds] == [epmd.pid], "one epmd per cluster: the kit's own, no -daemon copy"
    assert "-daemon" not in epmds[0].cmdline()
    beam = psutil.Process(node.pid)
    listening = {(c.laddr.ip, c.laddr.port) for c in beam.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    assert {node.port, node.dist_port} <= {port for _, port in listening}
    cookie = node.home / ".erlang.cookie"
    assert oct(cookie.stat().st_mode & 0o777) == "0o400", "the cookie is the key to the node: owner-only"
    assert node.cookie not in " ".join(beam.cmdline())


def test_status_and_html_repr_show_the_broker(rabbit):
    kinds = {s["name"]: s["kind"] for s in rabbit.status()}
    assert kinds["rabbit"] == "rabbitmq" and kinds["epmd"] == "epmd"
    assert rabbit.broker_url in rabbit._repr_html_()
    state = json.loads((rabbit.run_dir / "cluster.json").read_text())
    assert state["broker_url"] == rabbit.broker_url


def test_kill_and_restart_the_node_keeps_durable_messages(rabbit):
    """Unlike Redis without the append-only file, a restarted RabbitMQ keeps a durable queue's persistent messages.

    Once confirmed, that is: a persistent message is confirmed after it is on disk.
    """
    with rabbit.app.connection_for_write(transport_options={"confirm_publish": True}) as conn:
        rabbit.task(add).apply_async((1, 1), queue="parked", ignore_result=True, connection=conn)  # nobody serves it
    node = rabbit.rabbitmq_nodes[0]
    port = node.port
    rabbit.kill("rabbit")
    assert node.observed_state() == Status.KILLED and not node.alive()
    rabbit.restart("rabbit")
    assert node.port == port and node.state == Status.RUNNING
    with rabbit.app.connection_for_read() as conn:
        _, waiting, _ = conn.default_channel.queue_declare("parked", passive=True)
    assert waiting == 1
    assert rabbit.task(add).delay(4, 5).get(timeout=30) == 9, "the worker reconnected after the restart"


def test_the_management_plugin_starts_on_demand(rabbit):
    url = rabbit.add_management()
    assert url.startswith("http://127.0.0.1:") and url in rabbit._repr_html_()
    queues = {q["name"] for q in rabbit.rabbitmq_nodes[0].api("/api/queues")}
    assert "celery" in queues


def test_the_broker_choice_reaches_every_celery_process(rabbit):
    """Workers, beats and Flower are told the broker's URL; Flower serves its API off RabbitMQ."""
    beat = rabbit.add_beat()
    flower = rabbit.add_flower()
    try:
        # a worker forked by the launcher shows the launcher's environment in /proc: ask it instead
        w1 = rabbit.workers["w1"].hostname
        stats = rabbit.app.control.inspect(destination=[w1], timeout=2).stats()[w1]
        assert (stats["broker"]["transport"], stats["broker"]["port"]) == ("amqp", rabbit.rabbitmq_nodes[0].port)
        for service in (beat, flower):
            env = psutil.Process(service.pid).environ()
            assert env["LABKIT_BROKER_URL"] == rabbit.broker_url, service.name
            assert env["LABKIT_REDIS_URL"] == rabbit.redis_url, service.name
        workers = json.loads(flower.get("/api/workers?refresh=1"))
        assert rabbit.workers["w1"].hostname in workers
    finally:
        rabbit.remove_beat("beat")
        flower.stop()
        del rabbit.flowers["flower"]


def test_attach_to_a_rabbitmq_cluster(rabbit, monkeypatch):
    monkeypatch.setenv("LABKIT_REDIS_URL", rabbit.redis_url)
    monkeypatch.setenv("LABKIT_BROKER_URL", rabbit.broker_url)
    with attach() as other:
        assert other.broker_url == rabbit.broker_url
        assert other.task(add).delay(20, 22).get(timeout=20) == 42


def test_a_worker_relay_cuts_the_broker_link_only(rabbit):
    w = rabbit.add_worker("rw", relay=True, queues=["relayed"])
    try:
        assert w.broker_url != rabbit.broker_url and w.redis_url == rabbit.redis_url
        assert rabbit.task(add).apply_async((1, 2), queue="relayed").get(timeout=20) == 3
    finally:
        rabbit.remove_worker("rw")


OWNER = """
import json, time
from labkit import LocalCluster
c = LocalCluster(workers=0, zookeeper=0, broker="rabbitmq", reuse=False)
print(json.dumps({"id": c.id}), flush=True)
time.sleep(600)
"""


def _hold_remote_control_queue(cluster: LocalCluster, worker: str):
    """Declare ``worker``'s pidbox queue exclusive on a connection of our own, as a dead node's connection does."""
    from kombu import Connection  # noqa: PLC0415

    conn = Connection(cluster.broker_url)
    conn.channel().queue_declare(queue=f"{worker}@{cluster.id}.celery.pidbox", exclusive=True, auto_delete=True)
    return conn


def test_a_worker_waits_while_its_remote_control_queue_is_held(rabbit):
    """The kit's cluster consumer declares again until the holder lets go (a node death's race, made certain)."""
    settings = {**rabbit.settings, "worker_consumer": "labkit.quorum:Consumer"}
    hold = _hold_remote_control_queue(rabbit, "waits")
    timer = threading.Timer(1.5, hold.release)
    timer.start()
    try:
        rabbit.add_worker("waits", env={"LABKIT_SETTINGS": json.dumps(settings)})
        assert rabbit.ping()["waits"], "the worker did not answer a control ping once its queue was free"
        assert "RESOURCE_LOCKED" in rabbit.logs("waits", 400), "the worker did not meet the locked queue"
    finally:
        timer.join()
        rabbit.remove_worker("waits")


def test_without_the_wait_a_held_remote_control_queue_kills_the_worker(rabbit):
    """The negative control: Celery's own consumer calls the 405 unrecoverable and the worker exits."""
    hold = _hold_remote_control_queue(rabbit, "stock")
    try:
        with pytest.raises(ServiceError, match="RESOURCE_LOCKED"):
            rabbit.add_worker("stock", env={"LABKIT_SETTINGS": json.dumps(rabbit.settings)})
    finally:
        hold.release()
        if "stock" in rabbit.workers:
            rabbit.remove_worker("stock")


def test_sigkill_of_the_owner_leaves_no_erlang_process():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(owner.stdout.readline())
        names = {p.name() for p in erlang_of(info["id"])}
        assert {"beam.smp", "epmd"} <= names, names
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        poll_until(lambda: not labkit_processes(info["id"]), 10, 0.2)
        left = labkit_processes(info["id"])
        assert not left, f"alive 10 s after the owner was SIGKILLed: {[(p.pid, p.name()) for p in left]}"
    finally:
        owner.kill()
        owner.wait()


def test_closing_during_a_background_start_leaves_nothing():
    c = LocalCluster(workers=0, zookeeper=0, broker="rabbitmq", reuse=False, start=False).start_soon()
    c.close()
    assert c.state == Status.CLOSED
    assert not labkit_processes(c.id)
