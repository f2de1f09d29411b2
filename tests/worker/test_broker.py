"""The queue topology and the broker settings (``lightning_lora.worker.broker``).

The platform backend's own declaration (``queue_declare(queue=..., durable=True)``) works before
or after the worker's; a queue declared with other arguments is named; the settings read from the
environment never show the password. Against the real broker (``RABBITMQ_HOST`` or 127.0.0.1).
"""

from __future__ import annotations

import pytest

from lightning_lora.clients.contract import COMPLETE_PATH
from lightning_lora.worker.broker import BrokerSettings, TopologyError, declare_topology
from lightning_lora.worker.consumer import Consumer
from lightning_lora.worker.deliveries import Outcome
from tests.support.broker import channel, depth, running, wait_for
from tests.support.worker_stack import _guide_declare, _guide_publish, _job, _wait_terminal, _worker


@pytest.mark.slow
@pytest.mark.parametrize("first", ["backend", "worker"])
def test_the_backends_plain_declaration_works_in_either_order(stack, first: str) -> None:
    receiver, broker = stack["receiver"], stack["broker"]
    worker = _worker(stack, "trainer.max_epochs=1")
    consumer = Consumer(broker, worker.handle, poll_interval=0.2)
    if first == "backend":
        _guide_declare(broker.queue)
    with running(consumer):  # the worker declares (or finds) the queue
        _guide_declare(broker.queue)  # the backend's declaration never fails afterwards
        _guide_publish(broker, _job(stack, 301))
        done = _wait_terminal(receiver, 301)
        assert wait_for(lambda: depth(broker.queue) == 0, 30)
    assert done.path == COMPLETE_PATH, done.json
    _guide_declare(broker.queue)  # and still not after the worker is gone


def test_topology_mismatch_is_reported(settings: BrokerSettings) -> None:
    settings = settings.replace(queue_type="quorum")  # the opt-in type, against a plain queue
    with channel() as ch:
        ch.queue_declare(settings.queue, durable=True)  # a classic queue without arguments
    consumer = Consumer(settings, lambda d: Outcome.ACK)
    with pytest.raises(TopologyError, match=settings.queue):
        consumer.run()
    with channel() as ch, pytest.raises(TopologyError, match="x-dead-letter"):
        declare_topology(ch, settings)


def test_settings_from_env_hide_the_password() -> None:
    env = {
        "RABBITMQ_URL": "amqp://alice:s3cr3t@mq.example:5673/prod",
        "RABBITMQ_DELIVERY_LIMIT": "5",
    }
    settings = BrokerSettings.from_env(env)
    assert (settings.host, settings.port, settings.user, settings.vhost) == (
        "mq.example",
        5673,
        "alice",
        "prod",
    )
    assert settings.delivery_limit == 5 and settings.dlq == "model_training.dlq"
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in settings.describe()
    plain = BrokerSettings.from_env({"RABBITMQ_HOST": "rabbit", "RABBITMQ_PASSWORD": "pw"})
    assert plain.host == "rabbit" and plain.password.get_secret_value() == "pw"
    assert "pw" not in repr(plain) and "pw" not in repr(plain.password)
    with pytest.raises(ValueError, match="RABBITMQ_PORT"):
        BrokerSettings.from_env({"RABBITMQ_PORT": "abc"})
