"""The LightningModule's speed features (``lightning_lora.training.module.LoRAModule``).

Fused AdamW is clipped under bf16.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_lora.training.run import train

pytestmark = pytest.mark.slow  # compiles and trains: make test, not make test-fast


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
