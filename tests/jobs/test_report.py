"""The job's report (``lightning_lora.jobs.report``)."""

from __future__ import annotations

import pytest

from lightning_lora.jobs.report import error_message_of


@pytest.mark.slow
def test_failure_messages_never_carry_config_internals() -> None:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    secret = "hunter2-config-secret"
    with pytest.raises(OmegaConfBaseException) as info:
        OmegaConf.create({"a": "${oc.dict.keys:" + secret + "}"}).a  # noqa: B018
    message = error_message_of(info.value)
    assert secret not in message and "oc.dict" not in message and "<class" not in message
    assert message == "the worker's training configuration is invalid (details in the worker log)"
    long = RuntimeError("first line\n" + "x" * 5000)
    assert error_message_of(long) == "RuntimeError: first line"
