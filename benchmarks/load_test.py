"""Load test of the queue runner: N tiny jobs over W worker processes, exactly once each.

Run by hand (the broker must be running on ``RABBITMQ_HOST`` or 127.0.0.1:5672)::

    .venv/bin/python benchmarks/load_test.py --jobs 30 --workers 2

It starts moto's S3 server and a webhook receiver in this process, ``--workers``
``lightning-lora-worker`` subprocesses on a fresh queue, publishes ``--jobs`` jobs (tiny model,
1 epoch, 2 images each), waits for every terminal webhook, stops the workers with SIGTERM and
checks that each job completed exactly once, nothing failed and both queues are empty. It prints
jobs/min and the p50/p95 latency from publishing a message to receiving its completion webhook.
Exit status 0 when all checks pass. ``tests/benchmarks/test_load_test.py`` runs a small version
in CI.

``--soak`` (``make soak``) mixes in the other outcomes a worker settles, a few hundred messages
in all: jobs whose image is not an image (``INVALID_IMAGE``), refused messages with a readable
identity (a ``NaN`` learning rate, as ``json.dumps`` writes it: one ``INVALID_MESSAGE`` webhook
each), unreadable bodies and jobs for a webhook outside the allowlist (refused, no request). It
reports each worker's threads, open descriptors and RSS when it starts consuming, after the
first completed jobs (warm: the model loaded) and at the end; the run fails if a worker ends
with more threads or descriptors than it had warm. Not a timed test: the figures go to
``docs/RELIABILITY.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from lightning_lora.worker.broker import BrokerSettings, publish_job  # noqa: E402
from tests.support.broker import channel, depth  # noqa: E402
from tests.support.receiver import WebhookReceiver  # noqa: E402
from tests.support.s3 import fake_aws_env, start_moto_server  # noqa: E402

COMPLETE_PATH = "/api/webhooks/training/complete"
FAILED_PATH = "/api/webhooks/training/failed"
PROGRESS_PATH = "/api/webhooks/training/progress"
WORKER_SCRIPT = Path(sys.executable).parent / "lightning-lora-worker"
TRAIN_OVERRIDES = (
    "callbacks=production",
    "model=tiny",
    "trainer=cpu",
    "data.resolution=64",
    "data.batch_size=2",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "module.gradient_checkpointing=false",
    "reporting.webhook.interval_s=5",
    "reporting.s3_checkpoint.every_n_epochs=0",
)


@dataclasses.dataclass
class LoadResult:
    """What a load run measured and found.

    Attributes:
        jobs: Jobs published.
        workers: Worker processes.
        wall_s: First publish to last terminal webhook, in seconds.
        latencies_s: Per completed job, publish to completion webhook received.
        completions: Style id -> accepted completion webhooks.
        failures: Style id -> failure webhooks.
        queue_depth: Messages left in the work queue after the workers stopped.
        dlq_depth: Messages in the dead-letter queue after the workers stopped.
        worker_exit_codes: Exit status of each worker after SIGTERM.
        log_dir: Where the workers' logs are.
        steady_s: First progress webhook (a worker started training) to the last terminal
            webhook: the wall time without the workers' start-up (imports, model load).
        service_s: Per job, the worker's own ``total_s`` (download, training, upload, report),
            read from the ``timings:`` log lines.
        failing: Jobs published that must fail (``INVALID_IMAGE``), style ids after the jobs.
        reported: Refused messages with a readable identity (one failure webhook each).
        silent: Refused messages that get no webhook (unreadable, foreign webhook).
        resources: Per phase (``idle``: consuming, before any message; ``warm``: one message
            of each kind settled; ``end``), each worker's ``threads``, ``fds`` (without the
            store's pooled connections), ``store_connections`` and ``rss_mb``.
    """

    jobs: int
    workers: int
    wall_s: float
    latencies_s: list[float]
    completions: dict[int, int]
    failures: dict[int, int]
    queue_depth: int
    dlq_depth: int
    worker_exit_codes: list[int | None]
    log_dir: str
    steady_s: float = 0.0
    service_s: list[float] = dataclasses.field(default_factory=list)
    failing: int = 0
    reported: int = 0
    silent: int = 0
    resources: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)

    @property
    def exactly_once(self) -> bool:
        """Every job completed once, every failing job and reported refusal failed once."""
        to_fail = set(range(self.jobs + 1, self.jobs + self.failing + self.reported + 1))
        return (
            all(self.completions.get(i, 0) == 1 for i in range(1, self.jobs + 1))
            and len(self.completions) == self.jobs
            and {sid for sid, n in self.failures.items() if n} == to_fail
            and all(self.failures[sid] == 1 for sid in to_fail)
        )

    @property
    def kept_its_resources(self) -> bool | None:
        """No worker ended with more threads or open descriptors than it had warm.

        ``None`` without a warm sample (a plain load run takes none: only the soak does).
        """
        warm, end = self.resources.get("warm"), self.resources.get("end")
        if not warm or not end:
            return None
        return all(
            e["threads"] <= w["threads"] and e["fds"] <= w["fds"]
            for w, e in zip(warm, end, strict=True)
        )

    @property
    def ok(self) -> bool:
        """Exactly once, the work queue empty, every refusal dead-lettered, workers exited 0."""
        return (
            self.exactly_once
            and self.queue_depth == 0
            and self.dlq_depth == self.failing + self.reported + self.silent
            and all(code == 0 for code in self.worker_exit_codes)
            and self.kept_its_resources is not False
        )

    @property
    def jobs_per_min(self) -> float:
        """Completed jobs per minute over the wall time."""
        return 60.0 * len(self.latencies_s) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_jobs_per_min(self) -> float:
        """Completed jobs per minute once the workers were up."""
        return 60.0 * len(self.latencies_s) / self.steady_s if self.steady_s > 0 else 0.0

    def percentile(self, q: float, values: list[float] | None = None) -> float:
        """Percentile ``q`` (0..100, nearest rank) of the latencies (or of ``values``)."""
        values = sorted(self.latencies_s if values is None else values)
        if not values:
            return float("nan")
        rank = max(1, min(len(values), math.ceil(q / 100 * len(values))))
        return values[rank - 1]

    def summary(self) -> dict[str, object]:
        """The figures as a JSON-friendly dict."""
        return {
            "jobs": self.jobs,
            "workers": self.workers,
            "wall_s": round(self.wall_s, 1),
            "jobs_per_min": round(self.jobs_per_min, 2),
            "steady_s": round(self.steady_s, 1),
            "steady_jobs_per_min": round(self.steady_jobs_per_min, 2),
            "service_p50_s": round(self.percentile(50, self.service_s), 2),
            "service_p95_s": round(self.percentile(95, self.service_s), 2),
            "latency_p50_s": round(self.percentile(50), 1),
            "latency_p95_s": round(self.percentile(95), 1),
            "latency_mean_s": round(statistics.fmean(self.latencies_s), 1)
            if self.latencies_s
            else None,
            "failing": self.failing,
            "reported": self.reported,
            "silent": self.silent,
            "exactly_once": self.exactly_once,
            "resources": self.resources,
            "kept_its_resources": self.kept_its_resources,
            "queue_depth": self.queue_depth,
            "dlq_depth": self.dlq_depth,
            "worker_exit_codes": self.worker_exit_codes,
            "ok": self.ok,
            "log_dir": self.log_dir,
        }


def _service_times(logs: Path) -> list[float]:
    """The ``total_s`` of every ``job ... timings:`` line in the workers' logs."""
    pattern = re.compile(r" timings: .*total_s=([0-9.]+)")
    times = []
    for path in sorted(logs.glob("worker*.log")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            match = pattern.search(line)
            if match:
                times.append(float(match.group(1)))
    return times


def _prepare_assets(cache: Path) -> list[Path]:
    """Build the tiny model and two demo images in ``cache`` (idempotent)."""
    os.environ["LIGHTNING_LORA_CACHE"] = str(cache)
    from lightning_lora.demo.images import make_demo_images
    from lightning_lora.training.models import tiny_model_path

    tiny_model_path(cache)
    return sorted(make_demo_images(cache / "demo-style-load").glob("*.png"))[:2]


def _resources(procs: list[subprocess.Popen], store_port: int) -> list[dict[str, float]]:
    """Each worker's threads, open descriptors and resident memory now.

    ``fds`` leaves out the connections to the store that boto3's pool keeps open for reuse (at
    most ten, botocore's default): a bounded cache, not something a message opened. They are
    counted in ``store_connections``.
    """
    found = []
    for proc in procs:
        process = psutil.Process(proc.pid)
        pooled = sum(
            1 for c in process.net_connections(kind="tcp") if c.raddr and c.raddr.port == store_port
        )
        found.append(
            {
                "threads": process.num_threads(),
                "fds": process.num_fds() - pooled,
                "store_connections": pooled,
                "rss_mb": round(process.memory_info().rss / 2**20, 1),
            }
        )
    return found


def _messages(
    jobs: range,
    failing: range,
    reported: range,
    silent: int,
    urls: list[str],
    bad_url: str,
    webhook_url: str,
) -> list[bytes]:
    """The bodies of a batch: jobs, failing jobs, reported refusals, silent refusals."""
    bodies = []
    for style in jobs:
        job = {"style_id": style, "image_urls": urls, "webhook_url": webhook_url, "seed": style}
        bodies.append(json.dumps(job).encode())
    for style in failing:
        job = {"style_id": style, "image_urls": [bad_url], "webhook_url": webhook_url}
        bodies.append(json.dumps(job).encode())
    for style in reported:  # what json.dumps writes for a learning rate that is not finite
        job = {"style_id": style, "image_urls": urls, "webhook_url": webhook_url}
        bodies.append(json.dumps({**job, "learning_rate": float("nan")}).encode())
    for index in range(silent):
        if index % 2:
            bodies.append(b"{not json " + str(index).encode())
        else:
            foreign = "http://198.51.100.7:8000"  # outside the allowlist: no request is sent
            job = {"style_id": 10**6 + index, "image_urls": urls, "webhook_url": foreign}
            bodies.append(json.dumps(job).encode())
    return bodies


def run_load(
    jobs: int,
    workers: int,
    *,
    timeout_s: float = 1800.0,
    cache_dir: str | Path | None = None,
    log_dir: str | Path | None = None,
    settle_s: float = 2.0,
    failing: int = 0,
    reported: int = 0,
    silent: int = 0,
) -> LoadResult:
    """Run the load test and return what it measured (never raises on a failed check).

    Args:
        jobs: Jobs to publish.
        workers: Worker processes to start.
        timeout_s: Most seconds to wait for all terminal webhooks.
        cache_dir: Cache for the tiny model (``LIGHTNING_LORA_CACHE`` or the default).
        log_dir: Folder for the workers' logs (a fresh temporary folder when ``None``).
        settle_s: Seconds to wait after the last webhook for (wrong) duplicates.
        failing: Jobs whose image is not an image (each fails once, ``INVALID_IMAGE``).
        reported: Refused messages with a readable identity (each reported once).
        silent: Refused messages that get no webhook (unreadable or a foreign webhook).

    Returns:
        The measurements and checks.
    """
    from lightning_lora.training.models import default_cache_dir

    cache = Path(cache_dir or os.environ.get("LIGHTNING_LORA_CACHE") or default_cache_dir())
    images = _prepare_assets(cache)
    logs = Path(log_dir or tempfile.mkdtemp(prefix="ll-load-"))
    logs.mkdir(parents=True, exist_ok=True)
    name = f"load_{uuid.uuid4().hex[:10]}"
    broker = BrokerSettings(
        host=os.environ.get("RABBITMQ_HOST", "127.0.0.1"), queue=name, connection_name=name
    )
    moto = start_moto_server()
    receiver = WebhookReceiver().start()
    procs: list[subprocess.Popen] = []
    sinks = []
    try:
        bucket = moto.create_bucket()
        urls = []
        for i, png in enumerate(images):
            key = f"styles/load/{i}.png"
            moto.admin_client.upload_file(str(png), bucket, key)
            urls.append(f"s3://{bucket}/{key}")
        env = {
            **os.environ,
            **fake_aws_env(moto.endpoint_url, bucket),
            "LIGHTNING_LORA_CACHE": str(cache),
            "RABBITMQ_HOST": broker.host,
            "RABBITMQ_QUEUE": broker.queue,
            "RABBITMQ_HEARTBEAT": "10",
            "INTERNAL_API_TOKEN": "load-test-token",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        args = [
            str(WORKER_SCRIPT),
            *TRAIN_OVERRIDES,
            "worker.webhook_allowlist=[127.0.0.1]",
            "worker.grace_period_s=60",
        ]
        for w in range(workers):
            sink = (logs / f"worker{w}.log").open("w", encoding="utf-8")
            sinks.append(sink)
            procs.append(
                subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
            )
        bad_key = "styles/load/not-an-image.png"
        moto.admin_client.put_object(Bucket=bucket, Key=bad_key, Body=b"not an image")
        bad_url = f"s3://{bucket}/{bad_key}"
        failing_ids = range(jobs + 1, jobs + failing + 1)
        reported_ids = range(jobs + failing + 1, jobs + failing + reported + 1)
        published: dict[int, float] = {}

        def terminal_ids(reqs: list) -> set[int]:
            return {
                (r.json or {}).get("style_id")
                for r in reqs
                if r.path in (COMPLETE_PATH, FAILED_PATH) and 200 <= r.status < 300
            }

        def publish(bodies: list[bytes], styles: list[int]) -> None:
            now = time.monotonic()
            published.update({style: now for style in styles})
            for index, body in enumerate(bodies):
                publish_job(broker, body, message_id=f"{name}-{len(published)}-{index}")

        resources: dict[str, list[dict[str, float]]] = {}
        deadline = time.monotonic() + timeout_s
        warm_jobs = min(jobs, workers)  # each worker loads its model on its first job
        store_port = int(moto.endpoint_url.rsplit(":", 1)[1])
        consuming = [logs / f"worker{w}.log" for w in range(workers)]
        _wait(lambda: all("consuming from" in log.read_text() for log in consuming), deadline)
        resources["idle"] = _resources(procs, store_port)
        if failing or reported or silent:  # soak: the warm level, one of each kind done
            warm = _messages(
                range(1, warm_jobs + 1),
                failing_ids[:1],
                reported_ids[:1],
                min(silent, 2),
                urls,
                bad_url,
                receiver.base_url,
            )
            ids = [*range(1, warm_jobs + 1), *failing_ids[:1], *reported_ids[:1]]
            publish(warm, ids)
            _wait(
                lambda: set(ids) <= terminal_ids(receiver.requests) and depth(broker.queue) == 0,
                deadline,
            )
            time.sleep(settle_s)
            resources["warm"] = _resources(procs, store_port)
            rest = _messages(
                range(warm_jobs + 1, jobs + 1),
                failing_ids[1:],
                reported_ids[1:],
                max(0, silent - 2),
                urls,
                bad_url,
                receiver.base_url,
            )
            random.Random(0).shuffle(rest)
            publish(rest, [*range(warm_jobs + 1, jobs + 1), *failing_ids[1:], *reported_ids[1:]])
        else:
            publish(
                _messages(
                    range(1, jobs + 1), range(0), range(0), 0, urls, bad_url, receiver.base_url
                ),
                list(range(1, jobs + 1)),
            )
        start = min(published.values())
        expected = jobs + failing + reported
        if not _wait(lambda: len(terminal_ids(receiver.requests)) >= expected, deadline):
            print(f"timed out after {timeout_s:.0f}s", file=sys.stderr)
        _wait(lambda: depth(broker.queue) == 0, time.monotonic() + 60)
        requests = receiver.requests
        ends = [r.received_at for r in requests if r.path in (COMPLETE_PATH, FAILED_PATH)]
        wall = (max(ends) - start) if ends else 0.0
        firsts = [r.received_at for r in requests if r.path == PROGRESS_PATH]
        steady = (max(ends) - min(firsts)) if ends and firsts else 0.0
        time.sleep(settle_s)
        resources["end"] = _resources(procs, store_port)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for proc in procs:
            try:
                codes.append(proc.wait(120))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(None)
        requests = receiver.requests
        completions: dict[int, int] = {}
        failures: dict[int, int] = {}
        latencies = []
        for r in requests:
            sid = (r.json or {}).get("style_id")
            if r.path == COMPLETE_PATH and 200 <= r.status < 300:
                completions[sid] = completions.get(sid, 0) + 1
                if completions[sid] == 1 and sid in published:
                    latencies.append(r.received_at - published[sid])
            elif r.path == FAILED_PATH:
                failures[sid] = failures.get(sid, 0) + 1
        return LoadResult(
            jobs=jobs,
            workers=workers,
            wall_s=wall,
            latencies_s=latencies,
            completions=completions,
            failures=failures,
            queue_depth=depth(broker.queue),
            dlq_depth=depth(broker.dlq),
            worker_exit_codes=codes,
            log_dir=str(logs),
            steady_s=steady,
            service_s=_service_times(logs),
            failing=failing,
            reported=reported,
            silent=silent,
            resources=resources,
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        for sink in sinks:
            sink.close()
        receiver.stop()
        moto.stop()
        try:
            with channel() as ch:
                ch.queue_delete(broker.queue)
                ch.queue_delete(broker.dlq)
        except Exception as exc:  # the figures matter more than the cleanup
            print(f"could not delete the test queues: {exc}", file=sys.stderr)


def _wait(predicate: Callable[[], bool], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def main(argv: list[str] | None = None) -> int:
    """Command line: run the load test, print the figures as JSON, exit 1 on a failed check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for all jobs")
    parser.add_argument("--log-dir", default=None, help="folder for the workers' logs")
    parser.add_argument(
        "--soak",
        action="store_true",
        help="mix in failing jobs and refused messages (a few hundred messages in all): "
        "--failing 20 --reported 200 --silent 100 unless given",
    )
    parser.add_argument("--failing", type=int, default=None, help="jobs that fail")
    parser.add_argument("--reported", type=int, default=None, help="refusals reported")
    parser.add_argument("--silent", type=int, default=None, help="refusals not reported")
    args = parser.parse_args(argv)
    soak = (20, 200, 100) if args.soak else (0, 0, 0)
    failing, reported, silent = (
        given if given is not None else default
        for given, default in zip((args.failing, args.reported, args.silent), soak, strict=True)
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = run_load(
        args.jobs,
        args.workers,
        timeout_s=args.timeout,
        log_dir=args.log_dir,
        failing=failing,
        reported=reported,
        silent=silent,
    )
    print(json.dumps(result.summary(), indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
