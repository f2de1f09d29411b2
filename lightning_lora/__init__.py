"""lightning_lora: LoRA fine-tuning of Stable Diffusion 1.5 with PyTorch Lightning and Hydra.

The public API is :func:`train` (one path for the CLI, notebooks and the queue worker), its
:class:`TrainResult`, :func:`compose_config` for notebooks, and :func:`load_components`.
Heavy modules are imported lazily so that the queue worker's light parts start fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from lightning_lora.resolvers import register_resolvers
from lightning_lora.version import __version__

register_resolvers()

_LAZY = {
    "train": "lightning_lora.training.run",
    "TrainResult": "lightning_lora.training.run",
    "compose_config": "lightning_lora.config",
    "load_components": "lightning_lora.training.models",
    "tiny_model_path": "lightning_lora.training.models",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")
