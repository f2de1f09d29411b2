"""EMA of the LoRA weights: the averages by hand, used for export, exact resume."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lightning_lora.training.run import train


def test_ema_updates_once_per_due_optimizer_step() -> None:
    from lightning_lora.training.ema import LoraEMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEMA([p], decay=0.9, every_n_steps=2)
    updates = []
    for step in (0, 1, 1, 2, 2, 2, 3, 4):  # gradient accumulation repeats a step count
        with torch.no_grad():
            p.fill_(float(step))
        updates.append(ema.maybe_update(step))
    assert updates == [False, False, False, True, False, False, False, True]
    assert ema.model.optimization_step == 2
    # update 1 copies (decay 0), update 2 uses min(0.9, 2/11)
    d = 2 / 11
    with ema.averaged():
        torch.testing.assert_close(p.detach(), torch.full((3,), d * 2.0 + (1 - d) * 4.0))
    assert torch.equal(p.detach(), torch.full((3,), 4.0))  # the trained weights are back


def _diffusers_key(name: str) -> str:
    return "unet." + name.replace(".lora_A.default.", ".lora.down.").replace(
        ".lora_B.default.", ".lora.up."
    )


class _StepWeights(L.Callback):
    """The LoRA weights after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(
            {n: p.detach().clone() for n, p in pl_module.unet.named_parameters() if p.requires_grad}
        )

    def on_train_end(self, trainer, pl_module) -> None:
        self.ema_device = pl_module.ema.model.shadow_params[0].device.type
        self.trained = {
            n: p.detach().clone() for n, p in pl_module.unet.named_parameters() if p.requires_grad
        }


@pytest.mark.slow  # trains
def test_exported_lora_is_the_ema_by_hand(make_cfg) -> None:
    record = _StepWeights()
    cfg = make_cfg(
        "module.optimizer.lr=1e-2",
        "module.ema.enabled=true",
        "module.ema.decay=0.2",
        "module.ema.every_n_steps=2",
        "module.ema.device=cpu",
    )
    result = train(cfg, callbacks=[record])
    assert len(record.steps) == 4 and record.ema_device == "cpu"
    # diffusers' EMAModel: update n uses decay min(0.2, (1 + k) / (10 + k)), k = n - 1, and
    # decay 0 at k = 0; updates after steps 2 and 4 only
    d2 = min(0.2, 2 / 11)
    exported = load_file(result.lora.diffusers)
    differs = 0
    for name, last in record.trained.items():
        expected = d2 * record.steps[1][name] + (1 - d2) * record.steps[3][name]
        torch.testing.assert_close(exported[_diffusers_key(name)], expected)
        differs += not torch.allclose(exported[_diffusers_key(name)], last)
    assert differs > 0  # the export is not the last weights
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["ema"]["optimization_step"] == 2 and len(ckpt["ema"]["shadow_params"]) == len(
        record.trained
    )


def _column(run_dir: Path, name: str) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv", encoding="utf-8") as f:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(f) if r.get(name)]


@pytest.mark.slow  # trains three times
def test_resume_with_ema_is_exact(make_cfg, tmp_path: Path) -> None:
    options = ("module.optimizer.lr=1e-2", "module.ema.enabled=true", "module.ema.decay=0.5")
    full = train(make_cfg("trainer.max_epochs=4", *options, output_dir=tmp_path / "full"))
    first = train(make_cfg("trainer.max_epochs=2", *options, output_dir=tmp_path / "first"))
    resumed = train(
        make_cfg("trainer.max_epochs=4", *options, output_dir=tmp_path / "resumed"),
        ckpt_path=first.last_checkpoint,
    )
    # val/loss uses the EMA weights: the same curve after the resume means the same EMA
    tail, after = _column(full.output_dir, "val/loss")[2:], _column(resumed.output_dir, "val/loss")
    assert [s for s, _ in tail] == [s for s, _ in after] and len(after) == 2
    assert [v for _, v in tail] == pytest.approx([v for _, v in after], rel=1e-6)
    a, b = load_file(full.lora.diffusers), load_file(resumed.lora.diffusers)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    no_ema = train(make_cfg("trainer.max_epochs=2", options[0], output_dir=tmp_path / "plain"))
    c = load_file(no_ema.lora.diffusers)
    d = load_file(first.lora.diffusers)
    assert any(not torch.allclose(c[k], d[k]) for k in c)  # the EMA changed the export
