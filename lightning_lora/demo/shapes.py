"""The procedural world of the embedded demo: captioned shapes on plain backgrounds, and a style.

The pretrained tiny model (:mod:`lightning_lora.demo.pretrain`) learns to draw these scenes from
their captions ("a red circle on a blue background"); the demo's LoRA then learns a style the
base model never drew: :func:`draw_styled_scene` renders a scene in a four-colour green palette
(the look of an old handheld console's screen). Everything is deterministic given a seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

#: Colour words and the RGB they are drawn in.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (50, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (245, 215, 50),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Where a caption may say the shape is (scenes without one place it anywhere).
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
    "in the middle": (0.5, 0.5),
}
#: The demo style's palette, darkest first: four greens.
STYLE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (20, 50, 20),
    (60, 110, 50),
    (130, 170, 40),
    (205, 228, 140),
)
STYLE_TOKEN = "lldemo"
#: Every word a caption of this world uses (the pretrained model's tokenizer has each as a token).
WORDS: tuple[str, ...] = tuple(
    sorted(
        {*COLOURS, *SHAPES, "a", "an", "on", "background", "in", "the", "style", "of", "artwork"}
        | {w for p in POSITIONS for w in p.split()}
        | {",", STYLE_TOKEN}
    )
)


@dataclass(frozen=True)
class Scene:
    """One procedural scene.

    Attributes:
        shape: One of :data:`SHAPES`.
        colour: The shape's colour word.
        background: The background's colour word (never the shape's).
        position: A key of :data:`POSITIONS`, or ``None`` when the caption does not say.
        center: The shape's centre as fractions of the side.
        radius: The shape's half-size as a fraction of the side.
    """

    shape: str
    colour: str
    background: str
    position: str | None
    center: tuple[float, float]
    radius: float

    @property
    def caption(self) -> str:
        """The scene's caption, e.g. ``"a red circle on the left on a blue background"``."""
        where = f" {self.position}" if self.position else ""
        article = "an" if self.colour[0] in "aeiou" else "a"
        background = f"{'an' if self.background[0] in 'aeiou' else 'a'} {self.background}"
        return f"{article} {self.colour} {self.shape}{where} on {background} background"


def random_scene(rng: random.Random, position_p: float = 0.5) -> Scene:
    """Draw a random scene.

    Args:
        rng: The random source.
        position_p: Probability that the caption names the shape's position.

    Returns:
        The scene.
    """
    colour, background = rng.sample(sorted(COLOURS), 2)
    radius = rng.uniform(0.16, 0.3)
    if rng.random() < position_p:
        position = rng.choice(sorted(POSITIONS))
        cx, cy = POSITIONS[position]
        center = (cx + rng.uniform(-0.05, 0.05), cy + rng.uniform(-0.05, 0.05))
    else:
        position = None
        center = (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
    return Scene(rng.choice(SHAPES), colour, background, position, center, radius)


def draw_scene(
    scene: Scene, size: int = 64, colours: dict[str, tuple[int, int, int]] | None = None
) -> Image.Image:
    """Render a scene as an RGB image.

    Args:
        scene: What to draw.
        size: Side length in pixels.
        colours: RGB of the background and of the shape, keyed ``"background"`` and ``"shape"``;
            defaults to the colours the caption names.

    Returns:
        The image.
    """
    colours = colours or {"background": COLOURS[scene.background], "shape": COLOURS[scene.colour]}
    # drawn at 4x and downsampled: antialiased edges, as a real image would have
    big = size * 4
    img = Image.new("RGB", (big, big), colours["background"])
    draw = ImageDraw.Draw(img)
    cx, cy, r = scene.center[0] * big, scene.center[1] * big, scene.radius * big
    fill = colours["shape"]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.89  # about the circle's area
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        top, left, right = (
            (cx, cy - r * 1.15),
            (cx - r * 1.2, cy + r * 0.85),
            (cx + r * 1.2, cy + r * 0.85),
        )
        draw.polygon([top, left, right], fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)


#: Which of the style's four greens each colour becomes (roughly by lightness).
_STYLE_LEVEL = {
    "black": 0,
    "blue": 0,
    "purple": 1,
    "red": 1,
    "green": 2,
    "orange": 2,
    "yellow": 3,
    "white": 3,
}


def draw_styled_scene(scene: Scene, size: int = 64) -> Image.Image:
    """Render a scene in the demo style: each colour becomes one of the four greens.

    A shape whose green would match its background's takes the green two shades away, so the
    shape always shows.

    Args:
        scene: What to draw.
        size: Side length in pixels.

    Returns:
        The styled image.
    """
    background = _STYLE_LEVEL[scene.background]
    shape = _STYLE_LEVEL[scene.colour]
    if shape == background:
        shape = (shape + 2) % len(STYLE_PALETTE)
    colours = {"background": STYLE_PALETTE[background], "shape": STYLE_PALETTE[shape]}
    return draw_scene(scene, size, colours)


def colour_histogram(images: Sequence[Image.Image], bins: int = 4) -> np.ndarray:
    """The style statistic: the share of pixels in each cell of a coarse RGB grid.

    Args:
        images: The images of one set (pooled).
        bins: Cells per channel (``bins**3`` in all).

    Returns:
        A vector of ``bins**3`` shares summing to 1.
    """
    counts = np.zeros(bins**3, dtype=np.float64)
    for image in images:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int64) * bins // 256
        index = (rgb[..., 0] * bins + rgb[..., 1]) * bins + rgb[..., 2]
        counts += np.bincount(index.ravel(), minlength=bins**3)
    return counts / counts.sum()


def style_distance(images: Sequence[Image.Image], style: Sequence[Image.Image]) -> float:
    """Distance of a set of images to the style images: total variation of their colour histograms.

    0 when the two sets use colours in the same proportions, 1 when they share no colour cell.

    Args:
        images: The set to measure (samples).
        style: The style images.

    Returns:
        The distance in [0, 1].
    """
    return float(0.5 * np.abs(colour_histogram(images) - colour_histogram(style)).sum())


def nearest_colour(rgb: Sequence[float]) -> str:
    """The colour word whose RGB is nearest to ``rgb``.

    Args:
        rgb: A colour.

    Returns:
        A key of :data:`COLOURS`.
    """
    return min(
        COLOURS, key=lambda n: sum((a - b) ** 2 for a, b in zip(COLOURS[n], rgb, strict=True))
    )


def background_colour(image: Image.Image, border: int = 4) -> str:
    """The colour word nearest to the mean of an image's outer ``border`` pixels.

    Shapes sit inside the middle of the image, so the border is background.

    Args:
        image: An RGB image.
        border: Width of the border ring in pixels.

    Returns:
        A key of :data:`COLOURS`.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    mask = np.ones(rgb.shape[:2], dtype=bool)
    mask[border:-border, border:-border] = False
    return nearest_colour(rgb[mask].mean(axis=0))


def colour_prompts(shape: str = "circle") -> dict[str, str]:
    """One prompt per background colour, with a shape of a contrasting colour.

    Args:
        shape: The shape to ask for.

    Returns:
        Background colour word to prompt, e.g. ``"red"`` to ``"a white circle on a red
        background"``.
    """
    prompts = {}
    for background in COLOURS:
        colour = "black" if background in ("white", "yellow") else "white"
        prompts[background] = Scene(shape, colour, background, None, (0.5, 0.5), 0.2).caption
    return prompts
