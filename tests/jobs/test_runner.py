"""``run_reported_training`` (``lightning_lora.jobs.runner``): a training and its report.

Over the network, nothing patched: real trainings (tiny model, 64 px, CPU), webhooks over HTTP to
:class:`~tests.support.receiver.WebhookReceiver`, checkpoints and LoRAs to moto's S3 server. The
full production run is the session's ``production_run`` (``tests/support/production_run.py``);
the other tests train for 1-4 epochs each.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from PIL import Image

from lightning_lora.callbacks.s3_checkpoint import S3CheckpointCallback
from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH
from lightning_lora.clients.storage import S3Storage
from lightning_lora.config import compose_config
from lightning_lora.errors import InvalidImageError, UploadError
from lightning_lora.jobs.layout import (
    checkpoint_prefix,
    kohya_key,
    model_card_key,
    model_key,
    samples_key,
)
from lightning_lora.jobs.report import JobReport
from lightning_lora.jobs.runner import report_completion, run_reported_training
from lightning_lora.lora.export import read_metadata
from lightning_lora.lora.model_card import SAMPLES_NAME, markdown_text
from lightning_lora.training.run import TrainResult
from lightning_lora.worker.cli import compose_worker_config
from tests.lora.test_model_card import outside_code, split_card
from tests.support.production_run import (
    FAST,
    NO_LOGGER,
    STYLE_ID,
    TOKEN,
    Boom,
    LogCapture,
    ProductionRun,
    assert_headers,
    progress_of,
    sender_for,
    to,
)
from tests.support.receiver import Reply, WebhookReceiver

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_exactly_one_completion_with_the_runs_real_metadata(
    production_run: ProductionRun,
) -> None:
    run = production_run
    assert to(run.requests, FAILED_PATH) == []
    (complete,) = to(run.requests, COMPLETE_PATH)
    assert complete.method == "POST"
    assert_headers(complete)
    assert run.requests.index(complete) > run.requests.index(to(run.requests, PROGRESS_PATH)[-1])
    body = complete.json
    assert set(body) == {"style_id", "model_url", "metadata"}
    assert body["style_id"] == STYLE_ID
    bucket = run.storage.bucket
    assert body["model_url"] == f"s3://{bucket}/models/style_{STYLE_ID}/lora_weights.safetensors"
    meta = body["metadata"]
    assert meta["training_epochs"] == 6
    assert meta["lora_rank"] == 4
    assert meta["lora_alpha"] == 8
    assert meta["total_epochs"] == 6
    assert meta["training_steps"] == 12  # 8 images, batch 4
    assert meta["learning_rate"] == pytest.approx(float(run.cfg.module.optimizer.lr))
    assert meta["batch_size"] == 4
    assert meta["resolution"] == 64
    assert meta["num_images"] == 8
    assert meta["seed"] == run.cfg.seed
    assert meta["lora_dropout"] == pytest.approx(float(run.cfg.lora.dropout))
    assert meta["samples_per_s"] > 0
    assert 0 < meta["train_seconds"] < run.elapsed_s
    assert meta["peak_rss_gib"] > 0
    assert "peak_vram_gib" not in meta  # CPU run
    assert meta["kohya_url"] == f"s3://{bucket}/models/style_{STYLE_ID}/lora_kohya.safetensors"
    assert "resumed_from_epoch" not in meta
    assert run.result.metrics["peak_rss_gib"] == pytest.approx(meta["peak_rss_gib"])


@pytest.mark.slow
def test_token_never_logged_nor_sent_in_a_payload(production_run: ProductionRun) -> None:
    run = production_run
    assert run.logs.texts, "no log captured"
    assert any("webhook" in t for t in run.logs.texts)
    for text in run.logs.texts:
        assert TOKEN not in text
    for request in run.requests:
        assert TOKEN.encode() not in request.body
        assert_headers(request)


@pytest.mark.slow
def test_invalid_image_sends_one_failure_and_no_completion(
    make_cfg: Callable[..., Any],
    demo_images: Path,
    tmp_path: Path,
    webhook_receiver: WebhookReceiver,
    s3_env: S3Storage,
) -> None:
    images = tmp_path / "images"
    shutil.copytree(demo_images, images)
    (images / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = make_cfg(*FAST, "trainer.max_epochs=1", image_dir=images)
    with sender_for(webhook_receiver) as sender, pytest.raises(InvalidImageError):
        run_reported_training(cfg, JobReport(sender, STYLE_ID), s3_env)
    requests = webhook_receiver.requests
    assert to(requests, COMPLETE_PATH) == []
    (failed,) = to(requests, FAILED_PATH)
    assert failed.method == "POST"
    assert_headers(failed)
    assert failed.json["style_id"] == STYLE_ID
    assert failed.json["error_code"] == "INVALID_IMAGE"
    assert "zz_broken.png" in failed.json["error_message"]
    assert set(failed.json) == {"style_id", "error_message", "error_code"}


@pytest.mark.slow
def test_exception_in_fit_sends_exactly_one_failure_through_the_report(
    make_cfg: Callable[..., Any],
    webhook_receiver: WebhookReceiver,
    s3_env: S3Storage,
    all_logs: LogCapture,
) -> None:
    cfg = make_cfg(*FAST, "trainer.max_epochs=2", *NO_LOGGER, "reporting.webhook.interval_s=0")
    with sender_for(webhook_receiver) as sender:
        report = JobReport(sender, STYLE_ID)
        with pytest.raises(RuntimeError, match="boom") as info:
            run_reported_training(
                cfg, report, s3_env, callbacks=[Boom(at_step=2, message=f"boom with {TOKEN}")]
            )
        assert report.terminal_kind == "failed"
        assert report.fail(info.value) is False  # a second report is refused
        assert report.complete("s3://b/k", {"training_epochs": 1}) is False
        assert sender.flush(10)
    requests = webhook_receiver.requests
    assert to(requests, COMPLETE_PATH) == []
    (failed,) = to(requests, FAILED_PATH)
    assert failed.json["error_code"] == "TRAINING_FAILED"
    assert failed.json["error_message"].startswith("RuntimeError: boom with ")
    assert TOKEN not in failed.json["error_message"]
    assert requests[-1] is failed  # no progress after the failure
    assert progress_of(requests)[0]["progress_percent"] == 0
    assert all(TOKEN not in t for t in all_logs.texts)


@pytest.mark.slow
def test_final_upload_failure_is_upload_failed_and_checkpoint_failures_only_warn(
    make_cfg: Callable[..., Any],
    webhook_receiver: WebhookReceiver,
    s3_env: S3Storage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    missing = S3Storage.from_env(bucket=f"missing-{uuid.uuid4().hex[:12]}", retry_budget_s=0)
    cfg = make_cfg(*FAST, "trainer.max_epochs=2", *NO_LOGGER)
    checkpoints = S3CheckpointCallback(missing, checkpoint_prefix(STYLE_ID), every_n_epochs=1)
    caplog.set_level(logging.WARNING, logger="lightning_lora")
    with sender_for(webhook_receiver) as sender, pytest.raises(UploadError):
        # resume=False: listing a missing bucket would fail the job with DOWNLOAD_FAILED
        run_reported_training(
            cfg, JobReport(sender, STYLE_ID), missing, resume=False, callbacks=[checkpoints]
        )
    assert checkpoints.failed >= 1 and checkpoints.uploaded == []
    assert any("checkpoint upload failed" in r.getMessage() for r in caplog.records)
    requests = webhook_receiver.requests
    assert progress_of(requests)[-1]["progress_percent"] == 100  # training itself finished
    assert to(requests, COMPLETE_PATH) == []
    (failed,) = to(requests, FAILED_PATH)
    assert failed.json["error_code"] == "UPLOAD_FAILED"
    assert "lora_weights.safetensors" in failed.json["error_message"]


@pytest.mark.slow
def test_completion_is_retried_after_5xx_and_a_timeout(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.script(COMPLETE_PATH, 500, 503, Reply(200, delay_s=2.0), 200)
    result = TrainResult(
        output_dir=Path("."),
        lora=None,
        metrics={"epochs": 3.0, "steps": 6.0, "samples_per_s": 2.5, "train_seconds": 9.0},
        metadata={"network_dim": 4, "network_alpha": 8, "learning_rate": 1e-4, "resolution": 64},
    )
    cfg = compose_config(["model=tiny", "lora.rank=4", "lora.alpha=8"], output_dir=".")
    with sender_for(webhook_receiver, timeout_s=0.5) as sender:
        report = JobReport(sender, STYLE_ID)
        assert report_completion(report, cfg, result, "s3://bucket/models/x.safetensors")
        assert not report_completion(report, cfg, result, "s3://bucket/models/x.safetensors")
        assert sender.flush(20)
        stats = sender.stats
    attempts = to(webhook_receiver.requests, COMPLETE_PATH)
    assert [a.status for a in attempts] == [500, 503, 200, 200]  # the 3rd timed out
    assert len({a.body for a in attempts}) == 1
    assert stats.reliable_sent == 1 and stats.reliable_failed == 0
    meta = attempts[0].json["metadata"]
    assert (meta["training_epochs"], meta["lora_rank"], meta["lora_alpha"]) == (3, 4, 8)


def test_a_dora_job_delivers_the_diffusers_file_only_and_drops_a_stale_kohya_file(
    s3_env, tmp_path
) -> None:
    from lightning_lora.jobs.layout import kohya_key, model_key
    from lightning_lora.jobs.runner import upload_final_lora
    from lightning_lora.lora.export import LoraFiles
    from lightning_lora.training.run import TrainResult

    assert compose_worker_config(["model=tiny", "lora.use_dora=true"]).lora.use_dora
    stale = tmp_path / "old_kohya.safetensors"
    stale.write_bytes(b"an earlier training's kohya file")
    s3_env.upload_file(stale, kohya_key(7), {"style_id": 7})
    diffusers = tmp_path / "pytorch_lora_weights.safetensors"
    diffusers.write_bytes(b"dora weights")
    result = TrainResult(
        output_dir=tmp_path,
        lora=LoraFiles(tmp_path, diffusers, None),
        metrics={},
        metadata={"num_epochs": 1, "network_dim": 4, "network_alpha": 4},
    )
    model_url, kohya_url = upload_final_lora(s3_env, 7, result)
    assert kohya_url is None and model_url.endswith(model_key(7))
    assert kohya_key(7) not in set(s3_env.list_keys("models/style_7/"))
    assert model_key(7) in set(s3_env.list_keys("models/style_7/"))


class SamplesRefused(S3Storage):
    """The bucket, except that the store refuses the samples grid: its upload goes to a bucket
    that does not exist on the same S3 server, which answers NoSuchBucket (a real error)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused: list[str] = []

    def upload_file(self, path: Any, key: str, extra_metadata: Any = None) -> str:
        if key != samples_key(STYLE_ID):
            return super().upload_file(path, key, extra_metadata)
        self.refused.append(key)
        missing = S3Storage(
            bucket=f"missing-{uuid.uuid4().hex[:12]}",
            endpoint_url=self.endpoint_url,
            retry_budget_s=0,
        )
        return missing.upload_file(path, key, extra_metadata)


