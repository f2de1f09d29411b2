"""Production callbacks over the network: webhooks to a real HTTP receiver, S3 on moto's server.

Nothing is patched: trainings are real (tiny model, 64 px, CPU), webhooks go over HTTP to
:class:`~tests.support.receiver.WebhookReceiver` and checkpoints/LoRAs to moto's S3 server.

One full production run (``callbacks=production``, via ``run_reported_training``) is shared by
the tests of the ``production_run`` fixture; the others train for 1-4 epochs each.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_lora.callbacks.progress import ProgressCallback
from lightning_lora.callbacks.s3_checkpoint import (
    S3CheckpointCallback,
    checkpoint_name,
    find_resume_checkpoint,
    list_checkpoints,
    parse_checkpoint_name,
)
from lightning_lora.callbacks.vram import VramCallback
from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH
from lightning_lora.clients.storage import S3Storage
from lightning_lora.clients.webhook_client import WebhookClient
from lightning_lora.clients.webhook_sender import WebhookSender
from lightning_lora.config import compose_config
from lightning_lora.errors import InvalidImageError, UploadError
from lightning_lora.jobs.layout import checkpoint_prefix, kohya_key, model_key
from lightning_lora.jobs.report import JobReport, webhook_client
from lightning_lora.jobs.runner import report_completion, run_reported_training
from lightning_lora.training.run import TrainResult, train
from tests.conftest import TINY_OVERRIDES
from tests.support.receiver import RecordedRequest, Reply, WebhookReceiver
from tests.support.s3 import MotoS3Server, fake_aws_env

pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast

TOKEN = f"tok-{uuid.uuid4().hex}"
STYLE_ID = 4242
FAST = ("validation.every_n_epochs=100", "data.val_max_images=2")
"""On top of the tiny overrides: validate only at the last epoch, on 2 images."""
NO_LOGGER = ("~logger", "~callbacks.lr_monitor")
"""``logger: null`` (LearningRateMonitor refuses to run without a logger)."""


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, 2 spinning threads are ~8x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers


class LogCapture(logging.Handler):
    """Every record of every logger at DEBUG, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.texts.append(self.format(record))


