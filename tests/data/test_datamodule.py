"""The DataModule: discovery, captions, preprocessing, bad and hostile input, the latent cache."""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_lora.data.datamodule import (
    StyleDataModule,
    StyleImage,
    StyleImageDataset,
    find_style_images,
    load_rgb,
    load_training_image,
    preprocess,
)
from lightning_lora.errors import DatasetError, InvalidImageError
from tests.support.images import write_solid_png

REPO = Path(__file__).resolve().parents[2]


def _png(path: Path, size=(80, 60), color=(200, 30, 30), mode="RGB") -> Path:
    Image.new(mode, size, color).save(path)
    return path


def test_captions_from_files_and_template(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.jpg")
    (tmp_path / "a.txt").write_text("  a red square  \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    items = find_style_images(tmp_path, "art by {token}", "zzz")
    assert [(i.path.name, i.caption) for i in items] == [
        ("a.png", "a red square"),
        ("b.jpg", "art by zzz"),
    ]


def test_preprocess_resizes_shorter_side_and_center_crops() -> None:
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 20, 100))  # a black band on the far left, cropped away
    pixels = preprocess(img, 64)
    assert pixels.shape == (3, 64, 64)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert torch.allclose(pixels, torch.ones_like(pixels))  # center crop keeps only white
    flipped = preprocess(Image.new("RGB", (64, 64)), 64, flip=True)
    assert flipped.shape == (3, 64, 64)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


@pytest.mark.parametrize(
    ("mode", "color"),
    [("RGBA", (0, 0, 0, 0)), ("LA", (0, 0)), ("CMYK", (0, 0, 0, 0)), ("I;16", 65535), ("L", 255)],
)
def test_modes_convert_to_rgb_with_alpha_on_white(tmp_path: Path, mode: str, color) -> None:
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    if mode == "CMYK":
        path = path.with_suffix(".jpg")
    Image.new(mode, (8, 8), color).save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    r, g, b = rgb.getpixel((4, 4))
    assert min(r, g, b) >= 250  # transparent -> white; CMYK 0 -> white; 16-bit max -> white


def test_palette_with_transparency_composites_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    assert load_rgb(path).getpixel((1, 1)) == (255, 255, 255)


def test_zero_byte_image_is_named(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InvalidImageError, match=r"empty\.png.*empty"):
        load_rgb(path)


def test_not_an_image_is_named(tmp_path: Path) -> None:
    path = tmp_path / "fake.jpg"
    path.write_text("this is not a jpeg", encoding="utf-8")
    with pytest.raises(InvalidImageError, match=r"fake\.jpg"):
        load_rgb(path)


def test_truncated_image_is_named(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 50).convert("RGB").save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InvalidImageError, match=r"cut\.png.*(truncated|corrupt)"):
        load_rgb(path)


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    path = _png(tmp_path / "strip.png", size=(20000, 100))
    with pytest.raises(InvalidImageError, match=r"strip\.png.*20000x100.*limit"):
        load_rgb(path, max_pixels=1_000_000)


def test_unsupported_format_behind_a_supported_extension(tmp_path: Path) -> None:
    path = tmp_path / "anim.png"
    frames = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidImageError, match=r"anim\.png.*GIF"):
        load_rgb(path)


def test_no_images_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x", encoding="utf-8")
    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    with pytest.raises(DatasetError, match=r"no training images.*clip\.gif"):
        find_style_images(tmp_path, "{token}", "t")
    with pytest.raises(DatasetError, match="does not exist"):
        find_style_images(tmp_path / "nope", "{token}", "t")


def test_datamodule_fails_on_a_corrupt_file_naming_it(tmp_path: Path) -> None:
    _png(tmp_path / "good.png")
    (tmp_path / "bad.webp").write_bytes(b"RIFF0000WEBPVP8 garbage")
    dm = StyleDataModule(str(tmp_path), resolution=64)
    with pytest.raises(InvalidImageError, match=r"bad\.webp"):
        dm.setup("fit")


def test_random_crop_with_cache_is_refused() -> None:
    with pytest.raises(DatasetError, match=r"random_crop.*cache_latents"):
        StyleDataModule("unused", random_crop=True, cache_latents=True)


@pytest.mark.parametrize(("key", "value"), [("resolution", 70), ("caption_dropout", 1.5)])
def test_bad_options_name_the_field(key: str, value) -> None:
    with pytest.raises(DatasetError, match=f"data.{key}"):
        StyleDataModule("unused", **{key: value})


