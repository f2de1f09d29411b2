"""Optimizers of the ``module/optimizer`` config group that need more than a ``_target_``.

Each factory takes the parameters (or parameter groups) first, like ``torch.optim.AdamW``, so the
configs stay ``_partial_``. Optional packages are imported when the optimizer is built, with an
error naming the extra to install. Schedule-free optimizers hold two sets of weights: the ones
they train on (``train()`` mode) and the averaged ones to evaluate and export (``eval()`` mode);
:func:`set_train_mode` switches every optimizer that has the two modes.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

import torch

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _require(module: str, package: str, choice: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"module/optimizer={choice} needs the {package!r} package: "
            f"pip install {package} (or pip install -e '.[optimizers]')"
        ) from e


def _devices(params: Sequence[torch.Tensor | dict[str, Any]]) -> set[str]:
    tensors: list[torch.Tensor] = []
    for entry in params:
        tensors.extend(entry["params"] if isinstance(entry, dict) else [entry])
    return {t.device.type for t in tensors}


def adamw(
    params: Params, *, fused: bool | None = None, foreach: bool | None = None, **kwargs: Any
) -> torch.optim.AdamW:
    """Torch's AdamW, where ``fused: true`` alone asks for the fused kernel.

    The config's default is the multi-tensor update (``foreach: true``): torch picks it by itself
    on CUDA only, and on a CPU it otherwise loops over the LoRA tensors in Python (about 10 ms a
    step on the tiny model's 256 tensors; the same numbers bit for bit). torch refuses ``fused``
    and ``foreach`` both on, so ``module.optimizer.fused=true`` wins over that default here; this
    one rule is why the group's default is not a bare ``torch.optim.AdamW`` target.

    Args:
        params: Parameters or parameter groups.
        fused: ``True``: the fused kernel (CUDA or CPU); ``None``: torch picks.
        foreach: ``True``: the multi-tensor update (ignored with ``fused``); ``None``: torch picks.
        **kwargs: ``torch.optim.AdamW`` arguments (``lr``, ``weight_decay``, ``eps``, ...).

    Returns:
        The optimizer.
    """
    if fused:
        foreach = None
    return torch.optim.AdamW(params, fused=fused, foreach=foreach, **kwargs)


def adamw_8bit(params: Params, **kwargs: Any) -> torch.optim.Optimizer:
    """The 8-bit AdamW of bitsandbytes (optimizer state in 8 bits); CUDA only.

    Args:
        params: Parameters or parameter groups (on a CUDA device).
        **kwargs: ``bitsandbytes.optim.AdamW8bit`` arguments (``lr``, ``weight_decay``, ...).

    Returns:
        The optimizer.

    Raises:
        ValueError: The parameters are not on a CUDA device.
        ImportError: bitsandbytes is not installed.
    """
    entries: list[torch.Tensor | dict[str, Any]] = list(params)
    devices = _devices(entries)
    if devices != {"cuda"}:
        raise ValueError(
            "module/optimizer=adamw_8bit (bitsandbytes) runs on a CUDA GPU only, but the LoRA "
            f"parameters are on {', '.join(sorted(devices))}; use module/optimizer=adamw on a CPU"
        )
    bnb = _require("bitsandbytes", "bitsandbytes", "adamw_8bit")
    return bnb.optim.AdamW8bit(entries, **kwargs)


def prodigy(params: Params, **kwargs: Any) -> torch.optim.Optimizer:
    """Prodigy (``prodigyopt``): adapts the step size itself; ``lr`` 1.0 by convention.

    Args:
        params: Parameters or parameter groups.
        **kwargs: ``prodigyopt.Prodigy`` arguments.

    Returns:
        The optimizer.
    """
    return _require("prodigyopt", "prodigyopt", "prodigy").Prodigy(params, **kwargs)


def schedule_free_adamw(params: Params, **kwargs: Any) -> torch.optim.Optimizer:
    """Schedule-free AdamW (``schedulefree``): no LR schedule; eval/train weight modes.

    Args:
        params: Parameters or parameter groups.
        **kwargs: ``schedulefree.AdamWScheduleFree`` arguments.

    Returns:
        The optimizer (in ``eval`` mode until :func:`set_train_mode` switches it).
    """
    module = _require("schedulefree", "schedulefree", "schedule_free")
    return module.AdamWScheduleFree(params, **kwargs)


def has_train_mode(optimizer: Any) -> bool:
    """Whether an optimizer keeps separate train and eval weights (schedule-free)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


def set_train_mode(optimizers: Sequence[Any], train: bool) -> list[bool]:
    """Put schedule-free optimizers in train or eval mode (others are left alone).

    Args:
        optimizers: The trainer's optimizers.
        train: ``True`` for the training weights, ``False`` for the evaluation weights.

    Returns:
        For each optimizer with modes, whether it was in train mode before (to restore it).
    """
    before = []
    for optimizer in optimizers:
        if not has_train_mode(optimizer):
            continue
        inner = getattr(optimizer, "optimizer", optimizer)
        before.append(bool(inner.param_groups[0].get("train_mode", False)))
        inner.train() if train else inner.eval()
    return before


def restore_train_mode(optimizers: Sequence[Any], before: Sequence[bool]) -> None:
    """Undo :func:`set_train_mode` with the modes it returned."""
    with_modes = [o for o in optimizers if has_train_mode(o)]
    for optimizer, was_train in zip(with_modes, before, strict=True):
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.train() if was_train else inner.eval()
