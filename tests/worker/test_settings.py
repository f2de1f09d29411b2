"""The worker's settings: one table of environment variables, one bucket rule, checked at start.

Every problem is named (the setting, never its value), the broker's settings with the worker's
in one pass.
"""

from __future__ import annotations

import json

import pytest

from lightning_lora.clients.s3_names import bucket_problem
from lightning_lora.clients.storage import S3_ENV, S3Storage
from lightning_lora.worker import cli
from lightning_lora.worker.settings import LIST_ENV, WORKER_ENV, SettingsError, load_settings

REQUIRED = {"INTERNAL_API_TOKEN": "tok-settings", "WEBHOOK_ALLOWLIST": "backend:8000"}

BUCKETS = {
    "stylelicense-models": True,
    "my.bucket.v2": True,
    "abc": True,
    "192.168.10.20": False,  # an IP address
    "my.-bucket": False,  # an empty label
    "my-.bucket": False,
    "my..bucket": False,
    "-bucket": False,
    "ab": False,
    "Upper": False,
}


@pytest.mark.parametrize("bucket", sorted(BUCKETS))
def test_one_bucket_rule_for_the_settings_and_the_storage(bucket: str) -> None:
    valid = BUCKETS[bucket]
    assert (bucket_problem(bucket) is None) is valid
    if valid:
        assert load_settings({}, env={**REQUIRED, "S3_BUCKET": bucket}).s3_bucket == bucket
        assert S3Storage(bucket).bucket == bucket
        return
    with pytest.raises(SettingsError, match="S3_BUCKET"):
        load_settings({}, env={**REQUIRED, "S3_BUCKET": bucket})
    with pytest.raises(ValueError, match="invalid bucket"):
        S3Storage(bucket)


@pytest.mark.parametrize("bucket", ["192.168.10.20", "my.-bucket"])
def test_a_bucket_s3_would_refuse_stops_the_worker_with_exit_2(
    bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {**REQUIRED, "S3_BUCKET": bucket}.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["model=tiny", "--check"]) == cli.EXIT_BAD_SETTINGS
    err = capsys.readouterr().err
    assert "S3_BUCKET" in err and "Traceback" not in err


def test_every_variable_of_the_table_is_read() -> None:
    values = {
        "internal_api_token": "tok-from-env",
        "webhook_signing_secret": "whsec_c2VjcmV0",
        "s3_bucket": "from-env-bucket",
        "s3_endpoint_url": "http://minio:9000",
        "s3_retry_budget_s": "12.5",
        "metrics_port": "9100",
        "metrics_host": "0.0.0.0",
        "log_format": "json",
    }
    assert set(values) == set(WORKER_ENV)
    env = {WORKER_ENV[name][0]: value for name, value in values.items()}
    env.update({variable: f"from-{variable.lower()}" for variable in LIST_ENV.values()})
    settings = load_settings({"webhook_allowlist": ["config-host"]}, env=env)
    for name, value in values.items():
        got = getattr(settings, name)
        got = got.get_secret_value() if hasattr(got, "get_secret_value") else got
        assert str(got) == value, name
    assert settings.webhook_allowlist == ["config-host", "from-webhook_allowlist"]  # extends
    assert settings.allowed_buckets == ["from-s3_allowed_buckets"]


def test_the_endpoint_falls_back_to_aws_endpoint_url_in_both_readers() -> None:
    env = {**REQUIRED, "AWS_ENDPOINT_URL": "http://aws-style:9000"}
    assert S3_ENV["endpoint_url"] == ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
    assert load_settings({}, env=env).s3_endpoint_url == "http://aws-style:9000"
    assert S3Storage.from_env(env).endpoint_url == "http://aws-style:9000"
    env["S3_ENDPOINT_URL"] = "http://ours:9000"  # the first variable of the table wins
    assert load_settings({}, env=env).s3_endpoint_url == "http://ours:9000"
    assert S3Storage.from_env(env).endpoint_url == "http://ours:9000"


def test_a_bad_endpoint_is_named() -> None:
    with pytest.raises(SettingsError, match="S3_ENDPOINT_URL"):
        load_settings({}, env={**REQUIRED, "S3_ENDPOINT_URL": "minio:9000"})


@pytest.mark.slow
def test_settings_are_checked_and_named() -> None:
    ok = load_settings({}, {"INTERNAL_API_TOKEN": "tok-abc\n", "WEBHOOK_ALLOWLIST": "backend:8000"})
    assert ok.internal_api_token.get_secret_value() == "tok-abc"  # a secret file's newline
    assert "tok-abc" not in repr(ok) and "tok-abc" not in json.dumps(ok.public(), default=str)
    cases = {
        "INTERNAL_API_TOKEN": {"INTERNAL_API_TOKEN": "tok\nX-Evil: 1", "WEBHOOK_ALLOWLIST": "b"},
        "WEBHOOK_ALLOWLIST": {"INTERNAL_API_TOKEN": "t"},
        "S3_BUCKET": {"INTERNAL_API_TOKEN": "t", "WEBHOOK_ALLOWLIST": "b", "S3_BUCKET": "My_B"},
        "worker.max_total_bytes": {"INTERNAL_API_TOKEN": "t", "WEBHOOK_ALLOWLIST": "b"},
    }
    for name, env in cases.items():
        section = (
            {"limits": {"max_total_bytes": 10, "max_image_bytes": 20}} if "total" in name else {}
        )
        with pytest.raises(SettingsError, match=name):
            load_settings(section, env)


def test_broker_settings_are_checked_with_the_worker_settings_in_one_pass() -> None:
    from lightning_lora.worker.settings import SettingsError, load_settings

    env = {
        "RABBITMQ_PORT": "70000",
        "RABBITMQ_QUEUE_TYPE": "stream",
        "RABBITMQ_PASSWORD": "hunter2-broker",
    }
    with pytest.raises(SettingsError) as caught:
        load_settings({"webhook_allowlist": []}, env)
    message = str(caught.value)
    for name in ("INTERNAL_API_TOKEN", "WEBHOOK_ALLOWLIST", "RABBITMQ_PORT", "RABBITMQ_QUEUE_TYPE"):
        assert name in message
    assert "70000" not in message and "stream'" not in message and "hunter2" not in message

    env = {"INTERNAL_API_TOKEN": "tok", "RABBITMQ_URL": "amqp://bob:hunter2-url@mq:5679/v"}
    settings = load_settings({"webhook_allowlist": ["backend"]}, env)
    assert (settings.broker.host, settings.broker.port, settings.broker.user) == ("mq", 5679, "bob")
    assert "hunter2-url" in settings.secrets()  # the password, registered for redaction
    shown = repr(settings) + str(settings.public())
    assert "hunter2" not in shown and "amqp://bob@mq:5679/v" in shown
    assert settings.broker.replace(delivery_limit=7).delivery_limit == 7
    with pytest.raises(ValueError):
        settings.broker.replace(delivery_limit=0)  # copies are validated too