def test_cache_holds_both_orientations_when_flipping(tmp_path: Path) -> None:
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 32, 64))
    img.save(tmp_path / "half.png")
    dm = StyleDataModule(str(tmp_path), resolution=64, random_flip=True, batch_size=1)
    dm.setup("fit")
    dm.build_cache(
        encode_images=lambda px: px[:, :1].clone(),  # identity "encoder": keep one channel
        encode_text=lambda caps: torch.zeros(len(caps), 3, 2),
        device=torch.device("cpu"),
    )
    assert dm.cache is not None
    (tensors,) = dm.cache.store.tensors.values()  # one bucket: 64x64
    torch.testing.assert_close(tensors["flipped_latent_params"], tensors["latent_params"].flip(-1))
    seen = {bool(dm.cache[0]["latent_params"][0, 0, 0] > 0) for _ in range(40)}
    assert seen == {True, False}  # both orientations are served


def _noise_image(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    rng = random.Random(seed)
    channels = len(mode)
    return Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * channels))


@pytest.mark.parametrize("size", [(333, 517), (1000, 64), (64, 64), (517, 333), (40, 30)])
@pytest.mark.parametrize("resolution", [64, 120])
def test_training_size_copy_preprocesses_bit_identically(
    tmp_path: Path, size: tuple[int, int], resolution: int
) -> None:
    path = tmp_path / "noise.png"
    _noise_image(size, seed=size[0] * size[1]).save(path)
    full = load_rgb(path)
    kept = load_training_image(path, resolution)
    assert kept.mode == "RGB" and min(kept.size) == resolution
    assert max(kept.size) < max(full.size) or min(full.size) <= resolution
    for flip in (False, True):
        expected = preprocess(full, resolution, flip=flip)
        assert torch.equal(preprocess(kept, resolution, flip=flip), expected)
    for seed in (0, 1, 2):
        expected = preprocess(full, resolution, True, True, random.Random(seed))
        assert torch.equal(preprocess(kept, resolution, True, True, random.Random(seed)), expected)
    dataset = StyleImageDataset([StyleImage(path, "c")], resolution)
    assert dataset.images[0].size == kept.size
    assert torch.equal(dataset.pixels(0, flip=True), preprocess(full, resolution, flip=True))


@pytest.mark.parametrize("kind", ["exif_jpeg", "rgba_png", "palette_png", "gray16_png"])
def test_training_size_copy_matches_for_rotated_and_non_rgb_images(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "img.png"
    if kind == "exif_jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate on display: the kept copy must be the transposed one
        path = path.with_suffix(".jpg")
        _noise_image((300, 140), seed=3).save(path, exif=exif, quality=90)
    elif kind == "rgba_png":
        _noise_image((211, 97), seed=4, mode="RGBA").save(path)
    elif kind == "palette_png":
        _noise_image((150, 250), seed=5).quantize(64).save(path)
    else:
        Image.frombytes("I;16", (90, 130), random.Random(6).randbytes(90 * 130 * 2)).save(path)
    full = load_rgb(path)
    kept = load_training_image(path, 64)
    assert min(kept.size) == 64
    if kind == "exif_jpeg":
        assert full.size == (140, 300) and kept.size == (64, 137)
    for flip in (False, True):
        assert torch.equal(preprocess(kept, 64, flip=flip), preprocess(full, 64, flip=flip))


def test_load_training_image_keeps_the_safety_checks(tmp_path: Path) -> None:
    path = _png(tmp_path / "strip.png", size=(20000, 100))
    with pytest.raises(InvalidImageError, match=r"strip\.png.*20000x100.*limit"):
        load_training_image(path, 64, max_pixels=1_000_000)
    gif = tmp_path / "anim.png"
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(InvalidImageError, match=r"anim\.png.*GIF"):
        load_training_image(gif, 64)
    cut = tmp_path / "cut.png"
    buf = io.BytesIO()
    _noise_image((256, 256), seed=1).save(buf, format="PNG")
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InvalidImageError, match=r"cut\.png.*(truncated|corrupt)"):
        load_training_image(cut, 64)


