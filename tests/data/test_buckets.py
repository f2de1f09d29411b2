"""Aspect-ratio buckets: the bucket table, assignment, minimal crops, the lockstep sampler."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data.distributed import DistributedSampler

from lightning_lora.data.buckets import (
    BatchRequest,
    BucketBatchSampler,
    BucketSettings,
    assign_bucket,
    bucket_info,
    crop_box,
    fit_size,
    make_buckets,
)
from lightning_lora.data.datamodule import StyleDataModule, load_training_image, preprocess
from lightning_lora.errors import DatasetError


def _fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: 8x average pooling, 8 "channels" (the latent shape of a real one)."""
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled, pooled[:, :2]], dim=1)


def _fake_text(captions: list[str]) -> torch.Tensor:
    return torch.stack([torch.full((3, 2), float(len(c))) for c in captions])


def _folder(tmp_path: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    for name, size in sizes.items():
        Image.new("RGB", size, (len(name) * 20 % 255, 80, 160)).save(tmp_path / f"{name}.png")
    return tmp_path


def test_buckets_have_equal_area_on_the_grid_around_the_square() -> None:
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets
    assert {(576, 448), (448, 576), (640, 384), (384, 640), (768, 320), (256, 1024)} <= set(buckets)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
        assert w * h >= 512 * 512 - 64 * max(w, h)  # as large as the grid allows
        assert (h, w) in buckets
    assert [w / h for w, h in buckets] == sorted(w / h for w, h in buckets)
    narrow = make_buckets(512, 64, min_side=384, max_side=640)
    assert min(min(b) for b in narrow) == 384 and max(max(b) for b in narrow) == 640


def test_tiny_resolutions_keep_the_square_bucket_on_the_vae_grid() -> None:
    assert make_buckets(64, 64) == [(64, 64)]  # the tests' and the demo's resolution: square only
    assert make_buckets(16, 64) == [(16, 16)]
    for resolution in (96, 200, 520):  # not multiples of 64: the grid shrinks to gcd(64, res)
        buckets = make_buckets(resolution, 64)
        assert (resolution, resolution) in buckets
        assert all(w % 8 == 0 and h % 8 == 0 for w, h in buckets)
    with pytest.raises(DatasetError, match=r"data\.bucketing\.step"):
        BucketSettings(step=12).grid(64)
    with pytest.raises(DatasetError, match=r"data\.bucketing\.min_side"):
        BucketSettings(min_side=1024).grid(512)


def test_images_go_to_the_nearest_aspect_with_minimal_crop() -> None:
    buckets = make_buckets(512, 64)
    assert assign_bucket(800, 600, buckets) == (576, 448)
    assert assign_bucket(600, 800, buckets) == (448, 576)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    assert assign_bucket(3000, 1000, buckets) == (832, 256)  # aspect 3.25, nearest to 3.0
    assert assign_bucket(100, 5000, buckets) == (256, 1024)  # the most extreme bucket
    size = fit_size(800, 600, (576, 448))
    assert size == (597, 448)  # covers the bucket; 21 px of width cropped, nothing of height
    assert crop_box(size, (576, 448)) == (10, 0, 586, 448)
    assert fit_size(96, 96, (64, 64)) == (64, 64)  # square on square: no crop at all


def test_no_upscale_gives_small_images_their_own_grid_size() -> None:
    buckets = make_buckets(512, 64)
    assert assign_bucket(300, 200, buckets, no_upscale=True) == (256, 192)
    assert assign_bucket(300, 200, buckets) == (640, 384)  # enlarged otherwise
    assert assign_bucket(2000, 1500, buckets, no_upscale=True) == (576, 448)  # large: unchanged


def test_square_images_keep_the_old_square_crop(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"a": (96, 96), "b": (90, 90)})
    dm = StyleDataModule(str(folder), resolution=64)
    dm.setup("fit")
    assert dm.buckets == [(64, 64), (64, 64)]
    assert dm.bucket_info() == {"64x64": 2}
    for i, item in enumerate(dm.items):
        old = preprocess(load_training_image(item.path, 64), 64)
        assert torch.equal(dm.images.pixels(i), old)


