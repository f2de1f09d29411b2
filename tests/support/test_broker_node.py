"""The private RabbitMQ node (tests.support.broker_node): restarts keep data, drop connections,
and leave the shared broker at 127.0.0.1:5672 untouched.

Run with ``-s`` to see how long start, stop and restart take.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pika
import pika.exceptions
import pytest

pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast

if TYPE_CHECKING:
    from tests.support.broker_node import BrokerNode

# the private_broker fixture (a no-op if the root conftest loads the plugin too). The module is
# imported lazily below, after pytest has loaded it as a plugin (with assertion rewriting).
pytest_plugins = ["tests.support.broker_node"]

SHARED_PORT = 5672
REPO = Path(__file__).resolve().parents[2]


def shared_node_identity() -> str | None:
    """Check the shared node is up; return ``{Node, OsPid}`` of it (None without rabbitmqctl).

    Runs the system ``rabbitmqctl`` with this process's own environment, i.e. against the
    default (shared) node, exactly as an operator would.
    """
    with pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", SHARED_PORT)) as conn:
        assert conn.is_open
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return None
    subprocess.run([ctl, "-q", "await_startup"], check=True, capture_output=True, timeout=60)
    result = subprocess.run(
        [ctl, "-q", "eval", "{node(), os:getpid()}."],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout.strip()


def publish(node: BrokerNode, queue: str, body: bytes, *, durable: bool) -> None:
    """Declare ``queue`` and publish one message with publisher confirms (so it is stored)."""
    with pika.BlockingConnection(node.connection_parameters()) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(queue, durable=durable)
        props = pika.BasicProperties(delivery_mode=2 if durable else 1)
        ch.basic_publish("", queue, body, properties=props, mandatory=True)


def get_one(node: BrokerNode, queue: str) -> tuple[pika.spec.BasicProperties, bytes] | None:
    with pika.BlockingConnection(node.connection_parameters()) as conn:
        method, props, body = conn.channel().basic_get(queue, auto_ack=True)
        return None if method is None else (props, body)


def queue_exists(node: BrokerNode, queue: str) -> bool:
    with pika.BlockingConnection(node.connection_parameters()) as conn:
        try:
            conn.channel().queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            assert exc.reply_code == 404
            return False
        return True


def assert_dropped(conn: pika.BlockingConnection) -> None:
    """The connection is dead: pika raises on the next operation."""
    with pytest.raises(pika.exceptions.AMQPError):
        conn.channel().queue_declare("", exclusive=True)
    assert not conn.is_open


def test_restart_keeps_durable_data_and_leaves_shared_node_alone(private_broker: BrokerNode):
    node = private_broker
    shared_before = shared_node_identity()

    assert node.port != SHARED_PORT
    assert node.dist_port not in (SHARED_PORT, 25672, node.port)
    assert node.node_name.startswith("lltest-")
    assert node.node_name.endswith("@localhost")
    if shared_before is not None:
        assert node.node_name not in shared_before
    assert node.node_name in node.rabbitmqctl("-q", "eval", "node().")

    durable_q, transient_q = f"lltest_durable_{uuid.uuid4().hex[:8]}", "lltest_transient"
    publish(node, durable_q, b"survives", durable=True)
    publish(node, transient_q, b"lost", durable=False)

    victim = pika.BlockingConnection(
        node.connection_parameters(client_properties={"connection_name": "lltest-victim"})
    )
    victim.channel()
    stop_s = node.stop()
    assert not node.running
    assert not node.beam_pids()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(node.connection_parameters())
    assert_dropped(victim)
    start_s = node.start()
    restart_s = node.restart(down_s=0.5)

    got = get_one(node, durable_q)
    assert got is not None, "persistent message in a durable queue was lost by the restart"
    props, body = got
    assert body == b"survives"
    assert props.delivery_mode == 2
    assert get_one(node, durable_q) is None
    assert not queue_exists(node, transient_q), "non-durable queue survived: no real restart?"

    assert shared_node_identity() == shared_before, "the shared node restarted"
    print(
        f"\nprivate node {node.node_name} port {node.port}: stop {stop_s:.2f}s, "
        f"start {start_s:.2f}s, restart {restart_s:.2f}s; all: "
        + ", ".join(f"{op} {s:.2f}s" for op, s in node.timings)
    )


def test_close_connections_and_crash(private_broker: BrokerNode):
    node = private_broker
    queue = f"lltest_crash_{uuid.uuid4().hex[:8]}"
    mine = pika.BlockingConnection(
        node.connection_parameters(client_properties={"connection_name": "lltest-worker-1"})
    )
    other = pika.BlockingConnection(
        node.connection_parameters(client_properties={"connection_name": "someone-else"})
    )
    names = {c["connection_name"] for c in node.connections()}
    assert {"lltest-worker-1", "someone-else"} <= names

    assert node.close_connections("worker") == 1
    assert_dropped(mine)
    assert other.is_open
    other.channel().queue_declare("", exclusive=True)

    # a crash (SIGKILL, no graceful shutdown): confirmed persistent messages still survive
    publish(node, queue, b"confirmed", durable=True)
    began = time.monotonic()
    node.kill()
    kill_s = time.monotonic() - began
    assert not node.beam_pids()
    assert_dropped(other)
    start_s = node.start()
    got = get_one(node, queue)
    assert got is not None and got[1] == b"confirmed"
    print(f"\nkill {kill_s:.2f}s, start after crash {start_s:.2f}s")


def test_missing_rabbitmq_skips_but_fails_on_ci(monkeypatch: pytest.MonkeyPatch):
    from tests.support import broker_node

    monkeypatch.setattr(broker_node, "find_rabbitmq_scripts", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        broker_node.require_rabbitmq()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        broker_node.require_rabbitmq()


@pytest.mark.slow
def test_no_beam_left_behind_when_the_test_process_dies():
    """Normal exit: the atexit hook stops the node. os._exit: the next fixture reaps it."""
    from tests.support import broker_node

    broker_node.require_rabbitmq()
    script = textwrap.dedent(
        """
        import os, sys
        from tests.support.broker_node import BrokerNode
        node = BrokerNode()
        node.start()
        print(node.node_name, node.dir, flush=True)
        if sys.argv[1] == "hard":
            os._exit(0)  # no atexit: the VM is left running, owned by a dead process
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    leftovers = {}
    for mode in ("clean", "hard"):
        result = subprocess.run(
            [sys.executable, "-c", script, mode],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        name, folder = result.stdout.split()
        leftovers[mode] = (name, Path(folder))

    name, folder = leftovers["clean"]
    assert not broker_node.node_beam_pids(name)
    assert not folder.exists()

    name, folder = leftovers["hard"]
    assert broker_node.node_beam_pids(name), "the os._exit run should have left its node running"
    assert broker_node.reap_orphans() >= 1
    assert not broker_node.node_beam_pids(name)
    assert not folder.exists()
