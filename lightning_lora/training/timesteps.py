"""Sampling the training timesteps: uniform, logit-normal, or uniform over a range.

``uniform`` is the diffusers recipe (``torch.randint(0, T)``). ``logit_normal`` draws
``u = sigmoid(N(mean, std))`` and takes ``floor(u * T)`` (SD3's and kohya's discrete form;
diffusers' ``compute_density_for_timestep_sampling`` gives the same ``u`` and is used for it).
``range`` draws uniformly from ``[min_timestep, max_timestep)`` (kohya's ``--min_timestep`` /
``--max_timestep``).
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

#: The samplers of ``module.timestep_sampling``.
SAMPLERS = ("uniform", "logit_normal", "range")


def check_sampling(
    sampling: str, num_train_timesteps: int, min_timestep: int = 0, max_timestep: int | None = None
) -> None:
    """Validate the sampling settings (at config time, not in the training step).

    Args:
        sampling: One of :data:`SAMPLERS`.
        num_train_timesteps: The scheduler's number of timesteps ``T``.
        min_timestep: First timestep of ``range`` (inclusive).
        max_timestep: End of ``range`` (exclusive; ``None`` = ``T``).

    Raises:
        ValueError: An unknown sampler, a bad range, or range bounds with another sampler.
    """
    if sampling not in SAMPLERS:
        raise ValueError(
            f"module.timestep_sampling must be one of {', '.join(SAMPLERS)}, got {sampling!r}"
        )
    end = num_train_timesteps if max_timestep is None else max_timestep
    if sampling != "range" and (min_timestep != 0 or end != num_train_timesteps):
        raise ValueError(
            "module.min_timestep/max_timestep only apply to module.timestep_sampling=range "
            f"(got {sampling!r})"
        )
    if not 0 <= min_timestep < end <= num_train_timesteps:
        raise ValueError(
            f"need 0 <= module.min_timestep < module.max_timestep <= {num_train_timesteps}, got "
            f"{min_timestep} and {max_timestep}"
        )


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    device: torch.device,
    sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    min_timestep: int = 0,
    max_timestep: int | None = None,
) -> torch.Tensor:
    """Draw one integer timestep per sample from the global torch RNG.

    Args:
        batch_size: Number of timesteps.
        num_train_timesteps: The scheduler's ``T``.
        device: Where the timesteps live.
        sampling: ``uniform``, ``logit_normal`` or ``range``.
        logit_mean: Mean of the normal before the sigmoid (``logit_normal``).
        logit_std: Standard deviation of that normal (``logit_normal``).
        min_timestep: First timestep of ``range``.
        max_timestep: End (exclusive) of ``range``; ``None`` = ``T``.

    Returns:
        ``(batch_size,)`` int64 timesteps in ``[0, T)``.
    """
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (batch_size,), device=device)
    if sampling == "range":
        end = num_train_timesteps if max_timestep is None else max_timestep
        return torch.randint(min_timestep, end, (batch_size,), device=device)
    if sampling == "logit_normal":
        u = compute_density_for_timestep_sampling(
            "logit_normal", batch_size, logit_mean=logit_mean, logit_std=logit_std, device=device
        )
        return (u * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)
    raise ValueError(f"module.timestep_sampling must be one of {', '.join(SAMPLERS)}")
