"""Pytest fixtures for real local network services.

Load with ``pytest_plugins = ["tests.support.fixtures"]`` in the root ``conftest.py``.

* ``webhook_receiver`` (function scope): a started
  :class:`~tests.support.receiver.WebhookReceiver`, stopped after the test.
* ``moto_s3`` (session scope): a started :class:`~tests.support.s3.MotoS3Server`; no bucket,
  no environment changes.
* ``s3_bucket`` (function scope): the name of a fresh, empty bucket on ``moto_s3``.
* ``s3_env`` (function scope): sets ``S3_ENDPOINT_URL``, ``S3_BUCKET`` (the fresh bucket) and
  fake AWS credentials through ``monkeypatch`` and yields an
  :class:`~lightning_lora.clients.storage.S3Storage` built from that environment.

boto3 and moto are imported only when an S3 fixture is used, so other tests do not pay for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.support.receiver import WebhookReceiver

if TYPE_CHECKING:
    from lightning_lora.clients.storage import S3Storage
    from tests.support.s3 import MotoS3Server

_AWS_VARS_TO_CLEAR = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
)


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A running webhook receiver on 127.0.0.1 (stopped after the test)."""
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3Server]:
    """moto's S3 server on 127.0.0.1, shared by the whole session."""
    from tests.support.broker import require_service

    try:
        from tests.support.s3 import start_moto_server
    except ImportError as exc:  # moto[server] is a test extra
        require_service(False, f"moto's S3 server is not installed ({exc}); pip install -e .[test]")
        raise
    server = start_moto_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_s3: MotoS3Server) -> str:
    """A fresh, empty bucket on the moto server."""
    return moto_s3.create_bucket()


@pytest.fixture
def s3_env(
    moto_s3: MotoS3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[S3Storage]:
    """Point the S3 environment at moto (fake keys, fresh bucket) and yield an ``S3Storage``."""
    from lightning_lora.clients.storage import S3Storage
    from tests.support.s3 import fake_aws_env

    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in fake_aws_env(moto_s3.endpoint_url, s3_bucket).items():
        monkeypatch.setenv(name, value)
    yield S3Storage.from_env(retry_budget_s=2, connect_timeout_s=2, read_timeout_s=10)
