"""An exponential moving average of the LoRA weights, on the training device or on the CPU.

A thin layer over ``diffusers.training_utils.EMAModel`` (its decay schedule, ``copy_to``,
``store``/``restore`` and state dict): it adds the update period, keeping the averages on another
device than the weights, and a context manager that swaps the averages in. diffusers' decay warms
up as ``min(decay, (1 + n) / (10 + n))`` with ``n`` the number of updates so far minus one, so the
first update copies the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers.training_utils import EMAModel


class LoraEMA:
    """The EMA of a fixed list of trainable parameters."""

    def __init__(
        self,
        parameters: Sequence[torch.nn.Parameter],
        decay: float = 0.999,
        every_n_steps: int = 1,
        device: str | torch.device | None = None,
    ) -> None:
        """Start the averages at the current weights.

        Args:
            parameters: The trainable parameters (the same list, in the same order, every time).
            decay: The largest decay (diffusers warms it up from 0).
            every_n_steps: Update after every this many optimizer steps.
            device: Where the averages live (``None``: with the weights; ``cpu`` saves GPU
                memory at the price of a copy per update).
        """
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"module.ema.decay must be in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"module.ema.every_n_steps must be >= 1, got {every_n_steps}")
        self.parameters = list(parameters)
        self.every_n_steps = every_n_steps
        self.device = torch.device(device) if device else self.parameters[0].device
        self.model = EMAModel(self.parameters, decay=decay)
        self.model.to(self.device)
        self._last_step = -1

    def _sources(self) -> Sequence[torch.Tensor]:
        if all(p.device == self.device for p in self.parameters):
            return self.parameters
        # EMAModel averages only tensors that require grad (it copies the others), so the copies
        # on the EMA's device keep the flag
        return [p.detach().to(self.device).requires_grad_(p.requires_grad) for p in self.parameters]

    @torch.no_grad()
    def maybe_update(self, global_step: int) -> bool:
        """Update after optimizer step ``global_step`` when it is due (every N steps).

        Called after every batch; with gradient accumulation the step count repeats until the
        optimizer steps, and a repeated count is not averaged again.

        Args:
            global_step: The trainer's optimizer step count after the step.

        Returns:
            Whether the averages were updated.
        """
        if global_step < 1 or global_step == self._last_step or global_step % self.every_n_steps:
            return False
        self._last_step = global_step
        self.model.step(self._sources())  # type: ignore[arg-type]  # diffusers annotates Parameter; any tensors work
        return True

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Swap the averages into the parameters, and the trained weights back afterwards."""
        self.model.store(self.parameters)
        self.model.copy_to(self.parameters)
        try:
            yield
        finally:
            self.model.restore(self.parameters)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers only (checkpoints load with ``weights_only=True``)."""
        state = dict(self.model.state_dict())
        state["shadow_params"] = [t.detach().cpu().clone() for t in state["shadow_params"]]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output onto the EMA's device."""
        self.model.load_state_dict(dict(state))
        self.model.to(self.device)
