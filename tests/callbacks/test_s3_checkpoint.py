"""S3 checkpoints (``lightning_lora.callbacks.s3_checkpoint``) on moto's S3 server.

Uploaded during the session's production run (``tests/support/production_run.py``), kept to the
last two, named to sort by epoch and step; a run resumes from the newest valid one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lightning_lora.callbacks.s3_checkpoint import (
    S3CheckpointCallback,
    checkpoint_name,
    find_resume_checkpoint,
    parse_checkpoint_name,
)
from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH
from lightning_lora.clients.storage import S3Storage
from lightning_lora.jobs.layout import checkpoint_prefix, kohya_key, model_key
from lightning_lora.jobs.report import JobReport
from lightning_lora.jobs.runner import run_reported_training
from lightning_lora.training.run import train
from tests.support.production_run import (
    FAST,
    NO_LOGGER,
    STYLE_ID,
    Probe,
    ProductionRun,
    progress_of,
    sender_for,
    to,
)
from tests.support.receiver import WebhookReceiver

# trains: make test, not make test-fast
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_s3_checkpoints_during_training_and_final_lora_loads_in_diffusers(
    production_run: ProductionRun, tiny_model: str, tmp_path: Path
) -> None:
    run = production_run
    storage = run.storage
    # uploaded in the background while training went on
    assert any(keys for keys in run.probe.keys_during_training)
    assert all(
        k.startswith(checkpoint_prefix(STYLE_ID))
        for ks in run.probe.keys_during_training
        for k in ks
    )
    remaining = storage.list_keys(checkpoint_prefix(STYLE_ID))
    assert len(remaining) == 2
    assert remaining[-1] == checkpoint_prefix(STYLE_ID) + checkpoint_name(5, 12)
    assert storage.exists(kohya_key(STYLE_ID))
    folder = tmp_path / "lora"
    storage.download_file(model_key(STYLE_ID), folder / "pytorch_lora_weights.safetensors")

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(folder)
    lora_a = {k: v for k, v in pipe.unet.state_dict().items() if "lora_A" in k}
    assert lora_a and all(v.shape[0] == 4 for v in lora_a.values())  # the run's rank
    assert any(v.abs().sum() > 0 for v in lora_a.values())


def test_resume_from_the_newest_valid_s3_checkpoint(
    make_cfg: Callable[..., Any],
    webhook_receiver: WebhookReceiver,
    s3_env: S3Storage,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = s3_env
    style = 7
    prefix = checkpoint_prefix(style)
    # 1st run: "killed" after 2 epochs (a checkpoint every epoch)
    first = make_cfg(*FAST, "trainer.max_epochs=2", *NO_LOGGER, output_dir=tmp_path / "one")
    prefix = checkpoint_prefix(style)
    train(first, callbacks=[S3CheckpointCallback(storage, prefix, every_n_epochs=1, keep_last=2)])
    good = prefix + checkpoint_name(1, 4)
    assert storage.list_keys(prefix) == [prefix + checkpoint_name(0, 2), good]
    # newer but broken: garbage, and a truncated copy of the good one
    storage.client.put_object(Bucket=storage.bucket, Key=prefix + checkpoint_name(9, 99), Body=b"x")
    data = storage.client.get_object(Bucket=storage.bucket, Key=good)["Body"].read()
    partial = prefix + checkpoint_name(8, 90)
    storage.client.put_object(Bucket=storage.bucket, Key=partial, Body=data[: len(data) // 2])

    caplog.set_level(logging.WARNING, logger="lightning_lora")
    found = find_resume_checkpoint(storage, prefix, tmp_path / "dl")
    assert found is not None and found.name == checkpoint_name(1, 4)
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 2
    assert checkpoint_name(9, 99) in skipped[0] and checkpoint_name(8, 90) in skipped[1]
    # a checkpoint of another LoRA rank is not resumed from
    assert find_resume_checkpoint(storage, prefix, tmp_path / "dl2", {"rank": 99}) is None

    # 2nd run: 4 epochs, resumed through the worker's path
    second = make_cfg(*FAST, "trainer.max_epochs=4", *NO_LOGGER, output_dir=tmp_path / "two")
    probe = Probe()
    with sender_for(webhook_receiver) as sender:
        result = run_reported_training(second, JobReport(sender, style), storage, callbacks=[probe])
    assert probe.start == (2, 4)  # resumed at epoch 2, step 4
    assert result.metrics["steps"] == 8 and result.metrics["epochs"] == 4
    reports = progress_of(webhook_receiver.requests)
    assert reports[0]["current_epoch"] == 2
    assert reports[0]["progress_percent"] == 50
    assert reports[-1]["current_epoch"] == 4 and reports[-1]["progress_percent"] == 100
    (complete,) = to(webhook_receiver.requests, COMPLETE_PATH)
    meta = complete.json["metadata"]
    assert (meta["training_epochs"], meta["training_steps"]) == (4, 8)
    assert meta["resumed_from_epoch"] == 2
    assert to(webhook_receiver.requests, FAILED_PATH) == []


def test_checkpoint_names_sort_by_epoch_then_step() -> None:
    assert parse_checkpoint_name("checkpoints/style_1/" + checkpoint_name(12, 345)) == (12, 345)
    assert parse_checkpoint_name("checkpoints/style_1/last.ckpt") is None
    assert checkpoint_name(3, 7) == "epoch0003-step000007.ckpt"
