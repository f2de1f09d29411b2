"""The LightningModule's speed features (``lightning_lora.training.module.LoRAModule``).

The device-side noise tables give bit-identical results to diffusers' ``add_noise``,
``get_velocity`` and ``compute_snr``; fused AdamW is clipped under bf16.
"""

from __future__ import annotations

import types

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lightning_lora.training.models import SD15_SCHEDULER
from lightning_lora.training.module import LoRAModule
from lightning_lora.training.run import train

pytestmark = pytest.mark.slow  # compiles and trains: make test, not make test-fast


# --------------------------------------------------------------------------- noise tables
def _table_holder(prediction_type: str) -> types.SimpleNamespace:
    sched = DDPMScheduler(**{**SD15_SCHEDULER, "prediction_type": prediction_type})
    holder = types.SimpleNamespace(noise_scheduler=sched, _noise_tables={})
    holder.noise_tables = types.MethodType(LoRAModule.noise_tables, holder)
    holder._coefficients = types.MethodType(LoRAModule._coefficients, holder)
    return holder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_noise_tables_match_diffusers_exactly(dtype: torch.dtype, autocast: bool) -> None:
    holder = _table_holder("v_prediction")
    sched = holder.noise_scheduler
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        latents = torch.randn(8, 4, 8, 8, generator=gen).to(dtype)
        noise = torch.randn(8, 4, 8, 8, generator=gen).to(dtype)
        timesteps = torch.randint(0, 1000, (8,), generator=gen)
        timesteps[:2] = torch.tensor([0, 999])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ours = (
                LoRAModule.add_noise(holder, latents, noise, timesteps),
                LoRAModule.velocity(holder, latents, noise, timesteps),
                LoRAModule.snr(holder, timesteps),
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
    assert len(holder._noise_tables) == (1 if dtype == torch.float32 else 2)


def test_noise_tables_follow_the_autocast_state() -> None:
    holder = _table_holder("epsilon")
    x = torch.randn(2, 4, 8, 8).bfloat16()
    t = torch.tensor([10, 500])
    LoRAModule.add_noise(holder, x, x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        LoRAModule.add_noise(holder, x, x, t)
    assert len(holder._noise_tables) == 2


# --------------------------------------------------------------------------- fused AdamW + clipping
class _GradNorms(L.Callback):
    """Total gradient norm after the step (clipped; zeroed only in the next step's closure)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_fused_adamw_is_clipped_under_bf16(make_cfg) -> None:
    """Lightning refuses to clip for fused optimizers under AMP; without a scaler it is exact."""
    norms = _GradNorms()
    cfg = make_cfg(
        "trainer.precision=bf16-mixed",
        "module.optimizer.fused=true",
        "trainer.gradient_clip_val=0.001",
        "trainer.max_epochs=1",
    )
    result = train(cfg, callbacks=[norms])
    assert result.metrics["steps"] == 2
    assert norms.norms and max(norms.norms) <= 0.001 * (1 + 1e-3)
