"""Images typed by their magic bytes, not their names (``lightning_lora.clients.image_types``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_lora.clients.image_types import (
    local_image_name,
    sniff_image_format,
    with_image_extension,
)
from tests.support.images import image_bytes


def test_sniffing_reads_magic_bytes_not_names(tmp_path: Path) -> None:
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PDF"):
        data = image_bytes(fmt)
        assert sniff_image_format(data) == fmt
        path = tmp_path / f"{fmt}.bin"
        path.write_bytes(data)
        assert sniff_image_format(path) == sniff_image_format(str(path)) == fmt
    assert sniff_image_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None  # RIFF, not WebP
    assert sniff_image_format(b"\x00\x00\x00\x1cftypavif") == "AVIF"
    assert sniff_image_format(b"\x00\x00\x00\x18ftypheic") == "HEIF"
    assert sniff_image_format(b"\xff\xd8") is None  # too short to be a JPEG
    assert sniff_image_format(b"") is None
    assert with_image_extension("a.jpeg", "JPEG") == "a.jpeg"
    assert with_image_extension("a.webp", "JPEG") == "a.jpg"
    assert with_image_extension("scan.tiff", "PNG") == "scan.tiff.png"
    assert with_image_extension(".png", "WEBP") == ".png.webp"
    with pytest.raises(ValueError, match="GIF"):
        with_image_extension("a", "GIF")
    assert local_image_name(2, "x/3f2a9c", image_format="WEBP") == "0002_3f2a9c.webp"
