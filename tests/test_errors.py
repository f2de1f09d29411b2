"""The one fail-or-requeue rule (``lightning_lora.errors.disposition_of``) and the error chain.

A shutdown (``JobInterrupted``) or S3 down for the whole retry budget
(``StorageUnavailableError``) sends the job back to the queue, also when another error was raised
while handling one (``__context__``) or from one (``__cause__``). Otherwise the first project
error of the chain decides the failure code, and an exception without one is
``TRAINING_FAILED``.
"""

from __future__ import annotations

import threading

import pytest

from lightning_lora.errors import (
    DatasetError,
    DownloadError,
    InvalidImageError,
    JobCrashedError,
    JobInterrupted,
    LightningLoraError,
    NonFiniteLossError,
    StorageUnavailableError,
    UploadError,
    disposition_of,
    project_error,
)


def raised_while_handling(first: BaseException, then: BaseException) -> BaseException:
    """``then`` raised inside ``except`` of ``first`` (Python sets ``then.__context__``)."""
    try:
        try:
            raise first
        except BaseException:
            raise then  # noqa: B904 (the implicit context is the point)
    except BaseException as exc:
        return exc


def raised_from(cause: BaseException, then: BaseException) -> BaseException:
    """``raise then from cause`` (Python sets ``then.__cause__``)."""
    try:
        raise then from cause
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("requeued", [JobInterrupted, StorageUnavailableError])
def test_a_shutdown_or_s3_down_requeues_and_reports_nothing(requeued: type) -> None:
    exc = requeued("the reason")
    disposition = disposition_of(exc)
    assert disposition.requeue is True
    assert disposition.error_code is None
    assert disposition.error is exc


@pytest.mark.parametrize("requeued", [JobInterrupted, StorageUnavailableError])
def test_an_error_raised_while_handling_one_still_requeues(requeued: type) -> None:
    outage = requeued("S3 unreachable for 300s")
    exc = raised_while_handling(outage, KeyError("a bug in the outage handling"))
    assert exc.__context__ is outage and exc.__cause__ is None
    disposition = disposition_of(exc)
    assert disposition.requeue is True and disposition.error_code is None
    assert disposition.error is outage
    assert project_error(exc) is outage


@pytest.mark.parametrize("requeued", [JobInterrupted, StorageUnavailableError])
def test_an_error_raised_from_one_still_requeues(requeued: type) -> None:
    outage = requeued("S3 unreachable")
    exc = raised_from(outage, RuntimeError("wrapped"))
    assert exc.__cause__ is outage
    assert disposition_of(exc).requeue is True
    assert disposition_of(exc).error is outage


def test_deeper_chains_are_followed() -> None:
    outage = StorageUnavailableError("S3 down")
    middle = raised_while_handling(outage, ValueError("while handling"))
    top = raised_from(middle, RuntimeError("on top"))
    assert project_error(top) is outage
    assert disposition_of(top).requeue is True


def test_the_first_project_error_of_the_chain_decides_the_failure() -> None:
    outage = StorageUnavailableError("S3 down while listing")
    dataset = raised_from(outage, DatasetError("no images in s3://b/styles/"))
    disposition = disposition_of(dataset)
    assert disposition.requeue is False
    assert disposition.error_code == "INVALID_DATASET"
    assert disposition.error is dataset
    # a foreign error on top of it: still the dataset's failure, not a requeue
    top = raised_while_handling(dataset, RuntimeError("cleanup failed"))
    assert disposition_of(top) == disposition


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidImageError("bad png"), "INVALID_IMAGE"),
        (DatasetError("empty"), "INVALID_DATASET"),
        (DownloadError("missing"), "DOWNLOAD_FAILED"),
        (UploadError("refused"), "UPLOAD_FAILED"),
        (NonFiniteLossError("nan"), "NON_FINITE_LOSS"),
        (JobCrashedError("delivered 3 times"), "REDELIVERY_LIMIT"),
        (LightningLoraError("ours, no code of its own"), "TRAINING_FAILED"),
    ],
)
def test_a_project_error_fails_with_its_code(error: LightningLoraError, code: str) -> None:
    for exc in (error, raised_from(error, RuntimeError("wrapped"))):
        disposition = disposition_of(exc)
        assert (disposition.requeue, disposition.error_code) == (False, code)
        assert disposition.error is error


def test_an_error_without_a_project_error_fails_as_training_failed() -> None:
    plain = raised_while_handling(KeyError("k"), ValueError("no project error anywhere"))
    disposition = disposition_of(plain)
    assert disposition.requeue is False
    assert disposition.error_code == "TRAINING_FAILED"
    assert disposition.error is None
    assert project_error(plain) is None


def test_the_cause_is_followed_before_the_context() -> None:
    """``raise X from Y`` inside ``except Z``: Y decides (Python prints Y, not Z)."""
    invalid = InvalidImageError("bad png")
    exc = raised_while_handling(StorageUnavailableError("S3 down"), RuntimeError("top"))
    exc.__cause__ = invalid
    assert disposition_of(exc).error_code == "INVALID_IMAGE"
    assert disposition_of(exc).error is invalid


def _settles(exc: BaseException, timeout_s: float = 5.0) -> bool:
    """Whether ``disposition_of(exc)`` returns (in a thread, so a loop cannot hang the run)."""
    done = threading.Event()

    def run() -> None:
        disposition_of(exc)
        project_error(exc)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(timeout_s)


def test_a_cycle_in_the_chain_terminates() -> None:
    itself = RuntimeError("its own context")
    itself.__context__ = itself
    assert _settles(itself)
    assert disposition_of(itself).error_code == "TRAINING_FAILED"

    a, b = ValueError("a"), KeyError("b")
    a.__cause__, b.__context__ = b, a
    assert _settles(a)
    assert project_error(a) is None

    outage = StorageUnavailableError("down")
    top = RuntimeError("top")
    top.__context__, outage.__context__ = outage, top  # a cycle through a requeueing error
    assert _settles(top)
    assert disposition_of(top).requeue is True
