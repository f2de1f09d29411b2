"""Test images: large PNGs written without holding their pixels in memory, small images of a
given format, the demo's scenes."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

from PIL import Image

from lightning_lora.demo.shapes import Scene, random_scene


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def write_solid_png(
    path: Path, width: int, height: int, color: tuple[int, int, int] = (180, 60, 30)
) -> Path:
    """Write a solid-colour 8-bit RGB PNG, one row at a time (a few kB of memory at most).

    An 8000x8000 image compresses to about 190 kB, yet decodes to 8000x8000 pixels.

    Args:
        path: Where to write.
        width: Width in pixels.
        height: Height in pixels.
        color: The RGB colour of every pixel.

    Returns:
        ``path``.
    """
    row = b"\x00" + bytes(color) * width  # filter type 0 (None) + the pixels
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    with path.open("wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n")
        out.write(_chunk(b"IHDR", header))
        out.write(_chunk(b"IDAT", b"".join(parts)))
        out.write(_chunk(b"IEND", b""))
    return path


def image_bytes(fmt: str, color: tuple[int, int, int] = (200, 30, 30), size=(16, 12)) -> bytes:
    """A small real image in Pillow format ``fmt`` (``"JPEG"``, ``"PNG"``, ``"WEBP"``, ...)."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def demo_scenes(count: int, seed: int = 3) -> list[Scene]:
    """``count`` random scenes of the demo's shapes world, from ``seed``."""
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]
