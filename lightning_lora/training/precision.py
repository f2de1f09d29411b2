"""Precision: the dtype of the frozen weights for a Lightning precision, and a hint for GPUs.

LoRA parameters always stay float32 (:func:`diffusers.training_utils.cast_training_params`);
only the frozen UNet, VAE and text encoder follow the trainer's precision.
"""

from __future__ import annotations

import torch

__all__ = ["BF16_OVERRIDE", "frozen_weight_dtype", "precision_info"]


def frozen_weight_dtype(precision: str, accelerator: str) -> torch.dtype:
    """Dtype of the frozen weights for a Lightning precision setting (LoRA params stay fp32).

    Args:
        precision: The trainer's resolved precision (``16-mixed``, ``bf16-mixed``, ...).
        accelerator: ``cuda``, ``cpu``, ...

    Returns:
        ``float16`` for 16-bit precision, ``bfloat16`` for bf16, else ``float32``.
    """
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16") and accelerator != "cpu":
        return torch.float16
    return torch.float32


#: The override that a 16-mixed run on a bf16-capable GPU is told about.
BF16_OVERRIDE = "trainer.precision=bf16-mixed"


def precision_info(
    precision: str,
    accelerator: str,
    requested: str | None = None,
    bf16_supported: bool | None = None,
) -> dict[str, str]:
    """The run's effective precision and weight dtypes, and a hint where the GPU does better.

    Args:
        precision: The trainer's resolved precision (``trainer.precision``: Lightning's choice,
            e.g. ``bf16-mixed`` for ``16-mixed`` on a CPU).
        accelerator: ``cuda``, ``cpu``, ...
        requested: The configured ``trainer.precision``.
        bf16_supported: Whether the GPU computes in bf16 (asked of torch when ``None``).

    Returns:
        ``precision`` (effective), ``requested_precision``, ``accelerator``,
        ``frozen_weight_dtype`` (UNet, VAE and text encoder), ``lora_parameter_dtype`` (always
        float32), and ``precision_hint`` on a bf16-capable GPU running ``16-mixed``.
    """
    dtype = frozen_weight_dtype(precision, accelerator)
    info = {
        "precision": precision,
        "requested_precision": str(requested if requested is not None else precision),
        "accelerator": accelerator,
        "frozen_weight_dtype": str(dtype).removeprefix("torch."),
        "lora_parameter_dtype": "float32",
    }
    if precision == "16-mixed" and accelerator == "cuda":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if bf16_supported:
            info["precision_hint"] = (
                "this GPU supports bf16 but the run uses 16-mixed (fp16 with a GradScaler); "
                f"{BF16_OVERRIDE} needs no GradScaler and lets fused AdamW clip"
            )
    return info
