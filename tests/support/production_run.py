"""One full production training, shared by the tests of the callbacks and of the runner.

``production_run`` (session scope, so it trains once for ``tests/callbacks`` and ``tests/jobs``):
``run_reported_training`` with ``callbacks=production`` on the tiny model (6 epochs, rank 4,
alpha 8), webhooks over HTTP to a :class:`~tests.support.receiver.WebhookReceiver`, checkpoints
and the LoRA to moto's S3 server. Registered as a plugin by the root ``conftest.py``; the helpers
are imported by the tests that train their own runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_lora.callbacks.s3_checkpoint import list_checkpoints
from lightning_lora.clients.contract import PROGRESS_PATH
from lightning_lora.clients.storage import S3Storage
from lightning_lora.clients.webhook_client import WebhookClient
from lightning_lora.clients.webhook_sender import WebhookSender
from lightning_lora.config import compose_config
from lightning_lora.jobs.layout import checkpoint_prefix
from lightning_lora.jobs.report import JobReport, webhook_client
from lightning_lora.jobs.runner import run_reported_training
from lightning_lora.training.run import TrainResult
from tests.conftest import TINY_OVERRIDES
from tests.support.receiver import RecordedRequest, WebhookReceiver
from tests.support.s3 import MotoS3Server, fake_aws_env

TOKEN = f"tok-{uuid.uuid4().hex}"

STYLE_ID = 4242

FAST = ("validation.every_n_epochs=100", "data.val_max_images=2")
"""On top of the tiny overrides: validate only at the last epoch, on 2 images."""
NO_LOGGER = ("~logger", "~callbacks.lr_monitor")
"""``logger: null`` (LearningRateMonitor refuses to run without a logger)."""


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, 2 spinning threads are ~8x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="session")
def production_run(
    moto_s3: MotoS3Server,
    tiny_model: str,
    demo_images: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> ProductionRun:
    """``run_reported_training`` with ``callbacks=production``: 6 epochs, rank 4, alpha 8.

    The fake S3 environment applies while it trains only; the run's storage keeps its client.
    """
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
        run = ProductionRun(
            result, cfg, receiver.requests, storage, probe, logs, elapsed, interval_s
        )
    return run
