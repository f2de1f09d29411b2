"""``lightning-lora-worker`` as a process (``lightning_lora.worker.cli``).

Settings refused before consuming and ``--check``; a dead worker's job folder cleaned, metrics
served and log lines escaped; a SIGKILLed worker's job resumed from its S3 checkpoint; SIGTERM;
two workers sharing a queue through a broker restart or a forced close; secrets kept out of the
output; the worker's config composing the training options. Real components only: worker
subprocesses on the real broker (or on a private node of the test's own where the broker
restarts, ``tests/support/broker_node.py``), moto's S3 server over HTTP, real webhook receivers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH
from lightning_lora.lora.text_encoder import build_lora_configs
from lightning_lora.worker.broker import BrokerSettings, publish_job
from lightning_lora.worker.cli import compose_worker_config
from lightning_lora.worker.owners import pid_namespace
from lightning_lora.worker.records import Holder
from tests.support.broker import depth, wait_for
from tests.support.header_proxy import HeaderDroppingProxy
from tests.support.net import closed_port
from tests.support.worker_stack import (
    TOKEN,
    WORKER_SCRIPT,
    _accepted,
    _checkpoints,
    _guide_publish,
    _job,
    _kill,
    _rabbitmqctl,
    _shutdown_all,
    _spawn_logged,
    _spawn_worker,
    _stop,
    _terminal,
    _two_workers,
    _wait_terminal,
)

pytest_plugins = ["tests.support.broker_node"]

OPTIONS = (
    "module/optimizer=prodigy",
    "module.loss=huber",
    "module.huber_c=0.2",
    "module.timestep_sampling=logit_normal",
    "module.logit_mean=0.5",
    "module.debiased_estimation=true",
    "module.ema.enabled=true",
    "module.ema.device=cpu",
    "lora.use_rslora=true",
    "lora.text_encoder.enabled=true",
    "lora.text_encoder.lr=5e-5",
)


def test_the_new_options_compose_under_the_worker_config() -> None:
    cfg = compose_worker_config(["model=tiny", *OPTIONS])
    assert cfg.task_name == "worker" and "worker" in cfg  # still the worker's config
    module = cfg.module
    assert module.optimizer._target_ == "lightning_lora.training.optimizers.prodigy"
    assert module.optimizer.lr == 1.0
    assert (module.loss, module.huber_c, module.timestep_sampling) == ("huber", 0.2, "logit_normal")
    assert module.debiased_estimation and module.ema.enabled and module.ema.device == "cpu"
    unet, text_encoder, lr = build_lora_configs(cfg.lora)
    assert unet.use_rslora and text_encoder is not None and text_encoder.use_rslora
    assert lr == 5e-5 and sorted(text_encoder.target_modules) == [
        "k_proj",
        "out_proj",
        "q_proj",
        "v_proj",
    ]
    # the training config's defaults are unchanged by the worker config
    plain = compose_worker_config(["model=tiny"])
    assert plain.module.optimizer._target_ == "lightning_lora.training.optimizers.adamw"
    assert (plain.module.loss, plain.module.timestep_sampling) == ("l2", "uniform")
    assert not plain.module.ema.enabled and not plain.lora.text_encoder.enabled
    assert build_lora_configs(plain.lora)[1] is None


def _cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(WORKER_SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _scrape(base: str) -> str:
    return requests.get(f"{base}/metrics", timeout=5).text


def _results(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(("ok ", "FAIL "))]


@pytest.mark.slow
def test_worker_refuses_bad_settings_and_check_reports_each_dependency(stack) -> None:
    receiver, broker = stack["receiver"], stack["broker"]
    base = {**os.environ, "RABBITMQ_HOST": broker.host, "RABBITMQ_QUEUE": broker.queue}
    bad = _cli(env={**base, "INTERNAL_API_TOKEN": "tok\r\nX: y", "WEBHOOK_ALLOWLIST": "a"})
    assert bad.returncode == 2 and "INTERNAL_API_TOKEN" in bad.stderr, bad.stderr
    assert "tok" not in bad.stderr.replace("INTERNAL_API_TOKEN", "")  # never echoes the value
    empty = _cli(env={**base, "INTERNAL_API_TOKEN": TOKEN, "WEBHOOK_ALLOWLIST": ""})
    assert empty.returncode == 2 and "WEBHOOK_ALLOWLIST" in empty.stderr
    host = receiver.base_url.removeprefix("http://")
    good = {**base, "INTERNAL_API_TOKEN": TOKEN + "\n", "WEBHOOK_ALLOWLIST": host}
    check = _cli("--check", env=good)
    assert check.returncode == 0, check.stdout + check.stderr
    assert [line.split()[:2] for line in _results(check.stdout)] == [
        ["ok", "broker"],
        ["ok", "s3"],
        ["ok", "s3"],  # the store honours conditional writes
        ["ok", "backend"],
    ]
    assert "honours If-None-Match and If-Match" in _results(check.stdout)[2]
    down = {
        **good,
        "WEBHOOK_ALLOWLIST": f"{host},127.0.0.1:{closed_port()}",
        "S3_BUCKET": "no-such-bucket-ll",
    }
    failing = _cli("--check", env=down)
    assert failing.returncode == 1
    lines = _results(failing.stdout)
    assert lines[0].startswith("ok   broker")
    assert lines[1].startswith("FAIL s3") and "no-such-bucket-ll" in lines[1]
    assert lines[2].startswith("ok   backend") and lines[3].startswith("FAIL backend")
    assert len(lines) == 4  # an unreachable bucket is not probed
    assert TOKEN not in check.stdout + failing.stdout


def _publish_raw(broker: BrokerSettings, bodies: list[bytes]) -> None:
    """Publish bodies as they are (the backend's pika calls, one connection for all)."""
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(host=broker.host, port=broker.port)
    )
    try:
        channel = connection.channel()
        channel.queue_declare(queue=broker.queue, durable=True)  # as the backend does
        for body in bodies:
            channel.basic_publish(
                exchange="",
                routing_key=broker.queue,
                body=body,
                properties=pika.BasicProperties(delivery_mode=2),
            )
    finally:
        connection.close()


