"""Training on the tiny model (``lightning_lora.training.run.train``): learning, exact resume,
precision, stability, reuse, reproducibility."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from lightning_lora.errors import NonFiniteLossError
from lightning_lora.lora.text_encoder import build_lora_configs
from lightning_lora.training.run import train

pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast


def _column(run_dir: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric from the CSV logger."""
    with open(run_dir / "csv" / "metrics.csv", encoding="utf-8") as f:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(f) if r.get(name)]


class _InitialValLoss(L.Callback):
    """The deterministic validation loss of the untrained LoRA."""

    value: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.value = float(pl_module.validation_loss())


def test_overfitting_lowers_the_validation_loss(make_cfg) -> None:
    initial = _InitialValLoss()
    cfg = make_cfg(
        "trainer.max_epochs=10",
        "module.optimizer.lr=5e-3",
        "lora.dropout=0.0",
        "validation.every_n_epochs=100",
    )
    result = train(cfg, callbacks=[initial])
    final = [v for _, v in _column(result.output_dir, "val/loss")]
    assert len(final) == 1  # validated once, at the last epoch
    ratio = final[-1] / initial.value
    print(f"val/loss before={initial.value:.4f} after={final[-1]:.4f} ratio={ratio:.3f}")
    assert ratio < 0.85, f"val/loss fell only from {initial.value:.4f} to {final[-1]:.4f}"
    assert result.metrics["steps"] == 20  # 8 images, batch 4, 10 epochs


def test_checkpoints_hold_only_lora_and_resume_is_exact(make_cfg, tmp_path: Path) -> None:
    full = train(make_cfg("trainer.max_epochs=4", output_dir=tmp_path / "full"))
    first = train(make_cfg("trainer.max_epochs=2", output_dir=tmp_path / "first"))
    ckpt = torch.load(first.last_checkpoint, map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys), keys[:5]
    size_mb = first.last_checkpoint.stat().st_size / 2**20
    model_mb = sum(p.numel() * 4 for p in _unet_params()) / 2**20
    print(f"checkpoint {size_mb:.2f} MiB vs frozen UNet {model_mb:.2f} MiB")
    assert size_mb < model_mb / 2

    resumed = train(
        make_cfg("trainer.max_epochs=4", output_dir=tmp_path / "resumed"),
        ckpt_path=first.last_checkpoint,
    )
    assert resumed.metrics["steps"] == full.metrics["steps"] == 8
    losses_full = _column(full.output_dir, "train/loss")
    losses_split = _column(first.output_dir, "train/loss") + _column(
        resumed.output_dir, "train/loss"
    )
    assert [s for s, _ in losses_split] == [s for s, _ in losses_full]
    assert [v for _, v in losses_split] == pytest.approx([v for _, v in losses_full], rel=1e-5)
    a, b = load_file(full.lora.diffusers), load_file(resumed.lora.diffusers)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _unet_params():
    from lightning_lora.training.models import load_components, tiny_model_path

    return list(load_components(tiny_model_path()).unet.parameters())


class _DtypeProbe(L.Callback):
    """Records LoRA and frozen weight dtypes at every step (after validation sampling too)."""

    def __init__(self) -> None:
        self.lora: set[torch.dtype] = set()
        self.frozen: set[torch.dtype] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for name, p in pl_module.unet.named_parameters():
            (self.lora if p.requires_grad else self.frozen).add(p.dtype)
            assert p.requires_grad == ("lora_" in name), name


def test_lora_params_stay_fp32_under_half_precision(make_cfg) -> None:
    probe = _DtypeProbe()
    cfg = make_cfg(
        "trainer.precision=bf16-mixed",
        "trainer.max_epochs=2",
        "validation.prompts=[a cat]",
        "validation.num_inference_steps=2",
    )
    result = train(cfg, callbacks=[probe])
    assert probe.lora == {torch.float32}
    assert probe.frozen == {torch.bfloat16}
    assert result.sample_grid is not None and result.sample_grid.exists()
    assert all(t.dtype == torch.float32 for t in load_file(result.lora.diffusers).values())


def test_non_finite_loss_stops_training_without_writing_a_lora(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "module.optimizer.lr=1e30",
        "module.check_finite_every_n_steps=1",
        "trainer.gradient_clip_val=null",
        "trainer.max_epochs=5",
    )
    with pytest.raises(NonFiniteLossError, match="NaN/inf"):
        train(cfg)
    assert not (tmp_path / "run" / "lora").exists()


def test_cached_and_uncached_losses_are_identical(make_cfg) -> None:
    from lightning_lora.data.datamodule import collate_images

    cfg = make_cfg("data.caption_dropout=0.3")
    components = instantiate(cfg.model)
    module = instantiate(cfg.module, _partial_=True)(
        components=components, lora=build_lora_configs(cfg.lora)[0], caption_dropout=0.3
    )
    torch.manual_seed(3)
    for p in module.unet.parameters():  # give the LoRA a non-zero B so it matters
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    dm.build_cache(module.encode_images, module.encode_text, torch.device("cpu"))
    cached = dm.cache.__getitems__([0, 1, 2, 3])
    uncached = collate_images([dm.images[i] for i in range(4)])

    def loss(batch, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return module.training_loss(batch)

    torch.testing.assert_close(loss(cached, 0), loss(uncached, 0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss(cached, 0), loss(cached, 1))  # the draws do matter


def test_a_second_run_in_the_same_process_starts_from_a_fresh_lora(make_cfg, tmp_path) -> None:
    a = train(make_cfg("trainer.max_epochs=1", output_dir=tmp_path / "a"))
    b = train(make_cfg("trainer.max_epochs=1", output_dir=tmp_path / "b"))
    wa, wb = load_file(a.lora.diffusers), load_file(b.lora.diffusers)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    c = train(make_cfg("trainer.max_epochs=1", "seed=7", output_dir=tmp_path / "c"))
    wc = load_file(c.lora.diffusers)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_loggers_get_the_full_config_and_a_missing_objective_raises(make_cfg) -> None:
    import yaml

    cfg = make_cfg("trainer.max_epochs=1", "lora.rank=3", "module.optimizer.lr=0.0007")
    result = train(cfg)
    hparams = yaml.safe_load((result.output_dir / "csv" / "hparams.yaml").read_text())
    # what a sweep varies is what the logger shows (W&B and MLflow get the same dict)
    assert hparams["lora"]["rank"] == 3
    assert hparams["module"]["optimizer"]["lr"] == pytest.approx(7e-4)
    assert hparams["data"]["resolution"] == 64
    assert result.objective("val/loss") == result.metrics["val/loss"]
    with pytest.raises(KeyError, match="not logged"):
        result.objective("val/no_such_metric")


def _train_losses(run_dir: Path) -> list[tuple[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", encoding="utf-8") as f:
        return [(r["step"], r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.usefixtures("one_thread")
def test_same_config_and_seed_give_the_same_loss_curve_and_lora(same_config_twice) -> None:
    a, b = same_config_twice
    curve = _train_losses(a.output_dir)
    assert len(curve) == 4  # 8 images, batch 4, 2 epochs
    assert curve == _train_losses(b.output_dir)  # exactly, as logged
    for name in ("diffusers", "kohya"):
        ta, tb = load_file(getattr(a.lora, name)), load_file(getattr(b.lora, name))
        assert ta.keys() == tb.keys() and ta
        for key in ta:
            assert torch.equal(ta[key], tb[key]), key
