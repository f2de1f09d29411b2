"""The embedded demo style: scenes of :mod:`lightning_lora.demo.shapes`, drawn in the demo style."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from lightning_lora.demo.shapes import (
    STYLE_TOKEN,
    Scene,
    draw_scene,
    draw_styled_scene,
    random_scene,
)

DEMO_VERSION = "v2"


def make_demo_images(
    dest: str | Path,
    count: int = 8,
    size: int = 96,
    caption_every: int = 2,
    seed: int = 1234,
) -> Path:
    """Write the demo style's images and captions (idempotent).

    Each image is a procedural scene ("a red circle on a blue background") drawn in the demo
    style's four greens. Every ``caption_every``-th image gets a ``.txt`` caption naming its scene
    and the style (``"..., in the style of lldemo"``); the rest fall back to the caption template,
    as in a real style folder.

    Args:
        dest: Folder to fill.
        count: Number of images.
        size: Side length in pixels.
        caption_every: Caption every N-th image (1: all of them).
        seed: Seed of the scenes.

    Returns:
        The folder.
    """
    return _write_scenes(
        dest,
        count,
        seed,
        "demo",
        lambda scene: draw_styled_scene(scene, size),
        lambda i, scene: (
            f"{scene.caption}, in the style of {STYLE_TOKEN}" if i % caption_every == 0 else None
        ),
    )


def make_regularization_images(
    dest: str | Path, count: int = 16, size: int = 64, seed: int = 4321
) -> Path:
    """Write base-model-style scenes (named colours, no style) with captions (idempotent).

    A regularization (prior-preservation) set for the demo: what the base model draws for a
    caption without the style token, each captioned with its scene ("a red circle on a blue
    background").

    Args:
        dest: Folder to fill.
        count: Number of images.
        size: Side length in pixels.
        seed: Seed of the scenes.

    Returns:
        The folder.
    """
    return _write_scenes(
        dest, count, seed, "reg", lambda scene: draw_scene(scene, size), lambda i, s: s.caption
    )


def _write_scenes(
    dest: str | Path,
    count: int,
    seed: int,
    prefix: str,
    draw: Callable[[Scene], Image.Image],
    caption_of: Callable[[int, Scene], str | None],
) -> Path:
    """``count`` seeded scenes as ``{prefix}_NN.png``, each with its caption file if it has one."""
    dest = Path(dest)
    if dest.is_dir() and len(list(dest.glob("*.png"))) == count:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        scene = random_scene(rng)
        draw(scene).save(dest / f"{prefix}_{i:02d}.png")
        caption = caption_of(i, scene)
        if caption is not None:
            (dest / f"{prefix}_{i:02d}.txt").write_text(caption, encoding="utf-8")
    return dest
