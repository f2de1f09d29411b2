"""Retry jitter (``lightning_lora.clients.backoff``): an RNG that training seeds never touch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_JITTER_PROBE = """
import json, lightning as L
from lightning_lora.clients.backoff import backoff_delay
from lightning_lora.worker.broker import BrokerSettings
from lightning_lora.worker.consumer import Consumer
from lightning_lora.worker.deliveries import Delivery, Outcome
from lightning_lora.clients.webhook_client import WebhookClient
L.seed_everything(5, verbose=False)
consumer = Consumer(BrokerSettings(), lambda d: None)
client = WebhookClient("http://127.0.0.1:9")
print(json.dumps([consumer._backoff_delay(3), client._backoff_s(3, None), backoff_delay(3, 1, 60)]))
"""


@pytest.mark.slow
def test_retry_jitter_differs_between_workers_with_the_same_training_seed() -> None:
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", _JITTER_PROBE],
                capture_output=True,
                text=True,
                check=True,
                timeout=120,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        for _ in range(2)
    ]
    for a, b in zip(*runs, strict=True):
        assert a != b  # the seeded global random would make them equal