def test_datamodule_buckets_and_bucket_info(tmp_path: Path) -> None:
    sizes = {"wide1": (200, 150), "wide2": (400, 300), "tall": (150, 200), "sq": (100, 100)}
    dm = StyleDataModule(str(_folder(tmp_path, sizes)), resolution=128, batch_size=2)
    dm.bucketing = BucketSettings(step=32)
    dm.setup("fit")
    assert dict(zip([i.path.stem for i in dm.items], dm.buckets, strict=True)) == {
        "sq": (128, 128),
        "tall": (96, 160),
        "wide1": (160, 96),
        "wide2": (160, 96),
    }
    assert dm.bucket_info() == {"160x96": 2, "96x160": 1, "128x128": 1}
    assert dm.images.pixels(dm.buckets.index((96, 160))).shape == (3, 160, 96)
    off = StyleDataModule(str(tmp_path), resolution=128, bucketing={"enabled": False})
    off.setup("fit")
    assert set(off.buckets) == {(128, 128)}  # the old center-cropped square
    for i, item in enumerate(off.items):
        assert torch.equal(
            off.images.pixels(i), preprocess(load_training_image(item.path, 128), 128)
        )


def test_sampler_covers_every_image_once_per_epoch_one_bucket_per_batch() -> None:
    buckets = [(64, 64)] * 7 + [(96, 48)] * 5 + [(48, 96)] * 1
    sampler = BucketBatchSampler(buckets, batch_size=3, seed=5)
    assert isinstance(sampler, DistributedSampler)  # Lightning keeps it under DDP
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3 + 2 + 1
        assert all(isinstance(b, BatchRequest) and b.epoch == epoch for b in batches)
        assert all(len({buckets[i] for i in b.indices}) == 1 for b in batches)
        assert sorted(i for b in batches for i in b.indices) == list(range(13))
        # ragged, not merged: the last batch of a bucket holds what is left, the 1-image bucket
        # has a batch of its own
        assert sorted(len(b.indices) for b in batches) == [1, 1, 2, 3, 3, 3]
        orders.append([b.indices for b in batches])
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    again = BucketBatchSampler(buckets, batch_size=3, seed=5)
    again.set_epoch(1)
    assert [b.indices for b in again] == orders[1]  # from the seed and epoch alone
    other = BucketBatchSampler(buckets, batch_size=3, seed=6)
    assert [b.indices for b in other] != orders[0]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_step_through_the_same_buckets_in_lockstep(world: int) -> None:
    buckets = [(64, 64)] * 9 + [(96, 48)] * 4 + [(48, 96)] * 1
    per_rank = []
    for rank in range(world):
        sampler = BucketBatchSampler(buckets, 2, seed=1, num_replicas=world, rank=rank)
        sampler.set_epoch(4)
        per_rank.append(list(sampler))
    lengths = {len(batches) for batches in per_rank}
    assert len(lengths) == 1  # same number of steps on every rank
    for step in zip(*per_rank, strict=True):
        shapes = {buckets[i] for batch in step for i in batch.indices}
        assert len(shapes) == 1  # every rank holds the same bucket at this step
        assert all(len(batch.indices) >= 1 for batch in step)  # no rank waits without a batch
    seen = Counter(i for batches in per_rank for b in batches for i in b.indices)
    assert set(seen) == set(range(len(buckets)))
    # a bucket's remainder smaller than the world size is padded with repeats of its own
    # images (so each rank has one); nothing else repeats
    pads = {2: {(64, 64): 1, (48, 96): 1}, 3: {(48, 96): 2}}[world]
    repeats = Counter({buckets[i]: n - 1 for i, n in seen.items() if n > 1})
    assert +repeats == pads


def test_cached_batches_hold_one_bucket_shape(tmp_path: Path) -> None:
    sizes = {"w1": (200, 150), "w2": (400, 300), "w3": (240, 180), "t1": (150, 200), "s": (90, 90)}
    dm = StyleDataModule(
        str(_folder(tmp_path, sizes)), resolution=64, batch_size=2, bucketing={"step": 16}
    )
    dm.setup("fit")
    dm.build_cache(_fake_encode, _fake_text, torch.device("cpu"))
    shapes = {tuple(t["latent_params"].shape[1:]) for t in dm.cache.store.tensors.values()}
    assert shapes == {(8, 6, 10), (8, 10, 6), (8, 8, 8)}  # per-bucket shapes in the cache
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # 3 wide (2 + 1), 1 tall, 1 square
    for batch in batches:
        assert batch["latent_params"].shape[0] == batch["text_embeds"].shape[0]
    got = sorted(tuple(b["latent_params"].shape) for b in batches)
    assert got == [(1, 8, 6, 10), (1, 8, 8, 8), (1, 8, 10, 6), (2, 8, 6, 10)]
    # each batch's latents are its images' own encodings
    first = batches[0]["latent_params"][0]
    assert any(
        torch.equal(first, _fake_encode(dm.images.pixels(i)[None])[0]) for i in range(len(sizes))
    )


