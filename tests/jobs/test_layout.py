"""The bucket layout (``lightning_lora.jobs.layout``): every key the worker and its jobs write.

The final LoRA keys are the backend's contract and must stay exactly as they are; the others are
the fleet's own state, read by workers of other versions, so they are pinned too.
"""

from __future__ import annotations

import hashlib

import pytest

from lightning_lora.clients.image_types import local_image_name
from lightning_lora.jobs.layout import (
    OUTBOX_PREFIX,
    check_run_id,
    checkpoint_prefix,
    job_key_for,
    job_pointer_key,
    kohya_key,
    lease_key,
    model_key,
    outbox_key,
    outcome_key,
    run_id_for,
)


def test_key_helpers() -> None:
    assert model_key(7) == "models/style_7/lora_weights.safetensors"
    assert kohya_key(7) == "models/style_7/lora_kohya.safetensors"
    assert checkpoint_prefix(7) == "checkpoints/style_7/"
    with pytest.raises(ValueError, match="style_id"):
        model_key(-1)
    with pytest.raises(ValueError, match="run id"):
        checkpoint_prefix(7, "../x")
    assert local_image_name(3, "a/b/../.hidden name$.jpg") == "0003_hidden_name_.jpg"
    assert local_image_name(0, "x/" + "n" * 300 + ".png").endswith("n.png")
    assert len(local_image_name(0, "x/" + "n" * 300 + ".png")) == 105


def test_the_contract_and_state_keys_are_exact() -> None:
    assert model_key(42) == "models/style_42/lora_weights.safetensors"
    assert kohya_key(42) == "models/style_42/lora_kohya.safetensors"
    assert checkpoint_prefix(42, "run-1") == "checkpoints/style_42/run-1/"
    assert lease_key(42, "run-1") == "checkpoints/style_42/run-1/lease.json"
    assert outcome_key(42, "run-1") == "checkpoints/style_42/run-1/outcome.json"
    assert job_pointer_key(42, "sha-ab") == "checkpoints/style_42/_jobs/sha-ab.json"
    assert outbox_key(42, "run-1") == "outbox/style_42/run-1.json"
    assert outbox_key(42, "run-1").startswith(OUTBOX_PREFIX) and OUTBOX_PREFIX == "outbox/"
    # a run's own records sit in its checkpoint folder, apart from every other run's
    assert lease_key(42, "run-1").startswith(checkpoint_prefix(42, "run-1"))
    assert not lease_key(42, "run-10").startswith(checkpoint_prefix(42, "run-1"))
    assert model_key(2**63 - 1) == f"models/style_{2**63 - 1}/lora_weights.safetensors"


def test_a_message_id_that_can_be_a_key_is_the_job_key() -> None:
    assert job_key_for("run-7f3a.b_c", b"{}") == "run-7f3a.b_c"
    assert job_key_for("run-7f3a", b'{"style_id": 1}') == job_key_for("run-7f3a", b"other body")


@pytest.mark.parametrize("message_id", ["a/b", "..", ".", "id with spaces", "é", "x" * 81])
def test_any_other_message_id_is_hashed(message_id: str) -> None:
    key = job_key_for(message_id, b"{}")
    digest = hashlib.sha256(message_id.encode("utf-8")).hexdigest()[:32]
    assert key == f"mid-{digest}"
    assert check_run_id(key) == key
    assert job_key_for(message_id, b"another body") == key  # the id decides, not the body


@pytest.mark.parametrize("message_id", [None, ""])
def test_without_a_message_id_the_body_is_the_job_key(message_id: str | None) -> None:
    body = b'{"style_id": 7, "image_urls": ["s3://b/k.png"]}'
    key = job_key_for(message_id, body)
    assert key == "sha-" + hashlib.sha256(body).hexdigest()[:32]
    assert job_key_for(None, body) == key  # the same body published again: the same key
    assert job_key_for(None, body + b" ") != key


def test_run_ids_of_generations() -> None:
    assert run_id_for("sha-ab", 1) == "sha-ab"  # the first publication keeps the job key
    assert run_id_for("sha-ab", 2) == "sha-ab.g2"
    assert run_id_for("msg-1", 12) == "msg-1.g12"
    long_key = "k" * 80
    assert run_id_for(long_key, 1) == long_key
    second = run_id_for(long_key, 2)  # "kkk...k.g2" is 83 characters: hashed instead
    assert second == "run-" + hashlib.sha256(f"{long_key}.g2".encode()).hexdigest()[:32]
    assert second != run_id_for(long_key, 3) and check_run_id(second) == second
    for generation in (0, -1):
        with pytest.raises(ValueError, match="generation"):
            run_id_for("sha-ab", generation)


@pytest.mark.parametrize("run_id", ["", ".", "..", "a/b", "../x", "a b", "a\nb", "x" * 81, None, 5])
def test_invalid_run_ids_are_refused_by_every_key(run_id: object) -> None:
    with pytest.raises(ValueError, match="run id"):
        check_run_id(run_id)  # type: ignore[arg-type]
    keys = [outbox_key, job_pointer_key, lease_key, outcome_key]
    if run_id is not None:  # checkpoint_prefix(7, None) is the style's folder
        keys.append(checkpoint_prefix)
    for key in keys:
        with pytest.raises(ValueError, match="run id"):
            key(7, run_id)  # type: ignore[operator]
    assert check_run_id("A-z_0.9") == "A-z_0.9" and check_run_id("x" * 80) == "x" * 80


@pytest.mark.parametrize("style_id", [0, -1, 2**63, True, "7", 7.0, None])
def test_invalid_style_ids_are_refused_by_every_key(style_id: object) -> None:
    for key in (model_key, kohya_key, checkpoint_prefix):
        with pytest.raises((ValueError, TypeError), match="style_id"):
            key(style_id)  # type: ignore[arg-type]
    for key in (lease_key, outcome_key, outbox_key, job_pointer_key):
        with pytest.raises((ValueError, TypeError), match="style_id"):
            key(style_id, "run-1")  # type: ignore[arg-type]
