"""The embedded demo style: a small, deterministic set of procedurally drawn "artworks"."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

DEMO_VERSION = "v1"
_PALETTE = [(236, 94, 41), (250, 196, 62), (38, 70, 124), (244, 237, 220), (30, 30, 30)]
_SUBJECTS = ["a house", "a tree", "a cat", "a boat", "a mountain", "a flower", "a bird", "a car"]


def _draw(rng: random.Random, size: int) -> Image.Image:
    """A flat-colour composition of circles and stripes in a fixed palette."""
    img = Image.new("RGB", (size, size), _PALETTE[3])
    draw = ImageDraw.Draw(img)
    for y in range(0, size, size // 8):
        if rng.random() < 0.5:
            draw.rectangle([0, y, size, y + size // 16], fill=_PALETTE[1])
    for _ in range(rng.randint(2, 5)):
        r = rng.randint(size // 10, size // 4)
        x, y = rng.randint(0, size), rng.randint(0, size)
        draw.ellipse(
            [x - r, y - r, x + r, y + r],
            fill=rng.choice(_PALETTE[:3]),
            outline=_PALETTE[4],
            width=max(1, size // 48),
        )
    return img


def make_demo_images(dest: str | Path, count: int = 8, size: int = 96) -> Path:
    """Write the demo style's images and captions (idempotent).

    Half of the images get a ``.txt`` caption naming their subject; the rest fall back to the
    caption template, as in a real style folder.

    Args:
        dest: Folder to fill.
        count: Number of images.
        size: Side length in pixels.

    Returns:
        The folder.
    """
    dest = Path(dest)
    if dest.is_dir() and len(list(dest.glob("*.png"))) == count:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    for i in range(count):
        _draw(rng, size).save(dest / f"demo_{i:02d}.png")
        if i % 2 == 0:
            caption = f"{_SUBJECTS[i % len(_SUBJECTS)]}, in the style of lldemo"
            (dest / f"demo_{i:02d}.txt").write_text(caption, encoding="utf-8")
    return dest
