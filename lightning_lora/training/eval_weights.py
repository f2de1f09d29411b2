"""The weights validation and export use: the EMA's averages and schedule-free's eval weights.

A mixin of :class:`lightning_lora.training.module.LoRAModule` (it uses its ``unet``,
``text_encoder``, ``trains_text_encoder`` and ``hparams``), kept apart from the loss and the
training step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.data import AttributeDict
from typing_extensions import override

from lightning_lora.lora.adapters import lora_parameters
from lightning_lora.training.ema import LoraEMA
from lightning_lora.training.optimizers import restore_train_mode, set_train_mode

if TYPE_CHECKING:
    # the type checker sees the host class, so the hooks below are checked as its overrides
    from lightning import LightningModule as _Host
    from lightning import Trainer
else:
    _Host = object

log = logging.getLogger(__name__)


class EvalWeightsMixin(_Host):
    """EMA and schedule-free handling of a ``LightningModule`` that trains LoRA parameters."""

    ema: LoraEMA | None
    _ema_state: dict[str, Any] | None
    #: what ``save_hyperparameters`` stores (Lightning types it ``AttributeDict | MutableMapping``)
    hparams: AttributeDict
    unet: torch.nn.Module
    text_encoder: torch.nn.Module

    if TYPE_CHECKING:

        @property
        def trains_text_encoder(self) -> bool:
            """Whether the text encoder's LoRA trains (the host's property)."""
            ...

    def attached_trainer(self) -> Trainer | None:
        """The trainer the module is attached to, or ``None`` outside one.

        Lightning's ``trainer`` property raises outside a trainer; export and sampling also run
        on a module that is not (or no longer) attached.
        """
        try:
            return self.trainer
        except RuntimeError:
            return None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters: the UNet's, then the text encoder's (when it trains)."""
        params = lora_parameters(self.unet)
        if self.trains_text_encoder:
            params += lora_parameters(self.text_encoder)
        return params

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """The weights to validate and export: the EMA's and/or schedule-free's averaged ones.

        Without an EMA and with an ordinary optimizer this changes nothing. Afterwards the
        training weights and optimizer modes are back exactly as they were.
        """
        trainer = self.attached_trainer()
        optimizers = list(trainer.optimizers) if trainer is not None else []
        before = set_train_mode(optimizers, train=False)
        try:
            with self.ema.averaged() if self.ema is not None else contextlib.nullcontext():
                yield
        finally:
            restore_train_mode(optimizers, before)

    @override
    def on_train_epoch_start(self) -> None:
        set_train_mode(self.trainer.optimizers, train=True)  # schedule-free: train weights

    @override
    def on_train_epoch_end(self) -> None:
        # schedule-free: the epoch-end checkpoint (saved after this hook) and the export after
        # the last epoch hold the averaged weights; the next epoch switches back
        set_train_mode(self.trainer.optimizers, train=False)

    def start_ema(self) -> None:
        """Start the EMA of the LoRA weights when ``ema.enabled``.

        Called at fit start, after a resume's weights are loaded; a resume's averages then
        replace the fresh ones.
        """
        settings = self.hparams.get("ema") or {}
        if not settings.get("enabled", False):
            return
        self.ema = LoraEMA(
            self.trainable_parameters(),
            decay=float(settings.get("decay", 0.999)),
            every_n_steps=int(settings.get("every_n_steps", 1)),
            device=settings.get("device"),
        )
        if self._ema_state is not None:  # resuming: the checkpoint's averages
            self.ema.load_state_dict(self._ema_state)
            self._ema_state = None

    def save_ema_state(self, checkpoint: dict[str, Any]) -> None:
        """Put the EMA's state into a checkpoint (``checkpoint["ema"]``)."""
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def load_ema_state(self, checkpoint: dict[str, Any]) -> None:
        """Keep a checkpoint's EMA state for :meth:`start_ema`."""
        self._ema_state = checkpoint.get("ema")
        if self._ema_state is None and (self.hparams.get("ema") or {}).get("enabled", False):
            log.warning("the checkpoint has no EMA state: the EMA restarts from its weights")
