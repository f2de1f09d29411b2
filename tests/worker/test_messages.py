"""Tests for lightning_lora.worker.messages (no broker needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lightning_lora.errors import InvalidMessageError
from lightning_lora.worker.messages import (
    TrainingJob,
    job_settings,
    parse_job,
    peek_identity,
    webhook_allowed,
)

VALID: dict[str, Any] = {
    "style_id": 42,
    "image_urls": ["s3://styles/42/a.png", "s3://styles/42/sub/b.jpg"],
    "webhook_url": "http://backend:8000",
}


def _body(**changes: Any) -> bytes:
    data = {**VALID, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not _DROP}).encode()


_DROP = object()


def test_valid_message_round_trip() -> None:
    job = parse_job(_body(num_epochs=5, captions=["a cat", "a dog"], style_token="sks"))
    assert job.style_id == 42
    assert job.image_urls == VALID["image_urls"]
    assert job.webhook_url == "http://backend:8000"
    assert job.num_epochs == 5
    assert job.captions == ["a cat", "a dog"]
    assert job.job_id == "style-42"
    again = parse_job(job.model_dump_json(exclude_none=True).encode())
    assert again == job


def test_explicit_job_id_and_caption_dict() -> None:
    job = parse_job(_body(job_id="job-7.a_b", captions={"a.png": "red"}))
    assert job.job_id == "job-7.a_b"
    assert job.captions == {"a.png": "red"}


HOSTILE: list[tuple[str, bytes, str]] = [
    ("not-utf8", b'{"style_id": 1, "x": "\xff\xfe"}', "UTF-8"),
    ("not-json", b"{style_id: 1", "not valid JSON"),
    ("nan", _body(learning_rate=float("nan")), "field 'learning_rate': not a finite number"),
    ("infinity", _body(seed=float("-inf")), "field 'seed': not a finite number (-inf)"),
    ("nested-nan", _body(captions={"a.png": float("nan")}), "field 'captions.a.png': not a finite"),
    ("duplicate-key", b'{"style_id": 1, "style_id": 2}', "field 'style_id': given more than once"),
    ("json-array", b"[1, 2]", "JSON object"),
    ("json-string", b'"hello"', "JSON object"),
    ("missing-style-id", _body(style_id=_DROP), "field 'style_id'"),
    ("style-id-string", _body(style_id="42"), "field 'style_id'"),
    ("style-id-bool", _body(style_id=True), "field 'style_id'"),
    ("style-id-negative", _body(style_id=-1), "field 'style_id'"),
    ("style-id-zero", _body(style_id=0), "field 'style_id'"),
    ("style-id-huge", _body(style_id=10**30), "field 'style_id'"),
    ("style-id-float", _body(style_id=4.0), "field 'style_id'"),
    ("no-images", _body(image_urls=[]), "field 'image_urls'"),
    ("too-many-images", _body(image_urls=[f"s3://bkt/{i}.png" for i in range(10_000)]), "too many"),
    ("image-urls-string", _body(image_urls="s3://bkt/a.png"), "field 'image_urls'"),
    ("file-url", _body(image_urls=["file:///etc/passwd"]), "field 'image_urls.0'"),
    ("metadata-url", _body(image_urls=["http://169.254.169.254/latest"]), "field 'image_urls.0'"),
    ("dotdot-key", _body(image_urls=["s3://bkt/ok.png", "s3://bkt/a/../../x"]), "image_urls.1"),
    ("absolute-key", _body(image_urls=["s3://bkt//etc/passwd"]), "field 'image_urls.0'"),
    ("empty-bucket", _body(image_urls=["s3:///key.png"]), "field 'image_urls.0'"),
    ("empty-key", _body(image_urls=["s3://bucket/"]), "field 'image_urls.0'"),
    ("control-char", _body(image_urls=["s3://bkt/a\n.png"]), "field 'image_urls.0'"),
    ("url-not-string", _body(image_urls=[3]), "field 'image_urls.0'"),
    ("megabyte-url", _body(image_urls=["s3://bkt/" + "a" * 900_000]), "field 'image_urls.0'"),
    ("megabyte-webhook", _body(webhook_url="http://h/" + "a" * 900_000), "field 'webhook_url'"),
    ("megabyte-body", _body(style_token="x" * 1_000_001), "bytes"),
    ("webhook-scheme", _body(webhook_url="ftp://backend/"), "field 'webhook_url'"),
    ("webhook-userinfo", _body(webhook_url="http://u:p@backend/"), "field 'webhook_url'"),
    ("unknown-field", _body(priority=1), "field 'priority': unknown field"),
    ("lr-too-big", _body(learning_rate=1.0), "field 'learning_rate'"),
    ("lr-string", _body(learning_rate="1e-4"), "field 'learning_rate'"),
    ("resolution-not-x8", _body(resolution=500), "field 'resolution'"),
    ("epochs-zero", _body(num_epochs=0), "field 'num_epochs'"),
    ("rank-huge", _body(lora_rank=4096), "field 'lora_rank'"),
    ("seed-negative", _body(seed=-1), "field 'seed'"),
    ("alpha-zero", _body(lora_alpha=0), "field 'lora_alpha'"),
    ("captions-mismatch", _body(captions=["only one"]), "field 'captions'"),
    ("caption-huge", _body(captions={"a.png": "x" * 500_000}), "field 'captions'"),
    ("style-token-long", _body(style_token="x" * 65), "field 'style_token'"),
    ("job-id-path", _body(job_id="../etc"), "field 'job_id'"),
]


@pytest.mark.parametrize(
    ("body", "expected"), [(b, e) for _, b, e in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
def test_hostile_messages_are_rejected(body: bytes, expected: str) -> None:
    with pytest.raises(InvalidMessageError) as info:
        parse_job(body)
    message = str(info.value)
    assert message.startswith("invalid message: ")
    assert expected in message
    assert len(message) < 2000  # never echoes huge values
    assert info.value.error_code == "INVALID_MESSAGE"


def test_several_errors_are_all_named() -> None:
    with pytest.raises(InvalidMessageError) as info:
        parse_job(_body(style_id="x", webhook_url=_DROP, extra=1))
    message = str(info.value)
    for name in ("style_id", "webhook_url", "extra"):
        assert f"field '{name}'" in message


def test_max_images_is_configurable() -> None:
    urls = [f"s3://bkt/{i}.png" for i in range(3)]
    assert len(parse_job(_body(image_urls=urls), max_images=3).image_urls) == 3
    with pytest.raises(InvalidMessageError, match="too many image URLs"):
        parse_job(_body(image_urls=urls), max_images=2)


def test_peek_identity() -> None:
    assert peek_identity(_body(image_urls="broken", extra=1)) == (42, "http://backend:8000")
    assert peek_identity(_body(style_id="42", webhook_url="ftp://x/")) == (None, None)
    assert peek_identity(_body(style_id=True)) == (None, "http://backend:8000")
    assert peek_identity(b"\xff not json") == (None, None)
    assert peek_identity(b"[42]") == (None, None)


@pytest.mark.parametrize(
    ("url", "allowlist", "allowed"),
    [
        ("http://backend:8000", ["backend"], True),
        ("https://backend/hooks", ["backend"], True),
        ("http://BACKEND:8000/x", ["backend"], True),
        ("http://backend:8000", ["backend:8000"], True),
        ("http://backend:8001", ["backend:8000"], False),
        ("http://backend", ["backend:80"], True),
        ("http://backend:8000/api", ["http://backend:8000"], True),
        ("https://backend:8000", ["http://backend:8000"], False),
        ("http://backend", ["http://backend:8000"], False),
        ("http://127.0.0.1:9000", ["127.0.0.1"], True),
        ("http://127.0.0.1:9000", ["localhost"], False),
        ("http://backend.evil.com", ["backend"], False),
        ("http://backend@evil.com", ["backend"], False),
        ("http://evil.com/?backend", ["backend"], False),
        ("http://evil.com/backend", ["backend"], False),
        ("http://evilbackend", ["backend"], False),
        ("http://backend:8000@evil.com", ["backend:8000"], False),
        ("http://evil.com#@backend", ["backend"], False),
        ("http://evil.com\\@backend", ["backend"], False),
        ("ftp://backend", ["backend"], False),
        ("http://backend:99999", ["backend"], False),
        ("http://backend", [], False),
        ("http://[::1]:8000", ["[::1]:8000"], True),
        ("http://backend:8000/hooks/x", ["http://backend:8000/hooks"], True),
        ("http://backend:8000/hooksevil", ["http://backend:8000/hooks"], False),
    ],
)
def test_webhook_allowlist(url: str, allowlist: list[str], allowed: bool) -> None:
    assert webhook_allowed(url, allowlist) is allowed


def _full_job(**changes: Any) -> TrainingJob:
    data = {
        **VALID,
        "num_epochs": 20,
        "learning_rate": 1e-4,
        "lora_rank": 8,
        "lora_alpha": 16,
        "resolution": 512,
        "seed": 4294967295,
        "style_token": "sks style",
        **changes,
    }
    return parse_job(json.dumps(data).encode())


def test_job_settings_are_the_numeric_fields_only() -> None:
    assert job_settings(parse_job(_body())) == {}
    values = job_settings(_full_job())
    assert values == {
        "trainer.max_epochs": 20,
        "module.optimizer.lr": pytest.approx(1e-4),
        "lora.rank": 8,
        "lora.alpha": 16.0,
        "data.resolution": 512,
        "seed": 4294967295,
    }
    # text from a message never becomes a config value (it goes to caption files as text)
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in values.values())
    assert "data.token" not in values


@pytest.mark.parametrize(
    "url",
    ["s3://My_Bucket/a.png", "s3://ab/a.png", "s3://192.168.0.1/a.png", "s3://bkt/dir/", "S3:/x"],
)
def test_message_urls_follow_the_same_rules_as_downloads(url: str) -> None:
    from lightning_lora.clients.s3_names import parse_s3_url

    with pytest.raises(InvalidMessageError, match=r"field 'image_urls\.0'"):
        parse_job(_body(image_urls=[url]))
    with pytest.raises(InvalidMessageError, match="invalid S3 URL"):
        parse_s3_url(url)


@pytest.mark.parametrize(
    ("style_id", "valid"),
    [
        (1, True),
        (2**63 - 1, True),
        (0, False),
        (-1, False),
        (2**63, False),
        (True, False),
        (4.0, False),
        ("7", False),
    ],
)
def test_one_style_id_rule_for_the_schema_the_payloads_and_the_keys(
    style_id: object, valid: bool
) -> None:
    from lightning_lora.clients.contract import complete_payload, failed_payload
    from lightning_lora.jobs.layout import model_key, outbox_key

    metadata = {"training_epochs": 1, "lora_rank": 16, "lora_alpha": 32}
    checks = {
        "schema": lambda: parse_job(_body(style_id=style_id)),
        "complete": lambda: complete_payload(style_id, "s3://b/k", metadata),
        "failed": lambda: failed_payload(style_id, "boom", "TRAINING_FAILED"),
        "model key": lambda: model_key(style_id),
        "outbox key": lambda: outbox_key(style_id, "run-1"),
    }
    outcomes = {}
    for name, check in checks.items():
        try:
            check()
            outcomes[name] = True
        except (TypeError, ValueError, InvalidMessageError):
            outcomes[name] = False
    outcomes["peek"] = peek_identity(_body(style_id=style_id))[0] is not None
    assert outcomes == dict.fromkeys(outcomes, valid)


def test_the_identity_of_a_python_json_body_is_recovered() -> None:
    """``json.dumps`` writes ``NaN``/``Infinity``: the failure report must still find its way."""
    body = _body(learning_rate=float("nan"), seed=float("inf"))
    assert b"NaN" in body and b"Infinity" in body
    assert peek_identity(body) == (VALID["style_id"], VALID["webhook_url"])
    repeated = b'{"style_id": 1, "style_id": 7, "webhook_url": "http://backend:8000"}'
    assert peek_identity(repeated) == (7, "http://backend:8000")  # the last value wins
