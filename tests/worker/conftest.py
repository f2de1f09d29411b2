"""Fixtures of the worker tests: the stack of real services a job touches, a fresh queue."""

from __future__ import annotations

import pytest

from lightning_lora.worker.broker import BrokerSettings
from tests.support.worker_stack import stack  # noqa: F401 (the fixture)


@pytest.fixture
def settings(broker_settings: BrokerSettings) -> BrokerSettings:
    return broker_settings
