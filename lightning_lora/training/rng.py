"""The global RNG states as checkpoint-friendly tensors (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state_tensors() -> dict[str, Any]:
    """The global RNG states of torch, CUDA, numpy and Python as tensors and ints.

    Only tensors and plain numbers, so a checkpoint loads with ``torch.load(weights_only=True)``
    (Lightning's default), also when it was fetched from object storage.
    """
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the global RandomState is an MT19937: the legacy tuple
    py_version, py_internal, _ = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gaussian": float(np_state[4]),
        "python_version": int(py_version),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state_tensors(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state_tensors`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gaussian"],
        )
    )
    random.setstate((state["python_version"], tuple(state["python_internal"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
