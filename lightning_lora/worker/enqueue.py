r"""``lightning-lora-enqueue``: publish a training job to the queue (for operators and tests).

Examples::

    lightning-lora-enqueue --style-id 42 --webhook-url http://backend:8000 \
        --image-url s3://styles/42/a.png --image-url s3://styles/42/b.png --num-epochs 20
    lightning-lora-enqueue --file job.json
    lightning-lora-enqueue --cancel 42      # cancel style 42's queued or running job

The job is validated with :func:`~lightning_lora.worker.messages.parse_job` before it is
published (persistent, with publisher confirms); the message id is printed on stdout.
``--cancel STYLE_ID`` publishes the backend's cancel message instead (``{"style_id": N}`` to the
cancel queue, :mod:`lightning_lora.worker.cancels`). The
broker is configured by the ``RABBITMQ_*`` environment variables (see
:class:`~lightning_lora.worker.broker.BrokerSettings`).

Exit codes: 0 published, 2 invalid job or arguments, 1 broker error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pika.exceptions

from lightning_lora.clients.contract import style_id_problem
from lightning_lora.errors import InvalidMessageError
from lightning_lora.worker.broker import (
    BrokerSettings,
    PublishError,
    TopologyError,
    publish_cancel,
    publish_job,
)
from lightning_lora.worker.messages import DEFAULT_MAX_IMAGES, parse_job

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BROKER_ERROR = 1
EXIT_INVALID = 2

# (option dest, job field) for the optional overrides.
_OVERRIDE_OPTIONS: tuple[tuple[str, str], ...] = (
    ("num_epochs", "num_epochs"),
    ("learning_rate", "learning_rate"),
    ("lora_rank", "lora_rank"),
    ("lora_alpha", "lora_alpha"),
    ("resolution", "resolution"),
    ("seed", "seed"),
    ("style_token", "style_token"),
    ("job_id", "job_id"),
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-lora-enqueue",
        description="Validate a LoRA training job and publish it to the training queue.",
    )
    parser.add_argument(
        "--file",
        help="JSON file with the job ('-' for stdin); other options override its fields",
    )
    parser.add_argument("--style-id", type=int, help="the backend's style id")
    parser.add_argument(
        "--cancel",
        type=int,
        metavar="STYLE_ID",
        help="cancel the style's queued or running job (no job is published)",
    )
    parser.add_argument(
        "--image-url",
        action="append",
        dest="image_urls",
        metavar="S3_URL",
        help="s3://bucket/key of a training image (repeatable)",
    )
    parser.add_argument("--webhook-url", help="the backend's base URL, e.g. http://backend:8000")
    parser.add_argument(
        "--caption",
        action="append",
        dest="captions",
        help="caption of the image at the same position (repeatable, one per --image-url)",
    )
    parser.add_argument("--num-epochs", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--lora-rank", type=int)
    parser.add_argument("--lora-alpha", type=float)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--style-token")
    parser.add_argument("--job-id")
    parser.add_argument("--queue", help="queue name (default: RABBITMQ_QUEUE or model_training)")
    parser.add_argument(
        "--max-images",
        type=int,
        default=DEFAULT_MAX_IMAGES,
        help=f"maximum number of image URLs accepted (default {DEFAULT_MAX_IMAGES})",
    )
    return parser


def _read_file(path: str) -> dict[str, Any]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("the job file must contain a JSON object")
    return data


def job_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Assemble the job object from ``--file`` and the other options (options win).

    Args:
        args: Parsed arguments.

    Returns:
        The job as a JSON-serialisable dict (not yet validated).

    Raises:
        OSError: If the file cannot be read.
        ValueError: If the file is not a JSON object.
    """
    job: dict[str, Any] = _read_file(args.file) if args.file else {}
    if args.style_id is not None:
        job["style_id"] = args.style_id
    if args.image_urls:
        job["image_urls"] = list(args.image_urls)
    if args.webhook_url is not None:
        job["webhook_url"] = args.webhook_url
    if args.captions:
        job["captions"] = list(args.captions)
    for dest, field_name in _OVERRIDE_OPTIONS:
        value = getattr(args, dest)
        if value is not None:
            job[field_name] = value
    return job


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 published, 2 invalid job, 1 broker error.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.cancel is not None:
        problem = style_id_problem(args.cancel)
        if problem is not None:
            print(f"error: --cancel: style_id {problem}", file=sys.stderr)
            return EXIT_INVALID
        return _send(args, "cancel", lambda settings: publish_cancel(settings, args.cancel))
    try:
        job = job_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read job: {exc}", file=sys.stderr)
        return EXIT_INVALID
    body = json.dumps(job).encode("utf-8")
    try:
        parse_job(body, max_images=args.max_images)
    except InvalidMessageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return _send(args, "job", lambda settings: publish_job(settings, body))


def _send(args: argparse.Namespace, what: str, publish: Callable[[BrokerSettings], str]) -> int:
    """Publish with the broker settings of the environment (and ``--queue``); print the id."""
    try:
        settings = BrokerSettings.from_env()
        if args.queue:
            settings = settings.replace(queue=args.queue)
        message_id = publish(settings)
    except ValueError as exc:
        print(f"error: bad broker settings: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except (PublishError, TopologyError, pika.exceptions.AMQPError, OSError) as exc:
        print(f"error: could not publish the {what}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BROKER_ERROR
    print(message_id)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
