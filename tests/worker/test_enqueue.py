"""``lightning-lora-enqueue`` (``lightning_lora.worker.enqueue``) against the real broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_lora.worker.broker import BrokerSettings
from tests.support.broker import HOST, JOB, get


def test_enqueue_cli_validates_then_publishes(
    settings: BrokerSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_lora.worker.enqueue import main

    monkey_env = {"RABBITMQ_HOST": HOST, "RABBITMQ_QUEUE": settings.queue}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in monkey_env.items():
            mp.setenv(key, value)
        bad = main(["--style-id", "7", "--image-url", "file:///etc/passwd", "--webhook-url", "x"])
        assert bad == 2
        assert "image_urls.0" in capsys.readouterr().err
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps(JOB))
        assert main(["--file", str(job_file), "--num-epochs", "3", "--style-token", "a b"]) == 0
    message_id = capsys.readouterr().out.strip()
    fetched = get(settings.queue)
    assert fetched is not None
    properties, body = fetched
    assert properties.message_id == message_id
    assert json.loads(body) == {**JOB, "num_epochs": 3, "style_token": "a b"}