def test_uncached_batches_hold_one_bucket_shape(tmp_path: Path) -> None:
    sizes = {"w1": (200, 150), "w2": (400, 300), "t1": (150, 200)}
    dm = StyleDataModule(
        str(_folder(tmp_path, sizes)),
        resolution=64,
        batch_size=2,
        cache_latents=False,
        random_crop=True,
        bucketing={"step": 16},
    )
    dm.setup("fit")
    shapes = sorted(tuple(b["pixel_values"].shape) for b in dm.train_dataloader())
    assert shapes == [(1, 3, 80, 48), (2, 3, 48, 80)]


def test_validation_examples_are_deterministic_square_crops(tmp_path: Path) -> None:
    sizes = {"w1": (200, 150), "t1": (150, 200), "s": (90, 90)}
    dm = StyleDataModule(str(_folder(tmp_path, sizes)), resolution=64, bucketing={"step": 16})
    dm.setup("fit")
    assert len(set(dm.buckets)) == 3
    pixels, _ = dm.validation_examples()
    again, _ = dm.validation_examples()
    assert pixels.shape == (3, 3, 64, 64) and torch.equal(pixels, again)
    for i, item in enumerate(dm.items):
        assert torch.equal(pixels[i], preprocess(load_training_image(item.path, 64), 64))


def test_bucket_info_is_kohya_shaped() -> None:
    info = bucket_info([(576, 448)] * 7 + [(448, 576)] * 5)
    assert info == {"576x448": 7, "448x576": 5}
    assert json.loads(json.dumps(info)) == info


def test_bucket_table_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dm = StyleDataModule(
        str(_folder(tmp_path, {"w": (200, 150), "t": (150, 200)})),
        resolution=64,
        bucketing={"step": 16},
    )
    with caplog.at_level(logging.INFO, logger="lightning_lora.data.datamodule"):
        dm.setup("fit")
    assert "2 bucket(s)" in caplog.text
    assert "80x48" in caplog.text and "48x80" in caplog.text


def test_worker_config_trains_bucketed() -> None:
    from lightning_lora.worker.cli import compose_worker_config

    cfg = compose_worker_config(["model=tiny"])
    assert cfg.data.bucketing.enabled is True
    assert cfg.data.bucketing.step == 64


@pytest.mark.slow  # trains the tiny model for an epoch
def test_bucketed_run_records_bucket_info_in_summary_and_lora(make_cfg, tmp_path: Path) -> None:
    from safetensors import safe_open

    from lightning_lora.training.run import train

    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {"w1": (200, 150), "w2": (160, 120), "w3": (120, 90), "t1": (150, 200), "s": (90, 90)}
    _folder(folder, sizes)
    cfg = make_cfg(
        "trainer.max_epochs=1",
        "data.bucketing.step=16",
        "data.batch_size=2",
        "validation.prompts=[]",
        image_dir=folder,
    )
    result = train(cfg)
    expected = {"80x48": 3, "48x80": 1, "64x64": 1}
    assert result.metadata["bucket_info"] == expected
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["metadata"]["bucket_info"] == expected
    assert result.metrics["steps"] == 4  # 2 + 1 wide, 1 tall, 1 square: ragged, not merged
    for path in (result.lora.diffusers, result.lora.kohya):
        with safe_open(str(path), framework="pt") as f:
            assert json.loads(f.metadata()["ss_bucket_info"]) == expected


def test_datamodule_shards_bucket_batches_by_the_trainer_s_rank(tmp_path: Path) -> None:
    from types import SimpleNamespace

    sizes = {f"w{i}": (200 + i, 150) for i in range(5)} | {f"s{i}": (90, 90) for i in range(3)}
    folder = _folder(tmp_path, sizes)
    per_rank = []
    for rank in (0, 1):
        dm = StyleDataModule(str(folder), resolution=64, batch_size=2, bucketing={"step": 16})
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # a simulated DDP world
        dm.setup("fit")
        dm.build_cache(_fake_encode, _fake_text, torch.device("cpu"))
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(3)
        per_rank.append([(b.indices, dm.cache[b]["latent_params"].shape) for b in loader.sampler])
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 5 wide: 4 + 1 (padded), 3 square: one
    for (idx0, shape0), (idx1, shape1) in zip(*per_rank, strict=True):
        assert shape0[1:] == shape1[1:]  # the same bucket on both ranks at every step
        assert len(idx0) >= 1 and len(idx1) >= 1
    covered = {i for batches in per_rank for idx, _ in batches for i in idx}
    assert covered == set(range(8))
