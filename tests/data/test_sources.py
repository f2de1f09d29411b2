"""Image sets and the held-out validation set (``lightning_lora.data.sources``), on real files."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from lightning_lora.config import compose_config
from lightning_lora.data.datamodule import StyleDataModule
from lightning_lora.data.image_folder import load_training_image, preprocess
from lightning_lora.errors import DatasetError


def _rows(batch: dict) -> list[torch.Tensor]:
    return list(batch["pixel_values"])


def test_held_out_image_is_never_in_a_training_batch(demo_images: Path) -> None:
    dm = StyleDataModule(
        str(demo_images),
        resolution=64,
        batch_size=3,
        cache_latents=False,
        validation={"val_split": 0.25},
        seed=7,
    )
    dm.setup("fit")
    held = {item.path for item in dm.val_items}
    assert len(held) == 2 and len(dm.items) == 6
    assert held.isdisjoint(item.path for item in dm.items)
    held_pixels = [preprocess(load_training_image(p, 64, 10**8), 64) for p in sorted(held)]
    seen = 0
    loader = dm.train_dataloader()
    for epoch in range(4):
        loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        for batch in loader:
            for row in _rows(batch):
                seen += 1
                assert not any(torch.equal(row, px) for px in held_pixels)
    assert seen == 4 * 6  # every training image once per epoch
    # val/loss is measured on the held-out images, with their captions
    pixels, captions = dm.validation_examples()
    assert [c for c in captions] == [item.caption for item in dm.val_items]
    assert all(torch.equal(a, b) for a, b in zip(pixels, held_pixels, strict=True))


def test_val_split_is_seeded(demo_images: Path) -> None:
    def held(seed: int) -> list[str]:
        dm = StyleDataModule(
            str(demo_images), resolution=64, validation={"val_split": 0.5, "seed": seed}
        )
        dm.find_images()
        return [item.path.name for item in dm.val_items]

    assert held(1) == held(1) and len(held(1)) == 4
    assert held(1) != held(2)


def test_validation_folder_and_the_default(demo_images: Path, tmp_path: Path) -> None:
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    for path in sorted(demo_images.glob("*.png"))[:2]:
        shutil.copy(path, val_dir / f"v_{path.name}")
    dm = StyleDataModule(str(demo_images), resolution=64, validation={"image_dir": str(val_dir)})
    dm.setup("fit")
    assert len(dm.items) == 8  # nothing held out of the training set
    assert [i.path.parent for i in dm.validation_items()] == [val_dir, val_dir]
    default = StyleDataModule(str(demo_images), resolution=64, val_max_images=3)
    default.setup("fit")  # no held-out set: the first training images (a fit measure)
    assert default.validation_items() == default.items[:3]
    with pytest.raises(DatasetError, match="not both"):
        StyleDataModule(str(demo_images), validation={"image_dir": str(val_dir), "val_split": 0.2})
    with pytest.raises(DatasetError, match="none would be left"):
        StyleDataModule(str(demo_images), validation={"val_split": 0.99}).find_images()


@pytest.mark.parametrize("preset", ["sd15_optuna", "sd15_optuna_recipe"])
def test_sweep_presets_optimise_a_held_out_val_loss(preset: str) -> None:
    cfg = compose_config([f"hparams_search={preset}", "model=tiny"])
    assert cfg.optimized_metric == "val/loss"
    assert cfg.data.validation.val_split > 0


def test_training_measures_val_loss_on_the_held_out_set(make_cfg) -> None:
    from lightning_lora.training.run import train

    result = train(make_cfg("data.validation.val_split=0.25", "trainer.max_epochs=1"))
    assert math.isfinite(result.metrics["val/loss"])
    assert result.metadata["num_train_images"] == 6  # two of the eight held out