@pytest.fixture
def all_logs() -> Iterator[LogCapture]:
    """Capture every log record at DEBUG on the root logger."""
    root = logging.getLogger()
    handler, level = LogCapture(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


def progress_of(requests: list[RecordedRequest]) -> list[dict[str, Any]]:
    return [r.json["progress"] for r in requests if r.path == PROGRESS_PATH]


def to(requests: list[RecordedRequest], path: str) -> list[RecordedRequest]:
    return [r for r in requests if r.path == path]


def sender_for(receiver: WebhookReceiver, **client: Any) -> WebhookSender:
    options = {"timeout_s": 2.0, "max_total_s": 20.0, "backoff_base_s": 0.05, **client}
    return WebhookSender(WebhookClient(receiver.base_url, token=TOKEN, **options))


class Probe(L.Callback):
    """Records where training started and what S3 held at each epoch start."""

    def __init__(self, storage: S3Storage | None = None, style_id: int = STYLE_ID) -> None:
        self.storage = storage
        self.style_id = style_id
        self.start: tuple[int, int] | None = None
        self.keys_during_training: list[list[str]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = (trainer.current_epoch, trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.storage is not None:
            prefix = checkpoint_prefix(self.style_id)
            self.keys_during_training.append(list_checkpoints(self.storage, prefix))


class Boom(L.Callback):
    """Raises after ``at_step`` optimizer steps."""

    def __init__(self, at_step: int, message: str) -> None:
        self.at_step = at_step
        self.message = message

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.at_step:
            raise RuntimeError(self.message)


def assert_headers(request: RecordedRequest) -> None:
    assert request.header("Authorization") == f"Bearer {TOKEN}"
    assert request.header("X-Request-Source") == "training-server"
    assert request.header("Content-Type") == "application/json"


# --------------------------------------------------------------------------- the production run


@dataclasses.dataclass
class ProductionRun:
    result: TrainResult
    cfg: Any
    requests: list[RecordedRequest]
    storage: S3Storage
    probe: Probe
    logs: LogCapture
    elapsed_s: float
    interval_s: float


@pytest.fixture(scope="module")
def production_run(
    moto_s3: MotoS3Server,
    tiny_model: str,
    demo_images: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProductionRun]:
    """``run_reported_training`` with ``callbacks=production``: 6 epochs, rank 4, alpha 8."""
    interval_s = 0.5
    cfg = compose_config(
        [
            *TINY_OVERRIDES,
            *FAST,
            f"data.image_dir={demo_images}",
            "callbacks=production",
            "trainer.max_epochs=6",
            "lora.rank=4",
            "lora.alpha=8",
            f"reporting.webhook.interval_s={interval_s}",
            "reporting.client.timeout_s=5",
            "reporting.s3_checkpoint.every_n_epochs=1",
            "reporting.s3_checkpoint.keep_last=2",
            "callbacks.vram.every_n_steps=1",
        ],
        output_dir=tmp_path_factory.mktemp("production") / "run",
    )
    logs = LogCapture()
    root = logging.getLogger()
    level = root.level
    with WebhookReceiver() as receiver, pytest.MonkeyPatch.context() as mp:
        for name, value in fake_aws_env(moto_s3.endpoint_url, moto_s3.create_bucket()).items():
            mp.setenv(name, value)
        mp.delenv("INTERNAL_API_TOKEN", raising=False)
        storage = S3Storage.from_env(retry_budget_s=2, connect_timeout_s=2, read_timeout_s=10)
        probe = Probe(storage)
        root.addHandler(logs)
        root.setLevel(logging.DEBUG)
        try:
            report = JobReport(webhook_client(receiver.base_url, cfg, token=TOKEN), STYLE_ID)
            started = time.monotonic()
            result = run_reported_training(cfg, report, storage, callbacks=[probe])
            elapsed = time.monotonic() - started
            report.close()
        finally:
            root.removeHandler(logs)
            root.setLevel(level)
        yield ProductionRun(
            result, cfg, receiver.requests, storage, probe, logs, elapsed, interval_s
        )


def test_progress_webhooks_follow_contract_and_throttle(production_run: ProductionRun) -> None:
    run = production_run
    progress = to(run.requests, PROGRESS_PATH)
    for request in progress:
        assert request.method == "PATCH"
        assert_headers(request)
        assert set(request.json) == {"style_id", "progress"}
        assert request.json["style_id"] == STYLE_ID
        assert set(request.json["progress"]) == {
            "current_epoch",
            "total_epochs",
            "progress_percent",
            "estimated_seconds",
        }
    reports = progress_of(run.requests)
    assert 2 <= len(reports) <= run.elapsed_s / run.interval_s + 2
    assert reports[0]["progress_percent"] == 0
    assert reports[0]["current_epoch"] == 0
    assert reports[-1] == {
        "current_epoch": 6,
        "total_epochs": 6,
        "progress_percent": 100,
        "estimated_seconds": 0,
    }
    epochs = [r["current_epoch"] for r in reports]
    assert epochs == sorted(epochs)
    percents = [r["progress_percent"] for r in reports]
    assert percents == sorted(percents)
    assert all(r["total_epochs"] == 6 for r in reports)
    for report in reports:
        assert isinstance(report["estimated_seconds"], int)
        assert report["estimated_seconds"] >= 0
    # between start and end the ETA is measured: positive while steps are left
    for report in reports[1:-1]:
        assert 0 < report["progress_percent"] < 100
        if report["progress_percent"] < 99:  # 99: all steps done, epoch end or teardown left
            assert report["estimated_seconds"] > 0


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


def test_token_never_logged_nor_sent_in_a_payload(production_run: ProductionRun) -> None:
    run = production_run
    assert run.logs.texts, "no log captured"
    assert any("webhook" in t for t in run.logs.texts)
    for text in run.logs.texts:
        assert TOKEN not in text
    for request in run.requests:
        assert TOKEN.encode() not in request.body
        assert_headers(request)


def test_vram_callback_logs_rss_into_the_csv_logger(production_run: ProductionRun) -> None:
    metrics_csv = Path(production_run.cfg.paths.output_dir) / "csv" / "metrics.csv"
    with metrics_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rss = [float(r["mem/rss_gib"]) for r in rows if r.get("mem/rss_gib")]
    assert len(rss) >= 12  # every step (every_n_steps=1) and every epoch end
    assert all(v > 0 for v in rss)
    peaks = [float(r["mem/peak_rss_gib"]) for r in rows if r.get("mem/peak_rss_gib")]
    assert peaks == sorted(peaks)
    assert any("memory at step" in t for t in production_run.logs.texts)


# --------------------------------------------------------------------------- failures


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


# --------------------------------------------------------------------------- network trouble


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


def test_hanging_receiver_does_not_stall_training_and_vram_works_without_logger(
    make_cfg: Callable[..., Any], webhook_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    # every request hangs until released: a training loop that waited on the network would
    # never get past its first progress report
    webhook_receiver.set_default(Reply(200, hang=True))
    cfg = make_cfg(*FAST, "trainer.max_epochs=2", *NO_LOGGER, output_dir=tmp_path / "hung")
    sender = sender_for(webhook_receiver, timeout_s=30.0)
    webhook = ProgressCallback(JobReport(sender, STYLE_ID), interval_s=0.0)  # after every step
    vram = VramCallback(every_n_steps=1)
    try:
        result = train(cfg, callbacks=[webhook, vram])
        # the event order proves it: training ended while the first request was unanswered
        assert webhook_receiver.in_flight == 1 and not webhook_receiver.released
        assert len(webhook_receiver.requests) == 1
        assert webhook.progress_reports >= 6  # all posted, coalesced behind the hung one
    finally:
        webhook_receiver.release()
        threading.Thread(target=sender.close, daemon=True).start()
    # VramCallback with logger=null: measured, in the metrics and the summary
    assert vram.peak_rss_gib > 0 and vram.peak_gib is None
    assert result.metrics["mem/rss_gib"] > 0
    assert result.metrics["peak_rss_gib"] == pytest.approx(vram.peak_rss_gib)


# --------------------------------------------------------------------------- resume


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
