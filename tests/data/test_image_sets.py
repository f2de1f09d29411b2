"""Several image sets (``data.datasets``) and regularization images, on real files."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_lora.data.buckets import BucketBatchSampler
from lightning_lora.data.datamodule import StyleDataModule
from lightning_lora.demo.images import make_regularization_images
from lightning_lora.errors import DatasetError
from lightning_lora.training.losses import combine_sample_losses
from lightning_lora.training.run import train


@pytest.fixture
def reg_images(tmp_path: Path) -> Path:
    return make_regularization_images(tmp_path / "reg", count=4, size=64)


def _sets(demo: Path, reg: Path, **reg_options: Any) -> list[dict[str, Any]]:
    return [
        {"image_dir": str(demo), "repeats": 2, "caption": {"trigger": "lldemo"}},
        {"image_dir": str(reg), "regularization": True, "loss_weight": 0.5, **reg_options},
    ]


def test_sets_repeat_caption_and_weight_per_image(demo_images: Path, reg_images: Path) -> None:
    dm = StyleDataModule(
        resolution=64,
        batch_size=4,
        cache_latents=False,
        datasets=_sets(demo_images, reg_images, caption={"caption_ext": ".none"}),
        caption_template="a plain {token}",
        token="shape",
        prior_loss_weight=0.25,
    )
    dm.setup("fit")
    assert dm.item_sets == [0] * 8 + [1] * 4
    # each set's caption settings: the trigger for the first; the second ignores its .txt files
    assert all(item.caption.startswith("lldemo") for item in dm.items[:8])
    assert {item.caption for item in dm.items[8:]} == {"a plain shape"}
    # repeats: every epoch sees each instance image twice and each regularization image once
    sampler = dm.batch_sampler()
    sampler.set_epoch(3)
    seen = Counter(i for request in sampler for i in request.indices)
    assert seen == Counter({i: 2 for i in range(8)} | {i: 1 for i in range(8, 12)})
    # DDP: two ranks together cover the same epoch, each in the same number of steps
    ranks = [
        BucketBatchSampler(dm.buckets, 2, 0, 2, rank, repeats=[2] * 8 + [1] * 4) for rank in (0, 1)
    ]
    shards = [[i for request in r for i in request.indices] for r in ranks]
    assert Counter(shards[0]) + Counter(shards[1]) == seen and len(ranks[0]) == len(ranks[1])
    # batches carry each sample's set weight and whether it is a regularization image
    batches = list(dm.train_dataloader())
    assert sum(len(b["captions"]) for b in batches) == 20
    for batch in batches:
        prior = batch["prior"]
        assert batch["prior_loss_weight"] == 0.25
        assert batch["sample_weights"].tolist() == [0.5 if p else 1.0 for p in prior]
        assert [c == "a plain shape" for c in batch["captions"]] == list(prior)
    # the default val/loss uses instance images only
    assert all(not item.caption.startswith("a plain") for item in dm.validation_items())


def test_image_dir_is_the_short_form_of_one_set(demo_images: Path) -> None:
    dm = StyleDataModule(str(demo_images), resolution=64)
    assert len(dm.sets) == 1 and dm.sets[0].repeats == 1 and not dm.weighted
    with pytest.raises(DatasetError, match="every set is a regularization"):
        StyleDataModule(datasets=[{"image_dir": str(demo_images), "regularization": True}])
    with pytest.raises(DatasetError, match="unknown key"):
        StyleDataModule(datasets=[{"image_dir": str(demo_images), "num_repeats": 3}])


def test_prior_term_enters_with_its_weight() -> None:
    losses = torch.tensor([1.0, 3.0, 10.0, 20.0])
    prior = (False, False, True, True)
    weights = torch.tensor([1.0, 1.0, 0.5, 0.5])
    total, terms = combine_sample_losses(losses, weights, prior, prior_loss_weight=0.3)
    assert terms["loss_instance"].item() == pytest.approx(2.0)
    assert terms["loss_prior"].item() == pytest.approx(7.5)  # the set weight 0.5 applies
    assert total.item() == pytest.approx(2.0 + 0.3 * 7.5)
    zero, _ = combine_sample_losses(losses, weights, prior, prior_loss_weight=0.0)
    assert zero.item() == pytest.approx(losses[:2].mean().item())  # the plain instance loss
    plain, no_terms = combine_sample_losses(losses)
    assert plain.item() == pytest.approx(losses.mean().item()) and no_terms == {}


class _Terms(L.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[float, dict[str, float]]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, *_: Any) -> None:
        terms = {k: float(v.detach()) for k, v in pl_module.loss_terms.items()}
        self.rows.append((float(outputs["loss"]), terms))


@pytest.mark.parametrize("prior_weight", [0.0, 0.5])
def test_training_with_a_regularization_set_logs_and_weights_the_prior(
    make_cfg, demo_images: Path, reg_images: Path, tmp_path: Path, prior_weight: float
) -> None:
    sets = (
        f"[{{image_dir: {demo_images}}}, "
        f"{{image_dir: {reg_images}, regularization: true, repeats: 2}}]"
    )
    record = _Terms()
    cfg = make_cfg(
        f"data.datasets={sets}",
        f"data.prior_loss_weight={prior_weight}",
        f"data.cache.dir={tmp_path / 'latents'}",  # the disk cache, per image across sets
        "trainer.max_epochs=1",
    )
    result = train(cfg, callbacks=[record])
    assert result.metadata["num_train_images"] == 12 and len(record.rows) == 4  # 16 samples
    for loss, terms in record.rows:
        instance = terms.get("loss_instance", 0.0)
        assert loss == pytest.approx(instance + prior_weight * terms.get("loss_prior", 0.0))
    assert any("loss_prior" in terms and terms["loss_prior"] > 0 for _, terms in record.rows)
    with open(result.output_dir / "csv" / "metrics.csv", encoding="utf-8") as f:
        columns = set(next(csv.reader(f)))
    assert {"train/loss_instance", "train/loss_prior"} <= columns


def test_a_kohya_dataset_config_becomes_the_image_sets(
    demo_images: Path, reg_images: Path, tmp_path: Path
) -> None:
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        f"""[general]
shuffle_caption = false
caption_extension = ".none"
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4

  [[datasets.subsets]]
  image_dir = "{demo_images}"
  class_tokens = "lldemo style"
  num_repeats = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = "{reg_images}"
  class_tokens = "a shape"
  keep_tokens = 0
""",
        encoding="utf-8",
    )
    dm = StyleDataModule(resolution=64, cache_latents=False, dataset_config=str(toml))
    assert [(s.repeats, s.regularization, s.caption.keep_tokens) for s in dm.sets] == [
        (3, False, 1),
        (1, True, 0),
    ]
    dm.setup("fit")
    # class_tokens caption the images (".none": no caption file counts)
    assert {i.caption for i in dm.items[:8]} == {"lldemo style"}
    assert {i.caption for i in dm.items[8:]} == {"a shape"}
    assert len([i for request in dm.batch_sampler() for i in request.indices]) == 8 * 3 + 4
    with pytest.raises(DatasetError, match="not both"):
        StyleDataModule(datasets=[{"image_dir": str(demo_images)}], dataset_config=str(toml))
