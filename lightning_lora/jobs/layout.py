"""The bucket layout: run ids, job keys and every S3 key the worker and its jobs write.

The final LoRA keys are the backend contract; everything else is the worker's own state:

* ``models/style_{id}/lora_weights.safetensors``: the final LoRA, diffusers format (contract);
* ``models/style_{id}/lora_kohya.safetensors``: the same LoRA in kohya format;
* ``checkpoints/style_{id}/{run_id}/epochEEEE-stepSSSSSS.ckpt``: a run's training checkpoints;
* ``checkpoints/style_{id}/{run_id}/lease.json``: which worker runs the run now (conditional
  writes, renewed while training);
* ``checkpoints/style_{id}/{run_id}/outcome.json``: the run's terminal webhook, created once
  (``If-None-Match: *``); whoever creates it is the one worker that reports the run;
* ``checkpoints/style_{id}/_jobs/{job_key}.json``: the newest run (generation) of a job key, so
  a redelivery finds its run and a new publication of the same body starts a new one;
* ``checkpoints/style_{id}/_cancel.json``: the style's newest cancel (which of its runs it stops);
* ``outbox/style_{id}/{run_id}.json``: a terminal webhook not yet acknowledged by the backend.
"""

from __future__ import annotations

import hashlib
import re

from lightning_lora.clients.contract import check_style_id

__all__ = [
    "OUTBOX_PREFIX",
    "cancel_key",
    "check_run_id",
    "checkpoint_prefix",
    "job_key_for",
    "job_pointer_key",
    "kohya_key",
    "lease_key",
    "model_key",
    "outbox_key",
    "outcome_key",
    "run_id_for",
]

RUN_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,80}")
OUTBOX_PREFIX = "outbox/"
_JOBS_FOLDER = "_jobs"


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it can be a key segment: ``[A-Za-z0-9._-]{1,80}``, not ``.``/``..``.

    Raises:
        ValueError: Otherwise.
    """
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or run_id in {".", ".."}:
        raise ValueError(f"run id {run_id!r} must match [A-Za-z0-9._-]{{1,80}}")
    return run_id


def model_key(style_id: int) -> str:
    """The final LoRA (contract): ``models/style_{id}/lora_weights.safetensors``."""
    return f"models/style_{check_style_id(style_id)}/lora_weights.safetensors"


def kohya_key(style_id: int) -> str:
    """The kohya-format LoRA: ``models/style_{id}/lora_kohya.safetensors``."""
    return f"models/style_{check_style_id(style_id)}/lora_kohya.safetensors"


def checkpoint_prefix(style_id: int, run_id: str | None = None) -> str:
    """A style's checkpoint folder, or one run's: ``checkpoints/style_{id}/[{run_id}/]``.

    Checkpoints are kept per run, so a new job for the same style never resumes an older job.
    """
    base = f"checkpoints/style_{check_style_id(style_id)}/"
    return base if run_id is None else f"{base}{check_run_id(run_id)}/"


def lease_key(style_id: int, run_id: str) -> str:
    """The run's lease object."""
    return checkpoint_prefix(style_id, check_run_id(run_id)) + "lease.json"


def outcome_key(style_id: int, run_id: str) -> str:
    """The run's terminal outcome, created once."""
    return checkpoint_prefix(style_id, check_run_id(run_id)) + "outcome.json"


def job_pointer_key(style_id: int, job_key: str) -> str:
    """The record of a job key's newest generation."""
    return f"{checkpoint_prefix(style_id)}{_JOBS_FOLDER}/{check_run_id(job_key)}.json"


def cancel_key(style_id: int) -> str:
    """The style's newest cancel record."""
    return f"{checkpoint_prefix(style_id)}_cancel.json"


def outbox_key(style_id: int, run_id: str) -> str:
    """A pending terminal webhook of a run."""
    return f"{OUTBOX_PREFIX}style_{check_style_id(style_id)}/{check_run_id(run_id)}.json"


def job_key_for(message_id: str | None, body: bytes) -> str:
    """A job's key: its AMQP ``message_id`` when usable as a key segment, else a body hash.

    Args:
        message_id: The message's ``message_id`` property (often absent).
        body: The raw message body.

    Returns:
        ``message_id``, or ``mid-<32 hex>`` of it when it is too long or has other characters,
        or ``sha-<32 hex>`` of the body when there is no message id.
    """
    if message_id:
        if RUN_ID_RE.fullmatch(message_id) and message_id not in {".", ".."}:
            return message_id
        return "mid-" + hashlib.sha256(message_id.encode("utf-8", "replace")).hexdigest()[:32]
    return "sha-" + hashlib.sha256(body).hexdigest()[:32]


def run_id_for(job_key: str, generation: int) -> str:
    """The run id of a job key's ``generation`` (1 for the first publication).

    Generation 1 keeps the bare job key (so a message id is its run id); later generations
    append ``.g{n}``.
    """
    if generation < 1:
        raise ValueError("generation must be >= 1")
    run_id = job_key if generation == 1 else f"{job_key}.g{generation}"
    if len(run_id) > 80:
        run_id = "run-" + hashlib.sha256(run_id.encode()).hexdigest()[:32]
    return check_run_id(run_id)


def samples_key(style_id: int) -> str:
    """The final sample grid (when the job had prompts): ``models/style_{id}/samples.png``."""
    return f"models/style_{check_style_id(style_id)}/samples.png"


def model_card_key(style_id: int) -> str:
    """The model card beside the LoRA: ``models/style_{id}/README.md``."""
    return f"models/style_{check_style_id(style_id)}/README.md"


__all__ += ["model_card_key", "samples_key"]
