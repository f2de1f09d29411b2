"""The device-side noise tables give bit-identical results to diffusers' ``add_noise``,
``get_velocity`` and ``compute_snr`` (``lightning_lora.training.noise``)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lightning_lora.training.models import SD15_SCHEDULER
from lightning_lora.training.noise import NoiseTables


def _tables(prediction_type: str) -> NoiseTables:
    return NoiseTables(DDPMScheduler(**{**SD15_SCHEDULER, "prediction_type": prediction_type}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_noise_tables_match_diffusers_exactly(dtype: torch.dtype, autocast: bool) -> None:
    holder = _tables("v_prediction")
    sched = holder.scheduler
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        latents = torch.randn(8, 4, 8, 8, generator=gen).to(dtype)
        noise = torch.randn(8, 4, 8, 8, generator=gen).to(dtype)
        timesteps = torch.randint(0, 1000, (8,), generator=gen)
        timesteps[:2] = torch.tensor([0, 999])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ours = (
                holder.add_noise(latents, noise, timesteps),
                holder.velocity(latents, noise, timesteps),
                holder.snr(timesteps),
            )
            theirs = (
                sched.add_noise(latents, noise, timesteps),
                sched.get_velocity(latents, noise, timesteps),
                compute_snr(sched, timesteps),
            )
        for a, b in zip(ours, theirs, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b)
    # built once per dtype and reused (the SNR table is read from the float32 entry)
    assert len(holder.built) == (1 if dtype == torch.float32 else 2)


def test_noise_tables_follow_the_autocast_state() -> None:
    holder = _tables("epsilon")
    x = torch.randn(2, 4, 8, 8).bfloat16()
    t = torch.tensor([10, 500])
    holder.add_noise(x, x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        holder.add_noise(x, x, t)
    assert len(holder.built) == 2