def _resources(pid: int, store_url: str) -> tuple[int, int]:
    """Threads and open descriptors, less the store connections boto3's pool keeps (<= 10)."""
    process = psutil.Process(pid)
    port = int(store_url.rsplit(":", 1)[1])
    pooled = sum(1 for c in process.net_connections(kind="tcp") if c.raddr and c.raddr.port == port)
    return process.num_threads(), process.num_fds() - pooled


@pytest.mark.slow
def test_hundreds_of_messages_of_every_outcome_leave_no_thread_or_descriptor_behind(
    stack, tmp_path
) -> None:
    """A long-running worker must not wear out: after a warm-up (the model loaded, one job of
    each kind), a few hundred messages of every outcome (completed, failed, refused and
    reported, refused unreadable, refused for a foreign webhook) leave its thread count and
    open descriptors where they were. Counts, not timings."""
    receiver, broker, storage = stack["receiver"], stack["broker"], stack["storage"]
    bad_image = f"s3://{storage.bucket}/styles/src/bad.png"
    storage.client.put_object(Bucket=storage.bucket, Key="styles/src/bad.png", Body=b"not a png")
    foreign = "http://198.51.100.7:8000"  # not allow-listed: no request is ever sent to it

    def mixed(first_style: int, completed: int, failed: int, reported: int, unreadable: int):
        bodies = []
        style = first_style
        for _ in range(completed):
            bodies.append(json.dumps(_job(stack, style, num_epochs=1)).encode())
            style += 1
        for _ in range(failed):
            bodies.append(json.dumps(_job(stack, style, image_urls=[bad_image])).encode())
            style += 1
        for _ in range(reported):  # what json.dumps writes for a NaN learning rate
            bodies.append(json.dumps(_job(stack, style, learning_rate=float("nan"))).encode())
            style += 1
        for index in range(unreadable):
            bodies.append(b"{not json " + str(index).encode())
            bodies.append(json.dumps(_job(stack, style + index, webhook_url=foreign)).encode())
        return bodies, style - first_style

    log_path = tmp_path / "worker.log"
    proc = _spawn_worker(stack, "trainer.max_epochs=1", log_path=log_path)
    try:
        assert wait_for(lambda: "worker consuming" in log_path.read_text(), 120), _stop(proc)
        warm, terminals = mixed(10_000, completed=1, failed=1, reported=1, unreadable=1)
        _publish_raw(broker, warm)
        assert wait_for(lambda: len(_all_terminal(receiver)) == terminals, 240), _stop(proc)
        assert wait_for(lambda: depth(broker.queue) == 0, 60)
        time.sleep(2.0)  # the outbox's first scan, the sockets' TIME_WAIT: idle again
        store = storage.endpoint_url or ""
        threads, fds = _resources(proc.pid, store)
        bodies, more = mixed(20_000, completed=3, failed=8, reported=120, unreadable=60)
        assert len(bodies) >= 250
        _publish_raw(broker, bodies)
        assert wait_for(lambda: len(_all_terminal(receiver)) == terminals + more, 900), _stop(proc)
        assert wait_for(lambda: depth(broker.queue) == 0, 120)
        # every thread and descriptor a message opened is closed by the time it is settled
        assert wait_for(lambda: _resources(proc.pid, store) <= (threads, fds), 30), (
            _resources(proc.pid, store),
            (threads, fds),
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        output = _stop(proc)
    assert proc.returncode == 0, output[-3000:]
    assert depth(broker.dlq) == 1 + 1 + 2 + 8 + 120 + 120  # every refusal and failure kept
    assert all(r.json.get("error_code") != "TRAINING_FAILED" for r in _all_terminal(receiver))


def _all_terminal(receiver) -> list:
    return [r for r in receiver.requests if r.path in (COMPLETE_PATH, FAILED_PATH)]


@pytest.mark.slow
def test_a_store_that_ignores_conditional_writes_stops_the_worker(stack, tmp_path) -> None:
    """Behind a proxy that drops If-None-Match and If-Match, exactly-once would be lost: the
    worker refuses to start (exit 2, naming the store), ``--check`` says so; opting out runs
    with a warning at start."""
    receiver, broker, storage = stack["receiver"], stack["broker"], stack["storage"]
    with HeaderDroppingProxy(storage.endpoint_url or "") as proxy:
        env = {
            **os.environ,
            "RABBITMQ_HOST": broker.host,
            "RABBITMQ_QUEUE": broker.queue,
            "INTERNAL_API_TOKEN": TOKEN,
            "WEBHOOK_ALLOWLIST": receiver.base_url.removeprefix("http://"),
            "S3_ENDPOINT_URL": proxy.endpoint_url,
        }
        check = _cli("model=tiny", "--check", env=env)
        assert check.returncode == 2, check.stdout + check.stderr
        (store,) = [line for line in _results(check.stdout) if "If-" in line]
        assert store.startswith("FAIL s3") and proxy.endpoint_url in store
        assert "ignores If-None-Match" in store and "ignores If-Match" in store
        start = _cli("model=tiny", env=env)
        assert start.returncode == 2, start.stdout + start.stderr
        assert proxy.endpoint_url in start.stderr and "require_conditional_writes" in start.stderr
        assert "worker consuming" not in start.stdout + start.stderr
        log_path = tmp_path / "allowed.log"
        proc = _spawn_worker(
            stack,
            "worker.require_conditional_writes=false",
            log_path=log_path,
            env={"S3_ENDPOINT_URL": proxy.endpoint_url},
        )
        try:
            assert wait_for(lambda: "worker consuming" in log_path.read_text(), 120), _stop(proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            output = _stop(proc)
    assert proc.returncode == 0, output[-3000:]
    warning = [line for line in output.splitlines() if "require_conditional_writes=false" in line]
    assert warning and "WARNING" in warning[0] and "ignores If-None-Match" in warning[0]
    assert depth(broker.queue) == 0 and _terminal(receiver, 0) == []


@pytest.mark.slow
def test_a_worker_process_cleans_litter_serves_metrics_and_escapes_its_logs(
    stack, tmp_path
) -> None:
    receiver, storage, broker = stack["receiver"], stack["storage"], stack["broker"]
    work = tmp_path / "work"
    work.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = work / "ll-job-old-abc123"
    (stale / "images").mkdir(parents=True)
    owner = {"pid": dead.pid, "create_time": time.time() - 100, "host": socket.gethostname()}
    owner["pid_ns"] = pid_namespace()  # what a worker writes: its pid namespace too
    (stale / ".owner.json").write_text(json.dumps(owner))
    (stale / "images" / "big.bin").write_bytes(b"x" * 1_000_000)
    port = closed_port()
    log_path = tmp_path / "worker.log"
    proc = _spawn_worker(
        stack,
        "trainer.max_epochs=1",
        f"worker.work_dir={work}",
        log_path=log_path,
        env={"METRICS_PORT": str(port), "LOG_LEVEL": "INFO"},
    )
    sneaky = f"s3://{storage.bucket}/up/a\u2028FAKE ERROR forged line\u2029b.png"
    try:
        assert wait_for(lambda: "worker consuming" in log_path.read_text(), 120), _stop(proc)
        assert not stale.exists()  # a dead worker's job folder is removed at start
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
        assert wait_for(lambda: requests.get(f"{base}/readyz", timeout=5).status_code == 200, 30)
        _guide_publish(broker, _job(stack, 321))
        _guide_publish(broker, _job(stack, 322, image_urls=[sneaky]))
        assert _wait_terminal(receiver, 321).path == COMPLETE_PATH
        assert _wait_terminal(receiver, 322).json["error_code"] == "DOWNLOAD_FAILED"
        assert wait_for(lambda: depth(broker.queue) == 0, 30)
        # the counters move when the message is settled, just after the webhook
        assert wait_for(lambda: 'code="DOWNLOAD_FAILED"' in _scrape(base), 30)
        text = _scrape(base)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        output = _stop(proc)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("lightning_lora_worker_jobs_started_total", ())] == 2
    assert samples[("lightning_lora_worker_jobs_completed_total", ())] == 1
    assert samples[("lightning_lora_worker_jobs_failed_total", (("code", "DOWNLOAD_FAILED"),))] == 1
    assert (
        samples[("lightning_lora_worker_job_duration_seconds_count", (("outcome", "completed"),))]
        == 1
    )
    assert samples[("lightning_lora_worker_webhooks_pending", ())] == 0
    assert samples[("lightning_lora_worker_broker_last_seen_age_seconds", ())] < 30
    # one physical line per record: the key's separators and CR/LF are escaped, not written
    assert "\u2028" not in output and "\u2029" not in output
    assert not any(
        line.startswith("FAKE ERROR") or line.startswith("b.png") for line in output.splitlines()
    )
    assert "\\u2028FAKE ERROR" in output
    assert len(_terminal(receiver, 321)) == 1


@pytest.mark.slow
def test_a_killed_worker_s_job_resumes_from_its_s3_checkpoint(stack) -> None:
    receiver, storage, broker = stack["receiver"], stack["storage"], stack["broker"]
    extra = ("trainer.max_epochs=6",)
    first = _spawn_worker(stack, *extra)
    second = None
    try:
        publish_job(broker, _job(stack, 41))
        assert wait_for(lambda: len(_checkpoints(storage, 41)) >= 1, 240, interval=0.2), _stop(
            first
        )
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        killed_at = time.monotonic()
        assert not _terminal(receiver, 41)
        second = _spawn_worker(stack, *extra)
        done = _wait_terminal(receiver, 41)
        assert done.path == COMPLETE_PATH, done.json
        assert done.json["metadata"]["training_epochs"] == 6
        assert done.json["metadata"].get("resumed_from_epoch", 0) >= 1
        after = [r for r in receiver.requests_to(PROGRESS_PATH) if r.received_at > killed_at]
        assert after and after[0].json["progress"]["current_epoch"] >= 1
        time.sleep(1)
        assert len(_terminal(receiver, 41)) == 1
        assert wait_for(lambda: depth(broker.queue) == 0, 30)
    finally:
        _stop(first)
        if second is not None:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(60)
            finally:
                _stop(second)


@pytest.mark.slow
def test_sigterm_checkpoints_requeues_and_exits_zero(stack) -> None:
    receiver, storage, broker = stack["receiver"], stack["storage"], stack["broker"]
    proc = _spawn_worker(
        stack, "trainer.max_epochs=50", "reporting.s3_checkpoint.every_n_epochs=100"
    )
    try:
        publish_job(broker, _job(stack, 51))
        assert receiver.wait_for(
            lambda reqs: any(
                r.path == PROGRESS_PATH and r.json["progress"]["current_epoch"] >= 1 for r in reqs
            ),
            240,
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        out = _stop(proc)
    assert _checkpoints(storage, 51), out[-3000:]  # checkpointed on the way out
    assert _terminal(receiver, 51) == []  # neither completed nor failed
    assert depth(broker.queue) == 1  # back in the queue for the next worker
    assert TOKEN not in out


def _holder_proc(storage, procs: list, style_id: int) -> subprocess.Popen:
    """The worker process that holds the style's (only) run lease."""
    keys = [k for k in storage.list_keys(f"checkpoints/style_{style_id}/") if "lease" in k]
    assert len(keys) == 1, keys
    record, _ = storage.get_json(keys[0])
    holder = Holder.from_json(record["holder"])
    (proc,) = [p for p in procs if p.pid == holder.pid]
    return proc


def _queue_depth(node, broker: BrokerSettings) -> int:
    connection = pika.BlockingConnection(node.connection_parameters())
    try:
        return connection.channel().queue_declare(broker.queue, passive=True).method.message_count
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["broker-restart", "forced-close"])
def test_two_workers_and_a_broker_fault_mid_job_report_once(
    stack, private_broker, tmp_path: Path, fault: str
) -> None:
    receiver, storage = stack["receiver"], stack["storage"]
    procs, broker = _two_workers(stack, private_broker, tmp_path, "trainer.max_epochs=30")
    try:
        assert wait_for(
            lambda: sum("worker consuming" in Path(p.log_path).read_text() for p in procs) == 2,
            120,
        ), _shutdown_all(procs)
        _guide_publish(broker, _job(stack, 211))
        assert receiver.wait_for(lambda reqs: any(r.path == PROGRESS_PATH for r in reqs), 240), (
            _shutdown_all(procs)
        )
        running_proc = _holder_proc(storage, procs, 211)
        if fault == "broker-restart":
            private_broker.restart(down_s=1.0)
        else:
            name = f"{broker.queue}-w{procs.index(running_proc) + 1}"
            assert private_broker.close_connections(name) == 1
        done = _wait_terminal(receiver, 211, timeout=300)
        assert done.path == COMPLETE_PATH, done.json
        # the redelivered message is settled too (acked without training), the queue drains
        assert wait_for(lambda: _queue_depth(private_broker, broker) == 0, 120)
        time.sleep(2)  # room for a (wrong) second completion
    finally:
        logs = _shutdown_all(procs)
    assert len(_accepted(receiver, COMPLETE_PATH, 211)) == 1, logs[-4000:]
    assert _terminal(receiver, 211) == [done]
    starts = [
        r
        for r in receiver.requests_to(PROGRESS_PATH)
        if r.json["progress"]["progress_percent"] == 0
    ]
    assert len(starts) == 1, "the job was trained twice"
    assert "already reported" in logs or "is being trained by" in logs


@pytest.fixture
def secret_rabbit_user() -> Iterator[tuple[str, str]]:
    """A broker user with a distinctive password (deleted afterwards)."""
    user = f"ll-secret-{uuid.uuid4().hex[:6]}"
    password = f"rmq-pw-{uuid.uuid4().hex}"
    _rabbitmqctl("add_user", user, password)
    try:
        _rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        _rabbitmqctl("delete_user", user)


@pytest.mark.slow
def test_secrets_never_reach_logs_or_webhooks(
    stack, secret_rabbit_user, monkeypatch, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver, broker, storage = stack["receiver"], stack["broker"], stack["storage"]
    user, rmq_password = secret_rabbit_user
    secrets = {
        "INTERNAL_API_TOKEN": f"tok-{uuid.uuid4().hex}",
        "AWS_SECRET_ACCESS_KEY": f"aws-{uuid.uuid4().hex}",
        "RABBITMQ_PASSWORD": rmq_password,
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RABBITMQ_USER", user)
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")  # the most verbose the worker gets
    log_path = tmp_path / "worker.log"
    proc = _spawn_logged(stack, log_path, "trainer.max_epochs=1")
    try:
        publish_job(broker, _job(stack, 101))
        bad_url = f"s3://{storage.bucket}/styles/missing.png"
        publish_job(broker, _job(stack, 102, image_urls=[bad_url]))  # a failure path too
        assert _wait_terminal(receiver, 101).path == COMPLETE_PATH
        assert _wait_terminal(receiver, 102).json["error_code"] == "DOWNLOAD_FAILED"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        _kill(proc)
    time.sleep(0.5)  # the drain thread writes the last lines
    output = log_path.read_text(encoding="utf-8")
    assert "worker consuming" in output and "settled: ACK" in output  # really captured
    assert f"{user}@" in output  # the broker was reached as the secret user
    webhooks = [r.body.decode("utf-8", "replace") for r in receiver.requests]
    other_headers = [
        f"{k}: {v}"
        for r in receiver.requests
        for k, v in r.headers.items()
        if k.lower() != "authorization"
    ]
    for name, value in secrets.items():
        assert value not in output, f"{name} leaked into the worker's output"
        assert value not in caplog.text, f"{name} leaked into the test process's logs"
        assert not any(value in body for body in webhooks), f"{name} leaked into a webhook"
        assert not any(value in h for h in other_headers), f"{name} leaked into a header"
    auth = {r.header("Authorization") for r in receiver.requests}
    assert auth == {f"Bearer {secrets['INTERNAL_API_TOKEN']}"}  # used, only where it belongs