PROMPTS = (
    "validation.prompts=['a red circle, in the style of {token}','a blue square']",
    "validation.num_inference_steps=2",
)
JOB_TOKEN = '<b>x</b>"]: ${oc.env:HOME} ](javascript:a) # license: mit ```'
"""A style token a job message may carry (no control characters), hostile everywhere else."""


def _card(storage: S3Storage, tmp_path: Path) -> tuple[dict[str, Any], str]:
    text = storage.download_file(model_card_key(STYLE_ID), tmp_path / "dl" / "README.md")
    return split_card(text.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_samples_and_card_are_delivered_and_the_jobs_token_stays_data(
    make_cfg: Callable[..., Any],
    webhook_receiver: WebhookReceiver,
    s3_env: S3Storage,
    tmp_path: Path,
) -> None:
    cfg = make_cfg(*FAST, "trainer.max_epochs=1", *NO_LOGGER, *PROMPTS)
    with sender_for(webhook_receiver) as sender:
        result = run_reported_training(
            cfg, JobReport(sender, STYLE_ID), s3_env, resume=False, style_token=JOB_TOKEN
        )
    (complete,) = to(webhook_receiver.requests, COMPLETE_PATH)
    assert set(complete.json) == {"style_id", "model_url", "metadata"}  # the contract's fields
    meta = complete.json["metadata"]
    bucket = s3_env.bucket
    assert meta["samples_url"] == f"s3://{bucket}/models/style_{STYLE_ID}/samples.png"
    assert meta["model_card_url"] == f"s3://{bucket}/models/style_{STYLE_ID}/README.md"
    assert complete.json["model_url"] == f"s3://{bucket}/{model_key(STYLE_ID)}"
    # the grid drawn with the job's token, as the run wrote it beside the LoRA
    assert result.sample_prompts == [f"a red circle, in the style of {JOB_TOKEN}", "a blue square"]
    assert result.lora is not None and result.lora.samples is not None
    grid = s3_env.download_file(samples_key(STYLE_ID), tmp_path / "dl" / "samples.png")
    assert grid.read_bytes() == result.lora.samples.read_bytes()
    assert Image.open(grid).size == (2 * 64, 64)  # one row, one column per prompt
    # the token is literal text: recorded as the trigger, never in the config or resolved
    assert result.metadata["lightning_lora_trigger"] == JOB_TOKEN
    assert read_metadata(result.lora.diffusers)["lightning_lora_trigger"] == JOB_TOKEN
    assert JOB_TOKEN not in OmegaConf.to_yaml(cfg)
    # the delivered card: the bucket's file names, the grid, the token as data
    front, body = _card(s3_env, tmp_path)
    assert set(front) == {"instance_prompt", "library_name", "tags"}
    assert front["instance_prompt"] == JOB_TOKEN
    prose = outside_code(body)
    assert "<b>" not in prose and "](javascript" not in prose and "\n# license" not in prose
    assert JOB_TOKEN not in prose and markdown_text(JOB_TOKEN) in prose
    assert f"]({SAMPLES_NAME})" in body
    assert f"1. {markdown_text(result.sample_prompts[0])}" in body
    assert 'weight_name="lora_weights.safetensors"' in body and "<lora:lora_kohya:1>" in body
    assert "| epochs | 1 |" in body and f"| rank | {cfg.lora.rank} |" in body
    # the run's own card, in its folder, names the local files
    assert result.lora.card is not None
    assert "pytorch_lora_weights.safetensors" in result.lora.card.read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_samples_upload_the_store_refuses_still_completes_once_without_its_url(
    make_cfg: Callable[..., Any],
    webhook_receiver: WebhookReceiver,
    s3_env: S3Storage,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = SamplesRefused.from_env(retry_budget_s=2, connect_timeout_s=2, read_timeout_s=10)
    assert isinstance(storage, SamplesRefused)
    cfg = make_cfg(*FAST, "trainer.max_epochs=1", *NO_LOGGER, *PROMPTS)
    caplog.set_level(logging.WARNING, logger="lightning_lora")
    with sender_for(webhook_receiver) as sender:
        result = run_reported_training(cfg, JobReport(sender, STYLE_ID), storage, resume=False)
    assert storage.refused == [samples_key(STYLE_ID)]  # the upload was tried, and refused
    assert to(webhook_receiver.requests, FAILED_PATH) == []
    (complete,) = to(webhook_receiver.requests, COMPLETE_PATH)
    meta = complete.json["metadata"]
    assert "samples_url" not in meta
    assert meta["model_card_url"].endswith(model_card_key(STYLE_ID))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("samples not uploaded" in m and "NoSuchBucket" in m for m in warned), warned
    keys = set(s3_env.list_keys(f"models/style_{STYLE_ID}/"))
    assert keys == {model_key(STYLE_ID), kohya_key(STYLE_ID), model_card_key(STYLE_ID)}
    # the delivered card does not link a grid that is not there; the run's own card does
    _, body = _card(s3_env, tmp_path)
    assert SAMPLES_NAME not in body and "![" not in body
    assert result.lora is not None and result.lora.card is not None
    assert f"]({SAMPLES_NAME})" in result.lora.card.read_text(encoding="utf-8")


def test_a_loha_job_labels_its_files_peft_and_lycoris(s3_env, tmp_path) -> None:
    """The worker's uploads say which files diffusers loads (LoRA, LoCon) and which not."""
    from lightning_lora.jobs.layout import kohya_key, model_key
    from lightning_lora.jobs.runner import upload_final_lora
    from lightning_lora.lora.export import LoraFiles
    from lightning_lora.training.run import TrainResult

    files = {name: tmp_path / name for name in ("peft.safetensors", "lycoris.safetensors")}
    for path in files.values():
        path.write_bytes(b"weights")
    for kind, formats in (("loha", ("peft", "lycoris")), ("locon", ("diffusers", "kohya"))):
        result = TrainResult(
            output_dir=tmp_path,
            lora=LoraFiles(tmp_path, files["peft.safetensors"], files["lycoris.safetensors"]),
            metrics={},
            metadata={"num_epochs": 1, "lightning_lora_network_type": kind},
        )
        upload_final_lora(s3_env, 8, result)
        for key, expected in zip((model_key(8), kohya_key(8)), formats, strict=True):
            head = s3_env.client.head_object(Bucket=s3_env.bucket, Key=key)
            assert head["Metadata"]["format"] == expected, (kind, key)
