"""The DataModule: discovery, captions, preprocessing, bad input, and the latent cache."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_lora.data import (
    StyleDataModule,
    find_style_images,
    load_rgb,
    preprocess,
)
from lightning_lora.errors import DatasetError, InvalidImageError


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
    assert dm.cache is not None and dm.cache.flipped_latent_params is not None
    torch.testing.assert_close(dm.cache.flipped_latent_params, dm.cache.latent_params.flip(-1))
    seen = {bool(dm.cache[0]["latent_params"][0, 0, 0] > 0) for _ in range(40)}
    assert seen == {True, False}  # both orientations are served
