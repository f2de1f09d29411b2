"""The disk latent cache: shards, reuse across runs, keys, per-bucket shapes."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

from lightning_lora.data.buckets import BatchRequest
from lightning_lora.data.datamodule import StyleDataModule
from lightning_lora.data.latent_cache import DiskLatentCache, MemoryLatentStore, module_fingerprint


class CountingEncoders:
    """Fake VAE and text encoder that count what they encode."""

    def __init__(self) -> None:
        self.images = 0
        self.captions = 0

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += pixels.shape[0]
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled, pooled[:, :2]], dim=1)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        self.captions += len(captions)
        return torch.stack([torch.full((3, 2), float(len(c))) for c in captions])


def _images(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    sizes = {"w1": (200, 150), "w2": (160, 120), "t1": (150, 200), "s": (90, 90)}
    for i, (name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (40 * i, 100, 200 - 30 * i)).save(folder / f"{name}.png")
    (folder / "s.txt").write_text("a square one", encoding="utf-8")
    return folder


def _datamodule(folder: Path, cache_dir: Path, **kwargs) -> StyleDataModule:
    dm = StyleDataModule(
        str(folder),
        resolution=64,
        batch_size=2,
        bucketing={"step": 16},
        cache={"dir": str(cache_dir)},
        **kwargs,
    )
    dm.setup("fit")
    return dm


def _build(dm: StyleDataModule, enc: CountingEncoders, fingerprint: str = "model-a") -> None:
    dm.build_cache(enc.encode_images, enc.encode_text, torch.device("cpu"), fingerprint=fingerprint)


def _all_batches(dm: StyleDataModule) -> dict[tuple[int, ...], dict[str, torch.Tensor]]:
    return {b.indices: dm.cache[b] for b in dm.batch_sampler()}


def test_second_run_reuses_the_shards_and_skips_encoding(tmp_path: Path) -> None:
    folder, cache_dir = _images(tmp_path / "imgs"), tmp_path / "cache"
    first, enc1 = _datamodule(folder, cache_dir, random_flip=True), CountingEncoders()
    _build(first, enc1)
    assert enc1.images == 2 * 4 and enc1.captions == 2  # both orientations; 2 distinct captions
    assert first.images.images == []  # nothing decoded is kept with a disk cache
    shards = sorted(cache_dir.glob("shard-*.safetensors"))
    assert shards and not list(cache_dir.glob("*.tmp"))
    with safe_open(str(shards[0]), framework="pt") as f:
        assert f.metadata()["format"] == "lightning_lora.data.latent_cache.v1"

    second, enc2 = _datamodule(folder, cache_dir, random_flip=True), CountingEncoders()
    _build(second, enc2)
    assert (enc2.images, enc2.captions) == (0, 0)  # a re-run encodes nothing
    assert sorted(cache_dir.glob("shard-*.safetensors")) == shards  # and writes nothing
    torch.manual_seed(0)
    a = _all_batches(first)
    torch.manual_seed(0)
    b = _all_batches(second)
    assert a.keys() == b.keys()
    for key in a:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name])


def test_disk_batches_equal_the_device_cache(tmp_path: Path) -> None:
    folder = _images(tmp_path / "imgs")
    disk = _datamodule(folder, tmp_path / "cache")
    _build(disk, CountingEncoders())
    memory = StyleDataModule(str(folder), resolution=64, batch_size=2, bucketing={"step": 16})
    memory.setup("fit")
    enc = CountingEncoders()
    memory.build_cache(enc.encode_images, enc.encode_text, torch.device("cpu"))
    assert isinstance(memory.cache.store, MemoryLatentStore)
    on_disk, in_memory = _all_batches(disk), _all_batches(memory)
    assert on_disk.keys() == in_memory.keys()
    shapes = set()
    for key, batch in on_disk.items():
        shapes.add(tuple(batch["latent_params"].shape[2:]))
        for name in ("latent_params", "text_embeds"):
            assert torch.equal(batch[name], in_memory[key][name])
    assert shapes == {(6, 10), (10, 6), (8, 8)}  # each bucket's shape, from the shards


def test_keys_follow_the_model_the_file_and_the_bucket(tmp_path: Path) -> None:
    folder, cache_dir = _images(tmp_path / "imgs"), tmp_path / "cache"
    _build(_datamodule(folder, cache_dir), CountingEncoders())
    other_model = CountingEncoders()
    _build(_datamodule(folder, cache_dir), other_model, fingerprint="model-b")
    assert other_model.images == 4  # another model: nothing reused
    Image.new("RGB", (200, 150), (1, 2, 3)).save(folder / "w1.png")  # one file changes
    changed = CountingEncoders()
    _build(_datamodule(folder, cache_dir), changed)
    assert changed.images == 1
    rebucketed = CountingEncoders()  # another bucket grid: the non-square images re-encode
    dm = StyleDataModule(
        str(folder), resolution=64, bucketing={"step": 32}, cache={"dir": str(cache_dir)}
    )
    dm.setup("fit")
    _build(dm, rebucketed)
    assert rebucketed.images == 3 and set(dm.buckets) == {(64, 64)}  # all squares now...
    assert rebucketed.images == sum(b != (64, 64) for b in _datamodule(folder, cache_dir).buckets)


def test_a_cache_lists_entries_across_shards(tmp_path: Path) -> None:
    cache = DiskLatentCache(tmp_path)
    cache.put_many(
        [("k1", {"x": torch.ones(2)}), ("k2", {"x": torch.zeros(3), "y": torch.ones(1)})]
    )
    cache.put_many([("k3", {"x": torch.full((1,), 7.0)})])
    reopened = DiskLatentCache(tmp_path)
    assert len(reopened) == 3 and "k2" in reopened and "k4" not in reopened
    assert torch.equal(reopened.get("k2")["y"], torch.ones(1))
    assert torch.equal(reopened.get("k3")["x"], torch.full((1,), 7.0))
    (tmp_path / "shard-broken.safetensors").write_bytes(b"not a safetensors file")
    assert len(DiskLatentCache(tmp_path)) == 3  # a damaged shard is skipped, not fatal


def test_module_fingerprint_tells_weights_apart() -> None:
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert module_fingerprint(a) == module_fingerprint(a)
    assert module_fingerprint(a) != module_fingerprint(b)
    assert len({BatchRequest((1,), 0), BatchRequest((1,), 0)}) == 1
