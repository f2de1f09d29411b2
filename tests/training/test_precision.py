"""Precision (``lightning_lora.training.precision``): run_info.json and the start log say the
effective precision and the frozen weights' dtype; a bf16-capable GPU running 16-mixed is told
the override."""

from __future__ import annotations

import json
import logging

import pytest

from lightning_lora.training.precision import BF16_OVERRIDE, precision_info
from lightning_lora.training.run import train

pytestmark = pytest.mark.slow  # compiles and trains: make test, not make test-fast


def test_run_info_records_the_effective_precision(make_cfg, caplog) -> None:
    """16-mixed on a CPU is Lightning's bf16-mixed: that, and bf16 frozen weights, are recorded."""
    cfg = make_cfg("trainer.precision=16-mixed", "trainer.max_epochs=1")
    with caplog.at_level(logging.INFO, logger="lightning_lora.training.run"):
        result = train(cfg)
    info = json.loads((result.output_dir / "run_info.json").read_text())
    assert info["precision"] == "bf16-mixed" and info["requested_precision"] == "16-mixed"
    assert info["frozen_weight_dtype"] == "bfloat16" and info["lora_parameter_dtype"] == "float32"
    assert info["accelerator"] == "cpu" and "precision_hint" not in info
    assert info["versions"]["torch"] != "unknown"
    started = [m for m in caplog.messages if m.startswith("precision ")]
    assert started == [
        "precision bf16-mixed (requested 16-mixed) on cpu: frozen weights bfloat16, "
        "LoRA parameters float32"
    ]


def test_a_bf16_gpu_running_16_mixed_is_told_the_override() -> None:
    hint = precision_info("16-mixed", "cuda", bf16_supported=True)
    assert hint["frozen_weight_dtype"] == "float16"
    assert (
        BF16_OVERRIDE == "trainer.precision=bf16-mixed" and BF16_OVERRIDE in hint["precision_hint"]
    )
    assert "precision_hint" not in precision_info("16-mixed", "cuda", bf16_supported=False)
    assert "precision_hint" not in precision_info("bf16-mixed", "cuda", bf16_supported=True)
    assert "precision_hint" not in precision_info("bf16-mixed", "cpu")
