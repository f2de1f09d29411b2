"""Forward diffusion from device-side tables, bit-identical to diffusers' scheduler helpers.

diffusers' ``add_noise``, ``get_velocity`` and ``compute_snr`` move, convert and raise
``alphas_cumprod`` to powers on every call (several small kernels per step). :class:`NoiseTables`
builds those tables once per device, dtype and autocast state with exactly the same operations,
so indexing them gives bit-identical results (``tests/training/test_noise.py``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["NoiseTables"]

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