#: Builds the data module on a folder in a fresh interpreter and prints, as JSON, the most of
#: Pillow's pixel memory alive at once (in 1 MiB blocks), the blocks of one full-size decode, the
#: growth of the interpreter's own peak RSS (``VmHWM``; ``None`` without ``/proc``) and the sizes
#: kept. Pillow allocates an image's pixels in blocks from its arena; with the arena's cache large
#: enough that no block is ever freed, a block is allocated only when every earlier one is in use,
#: so ``allocated_blocks`` is the peak number alive at once: a count of allocations, exact and the
#: same on every run, whatever else the machine is doing.
_PIXEL_PEAK_SCRIPT = """
import json, sys
from PIL import Image
from lightning_lora.data.datamodule import StyleDataModule

def own_kb(key):
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status)
    except OSError:
        return None
    return int(fields[key].split()[0])

folder, resolution, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
core = Image.core
if hasattr(core, "set_use_block_allocator"):
    core.set_use_block_allocator(0)  # the default: pixels in blocks from the arena
core.set_block_size(2**20)
core.set_blocks_max(2**16)  # more than ever alive: a released block is kept for reuse
core.clear_cache()
core.reset_stats()
baseline_kb = own_kb("VmRSS")
dm = StyleDataModule(folder, resolution=resolution)
dm.setup("fit")
stats = core.get_stats()
hwm_kb = own_kb("VmHWM")
core.clear_cache()
core.reset_stats()
full_size = Image.new("RGB", (side, side))
decode_blocks = core.get_stats()["allocated_blocks"]
print(json.dumps({
    "peak_blocks": stats["allocated_blocks"],
    "freed_blocks": stats["freed_blocks"],
    "decode_blocks": decode_blocks,
    "own_peak_rss_growth_mb": None if hwm_kb is None else (hwm_kb - baseline_kb) / 1024,
    "sizes": [im.size for im in dm.images.images],
}))
"""


@pytest.mark.slow  # decodes 6 large images in a subprocess
def test_setup_memory_grows_with_resolution_not_upload_size(tmp_path: Path) -> None:
    # 6 PNGs of 6000x6000 (about 120 kB each) that Pillow decodes to 137 MiB each (RGB takes 4
    # bytes a pixel). StyleDataModule.setup (cache_latents, the default) must decode them one at a
    # time and keep only the 512 px copies: at most one full-size decode's pixels alive at once.
    #
    # This used to bound the child's ``ru_maxrss`` growth (600 MiB) and failed at 720 MiB on a
    # fresh clone with another job on the CPU. Nothing overlapped: the child's own peak (VmHWM) is
    # about +155 MiB on every run, idle or loaded (one decode; glibc keeps its freed blocks for the
    # next). But Linux carries the parent's RSS high-water mark across exec into the child's
    # ``ru_maxrss`` (subprocess uses vfork: the pytest process's lifetime peak), so the figure was
    # max(pytest's peak, the child's) minus the child's baseline, i.e. whatever the tests before
    # this one had used: 166 MiB after one training test, 342 after the callbacks tests, 1028
    # after a 1200 MiB allocation freed at session start. The count below depends on neither.
    side, resolution = 6000, 512
    folder = tmp_path / "big"
    folder.mkdir()
    write_solid_png(folder / "0.png", side, side)
    for i in range(1, 6):
        shutil.copy(folder / "0.png", folder / f"{i}.png")
    proc = subprocess.run(
        [sys.executable, "-c", _PIXEL_PEAK_SCRIPT, str(folder), str(resolution), str(side)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["sizes"] == [[resolution, resolution]] * 6
    assert result["freed_blocks"] == 0, result  # no block left the arena: the count is the peak
    decode = result["decode_blocks"]  # 140 blocks of 43 rows
    # the instrument sees a full-size decode (not blind), and never two at once: one decode,
    # the resize's 512x6000 pass and the kept 512 px copies (158 blocks); keeping the decodes
    # (or full-size copies of them) costs 6 x 140
    assert decode <= result["peak_blocks"] < 2 * decode, result
    # a wide backstop for full-size copies outside Pillow (tensors, arrays): the child's own peak
    # RSS, not ru_maxrss (158 MiB measured; 6 decodes are > 800)
    if result["own_peak_rss_growth_mb"] is not None:
        assert result["own_peak_rss_growth_mb"] < 600, result


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.slow
def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 200
    started = time.monotonic()
    with pytest.raises(InvalidImageError, match=r"bomb\.png.*(30000x30000|decompression bomb)"):
        load_rgb(bomb)  # the default limit (64 Mpx), no override
    assert time.monotonic() - started < 2


@pytest.mark.slow
def test_tiny_and_extreme_aspect_images_train_at_the_target_resolution(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (10, 200, 10)).save(tmp_path / "dot.png")
    Image.new("RGB", (20000, 100), (200, 10, 10)).save(tmp_path / "strip.png")
    for name in ("dot.png", "strip.png"):
        assert preprocess(load_rgb(tmp_path / name), 64).shape == (3, 64, 64)
    dm = StyleDataModule(str(tmp_path), resolution=64, batch_size=2, cache_latents=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 64, 64)


@pytest.mark.slow
def test_animated_png_uses_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), (i * 100, 0, 0)) for i in range(3)]
    path = tmp_path / "anim.png"
    frames[0].save(path, format="PNG", save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 3  # a real APNG
    assert load_rgb(path).getpixel((8, 8)) == (0, 0, 0)
