"""Redaction of every secret the worker holds: secret-named env vars, URL passwords, registered."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_lora.clients.redaction import (
    MASK,
    RedactingFilter,
    clear_registered_secrets,
    install_redaction,
    is_secret_env_name,
    redact,
    register_secret,
)
from tests.support.webhooks import TOKEN

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_registered_secrets() -> Iterator[None]:
    clear_registered_secrets()
    yield
    clear_registered_secrets()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HF_TOKEN", "hf_abcdefghijklmnop"),
        ("HUGGING_FACE_HUB_TOKEN", "hf_qrstuvwxyz0123"),
        ("MY_SERVICE_PASSWORD", "s3rv1ce-pw"),
        ("FOO_API_KEY", "foo-key-0987"),
        ("BAR_APIKEY", "bar-key-6543"),
        ("WEBHOOK_SIGNING_SECRET", "whsec_1234abcd"),
        ("DB_PASS", "db-pass-value"),
        ("SMTP_PASSWD", "smtp-passwd-1"),
        ("GITHUB_PRIVATE_KEY", "-----BEGIN KEY-----"),
        ("MINIO_ACCESS_KEY", "minio-access-1"),
        ("GCP_CREDENTIALS", '{"type":"service_account"}'),
        ("BASIC_AUTH", "admin:hunter22"),
        ("oauth_client_secret", "lower-case-name"),
        ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE123"),
    ],
)
def test_secret_looking_env_vars_are_masked(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    assert is_secret_env_name(name)
    monkeypatch.setenv(name, value)
    assert redact(f"failed: got {value}!") == f"failed: got {MASK}!"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HOME", "/home/worker-user"),
        ("PATH", "/usr/local/bin:/usr/bin"),
        ("TOKENIZERS_PARALLELISM", "false"),  # "TOKEN" is not a word part of it
        ("MAX_TOKENS", "1024"),
        ("GIT_AUTHOR_NAME", "Ada Lovelace"),
        ("COMPASS_HEADING", "north-east"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/etc/aws/credentials"),  # describes, not holds
        ("TOKEN_TTL_SECONDS", "3600"),
        ("AUTH_ENABLED", "true"),
    ],
)
def test_ordinary_env_vars_are_not_masked(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    assert redact(f"value {value} here") == f"value {value} here"


def test_real_home_and_path_are_not_masked() -> None:
    text = f"home={os.environ['HOME']} path={os.environ['PATH']}"
    assert redact(text) == text


def test_url_env_var_passwords_are_masked_raw_and_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:db%2Fpw%40x@db:5432/styles")
    monkeypatch.setenv("CACHE_SERVICE_URI", "redis://:cache-pw-77@redis:6379/0")
    assert redact("pw db%2Fpw%40x, decoded db/pw@x") == f"pw {MASK}, decoded {MASK}"
    assert redact("connect with cache-pw-77") == f"connect with {MASK}"
    assert redact("the host db:5432 and user app are kept") == (
        "the host db:5432 and user app are kept"
    )


def test_registered_secrets_are_masked() -> None:
    secret = "cli-given-token-31337"
    assert redact(f"token {secret}") == f"token {secret}"
    register_secret(secret)
    assert redact(f"token {secret}") == f"token {MASK}"
    # as it appears in a URL's query, percent-encoded
    register_secret("sign/secret+value=")
    assert redact("?sig=sign%2Fsecret%2Bvalue%3D") == f"?sig={MASK}"
    # a value read from a file with its newline is masked without it
    register_secret("file-token-abcdef\n")
    assert redact("file-token-abcdef used") == f"{MASK} used"
    clear_registered_secrets()
    assert redact(f"token {secret}") == f"token {secret}"


def test_short_values_are_never_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_TOKEN", "abc")
    register_secret("xyz")
    register_secret("")
    assert redact("abc xyz abcd") == "abc xyz abcd"


def test_longest_secret_is_masked_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("A_TOKEN", "part-secret")
    monkeypatch.setenv("B_TOKEN", "part-secret-and-more")
    assert redact("x part-secret-and-more y part-secret") == f"x {MASK} y {MASK}"


def test_environment_changes_are_seen_without_stale_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROTATING_TOKEN", "first-value-1")
    assert redact("first-value-1") == MASK
    monkeypatch.setenv("ROTATING_TOKEN", "second-value-2")  # same length, same variable count
    assert redact("first-value-1 second-value-2") == f"first-value-1 {MASK}"
    monkeypatch.delenv("ROTATING_TOKEN")
    assert redact("second-value-2") == "second-value-2"


def test_bearer_and_inline_url_passwords_still_masked() -> None:
    assert redact("Authorization: bearer abc.DEF-123") == f"Authorization: bearer {MASK}"
    assert redact("amqps://u:inline-pw@mq/vh") == f"amqps://u:{MASK}@mq/vh"
    assert redact(42) == "42"


def test_hf_token_in_a_log_record_is_masked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from lightning_lora.clients.redaction import RedactingFilter

    monkeypatch.setenv("HF_TOKEN", "hf_leakedInAFailureMessage")
    caplog.handler.addFilter(RedactingFilter())
    logging.getLogger("tests.redaction").error("hub said 401 for %s", "hf_leakedInAFailureMessage")
    assert "hub said 401 for ***" in caplog.text and "hf_leaked" not in caplog.text


def test_redact_is_fast_for_a_typical_environment() -> None:
    # Measured in a fresh interpreter so this test's monkeypatching cannot disturb it; a generous
    # bound (the measured figure is a few microseconds) so a loaded CI machine does not flake.
    code = (
        "import os, timeit\n"
        "for i in range(60): os.environ[f'SETTING_{i}'] = f'value-{i}-xxxxxxxx'\n"
        "os.environ['HF_TOKEN'] = 'hf_abcdefghijklmnopqrstu'\n"
        "os.environ['DATABASE_URL'] = 'postgres://u:dbpass123@db/x'\n"
        "from lightning_lora.clients.redaction import redact, register_secret\n"
        "register_secret('signing-secret-value')\n"
        "msg = 'job 42 failed (DOWNLOAD_FAILED): s3://bucket/styles/42/img_0001.png: denied'\n"
        "print(min(timeit.repeat(lambda: redact(msg), number=2000, repeat=5)) / 2000)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seconds = float(done.stdout.strip())
    assert seconds < 50e-6, f"redact() took {seconds * 1e6:.1f} µs per call"


def test_redact_masks_env_secrets_urls_and_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERNAL_API_TOKEN", "internal-token-1")
    monkeypatch.setenv("RABBITMQ_URL", "amqp://user:rabbit%40pw@mq:5672/")
    text = (
        "a internal-token-1 b; amqp://guest:guest-pw@host/vhost; Authorization: Bearer xyz.123;"
        " pw rabbit@pw; http://backend:8000/api"
    )
    assert redact(text) == (
        "a *** b; amqp://guest:***@host/vhost; Authorization: Bearer ***;"
        " pw ***; http://backend:8000/api"
    )


def test_redacting_filter_rewrites_records(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("INTERNAL_API_TOKEN", TOKEN)
    caplog.handler.addFilter(RedactingFilter())
    log = logging.getLogger("tests.redaction")
    try:
        raise RuntimeError(f"failed with {TOKEN}")
    except RuntimeError:
        log.exception("call with %s failed", TOKEN)
    assert "call with *** failed" in caplog.text and "failed with ***" in caplog.text
    assert TOKEN not in caplog.text


def test_install_redaction_is_idempotent() -> None:
    log = logging.getLogger("tests.install_redaction")
    handler = logging.NullHandler()
    log.addHandler(handler)
    try:
        first = install_redaction(log)
        assert install_redaction(log) is first
        assert handler.filters == [first] and log.filters == [first]
    finally:
        log.removeHandler(handler)
        log.removeFilter(first)
