"""A webhook client with short timeouts and backoffs, for the client and sender tests."""

from __future__ import annotations

from lightning_lora.clients.webhook_client import WebhookClient
from tests.support.receiver import WebhookReceiver

TOKEN = "tok-5ecret-value-123"


def fast_client(receiver: WebhookReceiver, **overrides: object) -> WebhookClient:
    """A client with short timeouts and backoffs, suitable for tests."""
    options: dict[str, object] = {
        "token": TOKEN,
        "timeout_s": 2.0,
        "max_attempts": 4,
        "max_total_s": 10.0,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }
    options.update(overrides)
    return WebhookClient(receiver.base_url, **options)  # type: ignore[arg-type]
