"""RabbitMQ without running it: command line, environment, config, the library, argument checks."""

from __future__ import annotations

import pytest

from labkit.cluster import LocalCluster
from labkit.services.base import ServiceError
from labkit.services.rabbitmq import (
    EpmdService,
    RabbitMQService,
    _Atom,
    _erl_term,
    broker_settings,
    find_rabbitmq,
    needed_apps,
    rabbitmq_group,
)


def test_erlang_terms_for_the_config():
    term = _erl_term([(_Atom("rabbit"), [(_Atom("tcp_listeners"), [("127.0.0.1", 5)])])])
    assert term == "[{'rabbit', [{'tcp_listeners', [{\"127.0.0.1\", 5}]}]}]"
    assert _erl_term((True, 'a"b')) == '{true, "a\\"b"}'


def test_a_group_names_its_nodes_and_shares_epmd_and_cookie(tmp_path):
    one = rabbitmq_group(tmp_path, "lkx", 1)
    assert [n.name for n in one.nodes] == ["rabbit"] and one.nodes[0].seeds == []
    three = rabbitmq_group(tmp_path, "lky", 3, management=True)
    names = [n.node for n in three.nodes]
    assert names == [f"labkit-lky-rabbit{i}@localhost" for i in (1, 2, 3)]
    assert {n.epmd_port for n in three.nodes} == {three.epmd.port}
    assert len({n.cookie for n in three.nodes}) == 1
    assert [n.seeds for n in three.nodes] == [[], names[:1], names[:1]]  # the first node seeds the others
    assert three.url.count(";") == 2 and three.url.startswith("pyamqp://guest:guest@127.0.0.1:")
    assert all(n.management_port for n in three.nodes)


def test_the_node_is_started_without_the_script_and_without_epmd(tmp_path):
    node = rabbitmq_group(tmp_path, "lkz", 1).nodes[0]
    node.prepare()
    cmd = " ".join(node.command())
    assert "-sname labkit-lkz-rabbit@localhost" in cmd and "-start_epmd false" in cmd
    assert "inet_dist_use_interface {127,0,0,1}" in cmd
    assert f"inet_dist_listen_min {node.dist_port}" in cmd and "rabbitmq-server" not in cmd
    env = node.environment()
    assert env["ERL_EPMD_PORT"] == str(node.epmd_port) and env["RABBITMQ_NODE_IP_ADDRESS"] == "127.0.0.1"
    assert env["HOME"].startswith(str(tmp_path)) and env["RABBITMQ_LOGS"] == "-"
    config = node.advanced_config.read_text()
    assert f'{{"127.0.0.1", {node.port}}}' in config and "cluster_nodes" not in config
    assert (node.home / ".erlang.cookie").read_text() == node.cookie


def test_a_joining_node_lists_its_seed(tmp_path):
    node = rabbitmq_group(tmp_path, "lkj", 2).nodes[1]
    node.prepare()
    assert "'cluster_nodes', {['labkit-lkj-rabbit1@localhost'], 'disc'}" in node.advanced_config.read_text()


def test_the_library_links_only_what_rabbit_needs():
    install = find_rabbitmq()
    assert install is not None, "RabbitMQ is a system requirement: `make setup` installs it"
    apps = needed_apps(install.plugins)
    assert {"rabbit", "rabbit_common", "ra", "ranch"} <= set(apps)
    assert "rabbitmq_management" not in apps and "rabbitmq_mqtt" not in apps
    assert "rabbitmq_management" in needed_apps(install.plugins, ("rabbit", "rabbitmq_management"))


def test_missing_rabbitmq_names_the_remedy(tmp_path, monkeypatch):
    monkeypatch.setattr("labkit.services.rabbitmq.find_rabbitmq", lambda: None)
    node = RabbitMQService(name="rabbit", run_dir=tmp_path, epmd_port=1)
    with pytest.raises(ServiceError, match="apt-get install rabbitmq-server"):
        node.prepare()
    epmd = EpmdService(name="epmd", run_dir=tmp_path)
    monkeypatch.setattr("shutil.which", lambda _name: None)
    with pytest.raises(ServiceError, match="epmd"):
        epmd.prepare()


def test_quorum_settings_only_for_a_cluster():
    assert broker_settings(1) == {}
    three = broker_settings(3)
    assert three["task_default_queue_type"] == "quorum" == three["task_create_missing_queue_type"]
    assert three["broker_transport_options"] == {"confirm_publish": True}
    assert three["worker_consumer"] == "labkit.quorum:Consumer"


def test_the_quorum_consumer_is_celerys_without_delayed_delivery_and_with_a_waiting_control_step():
    from celery.worker.consumer import Consumer

    from labkit.quorum import CONTROL, DELAYED_DELIVERY, Control
    from labkit.quorum import Consumer as Quorum

    assert DELAYED_DELIVERY in Consumer.Blueprint.default_steps and CONTROL in Consumer.Blueprint.default_steps
    expected = ["labkit.quorum:Control" if s == CONTROL else s
                for s in Consumer.Blueprint.default_steps if s != DELAYED_DELIVERY]
    assert Quorum.Blueprint.default_steps == expected
    assert Control.name == "celery.worker.consumer.control.Control"  # what other steps' dependencies name


@pytest.mark.parametrize("kwargs, message", [
    ({"broker": "kafka"}, "broker must be one of"),
    ({"rabbitmq_nodes": 3}, "need broker='rabbitmq'"),
    ({"management": True}, "need broker='rabbitmq'"),
    ({"broker": "rabbitmq", "rabbitmq_nodes": 0}, "rabbitmq_nodes must be"),
    ({"broker": "rabbitmq", "rabbitmq_nodes": 3, "worker_options": {"relay": True}}, "one broker node"),
    ({"workers": [{"name": "rabbit2"}]}, "reserved"),
    ({"workers": [{"name": "epmd"}]}, "reserved"),
])
def test_bad_broker_arguments_are_rejected_before_anything_starts(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LocalCluster.check_options(**kwargs)
