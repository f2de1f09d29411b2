"""Forward diffusion from device-side tables, bit-identical to diffusers' scheduler helpers.

diffusers' ``add_noise``, ``get_velocity`` and ``compute_snr`` move, convert and raise
``alphas_cumprod`` to powers on every call (several small kernels per step). :class:`NoiseTables`
builds those tables once per device, dtype and autocast state with exactly the same operations,
so indexing them gives bit-identical results (``tests/training/test_noise.py``).

:func:`configure_scheduler` gives a run its own training scheduler with ``module.prediction_type``
and ``module.zero_terminal_snr`` (diffusers' ``rescale_betas_zero_snr``): the tables, the loss
and the sampling pipelines built from its config all follow it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

__all__ = ["PREDICTION_TYPES", "NoiseTables", "configure_scheduler"]

log = logging.getLogger(__name__)

#: The prediction targets the loss supports.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def configure_scheduler(
    scheduler: Any, prediction_type: str | None = None, zero_terminal_snr: bool = False
) -> DDPMScheduler:
    """A new training scheduler from ``scheduler``'s config with a run's noise options.

    The base model's scheduler (shared by runs in one process) is left untouched.

    Args:
        scheduler: The base model's noise scheduler.
        prediction_type: ``epsilon`` or ``v_prediction``; ``None`` keeps the scheduler's.
        zero_terminal_snr: Rescale the betas to a zero terminal SNR (diffusers'
            ``rescale_zero_terminal_snr``, through the schedulers' ``rescale_betas_zero_snr``),
            with ``trailing`` timestep spacing for samplers (both as Lin et al. 2023 recommend).

    Returns:
        A ``DDPMScheduler``; pipelines built ``from_config`` of it inherit both options.

    Raises:
        ValueError: For an unsupported prediction type.
    """
    kind = prediction_type or scheduler.config["prediction_type"]
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"module.prediction_type must be one of {', '.join(PREDICTION_TYPES)} or null, "
            f"got {kind!r}"
        )
    overrides: dict[str, Any] = {"prediction_type": kind}
    if zero_terminal_snr:
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        if kind == "epsilon":
            log.warning(
                "module.zero_terminal_snr with epsilon prediction: at the last timestep the "
                "input is pure noise and epsilon is not learnable; use "
                "module.prediction_type=v_prediction"
            )
    return DDPMScheduler.from_config(scheduler.config, **overrides)


Tables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class NoiseTables:
    """``sqrt(alpha_bar)``, ``sqrt(1 - alpha_bar)`` and SNR per timestep, on the samples' device.

    Args:
        scheduler: A diffusers noise scheduler with ``alphas_cumprod`` (e.g. ``DDPMScheduler``).
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        #: (device, dtype, autocast state) -> the tables
        self.built: dict[tuple[Any, ...], Tables] = {}

    def tables(self, device: torch.device | str, dtype: torch.dtype) -> Tables:
        """The tables for samples of ``dtype`` on ``device`` (built on first use).

        Returns:
            ``(sqrt_alpha_prod, sqrt_one_minus_alpha_prod, snr)``, each indexed by timestep.
        """
        device = torch.device(device)
        autocast = torch.is_autocast_enabled(device.type)
        key = (
            device,
            dtype,
            autocast,
            torch.get_autocast_dtype(device.type) if autocast else None,
        )
        tables = self.built.get(key)
        if tables is None:
            alphas_cumprod = self.scheduler.alphas_cumprod.to(device=device)
            cast = alphas_cumprod.to(dtype=dtype)
            sqrt_alpha_prod = cast**0.5
            sqrt_one_minus_alpha_prod = (1 - cast) ** 0.5
            snr = (alphas_cumprod**0.5 / (1.0 - alphas_cumprod) ** 0.5) ** 2
            tables = (sqrt_alpha_prod, sqrt_one_minus_alpha_prod, snr)
            self.built[key] = tables
        return tables

    def _coefficients(
        self, latents: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``sqrt(alpha_bar_t)`` and ``sqrt(1 - alpha_bar_t)`` shaped to broadcast over latents."""
        sqrt_alpha, sqrt_one_minus, _ = self.tables(latents.device, latents.dtype)
        timesteps = timesteps.to(latents.device)
        shape = (-1,) + (1,) * (latents.ndim - 1)
        return sqrt_alpha[timesteps].view(shape), sqrt_one_minus[timesteps].view(shape)

    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The scheduler's ``add_noise`` (forward diffusion)."""
        sqrt_alpha, sqrt_one_minus = self._coefficients(latents, timesteps)
        return sqrt_alpha * latents + sqrt_one_minus * noise

    def velocity(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The scheduler's ``get_velocity`` (the v-prediction target)."""
        sqrt_alpha, sqrt_one_minus = self._coefficients(latents, timesteps)
        return sqrt_alpha * noise - sqrt_one_minus * latents

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``diffusers.training_utils.compute_snr`` (float32)."""
        return self.tables(timesteps.device, torch.float32)[2][timesteps]
