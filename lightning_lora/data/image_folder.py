"""A style's image folder: finding images and captions, decoding, bucket-aware preprocessing.

Images are typed by content (:mod:`lightning_lora.clients.image_types`), checked against a pixel
limit before decoding, transposed by their EXIF orientation, and resized and cropped to their
aspect-ratio bucket as little as possible (:mod:`lightning_lora.data.buckets`). Captions come from a
caption file, ``metadata.jsonl`` or the template (:mod:`lightning_lora.data.captions`).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lightning_lora.clients.image_types import IMAGE_EXTENSIONS
from lightning_lora.data.buckets import (
    Bucket,
    RandomSource,
    crop_box,
    fit_size,
)
from lightning_lora.data.captions import (
    METADATA_FILE,
    read_metadata_jsonl,
    with_trigger,
)
from lightning_lora.data.masks import MASK_SUFFIX, mask_tensor
from lightning_lora.errors import DatasetError, InvalidImageError

log = logging.getLogger(__name__)

#: Pillow's own bomb guard stays on; this is our (lower or equal) limit, checked before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class StyleImage:
    """One training example on disk.

    Attributes:
        path: The image file.
        caption: Its caption (caption file, ``metadata.jsonl`` or the template; trigger included).
    """

    path: Path
    caption: str


def find_style_images(
    image_dir: str | Path,
    caption_template: str,
    token: str,
    caption_extension: str = ".txt",
    trigger: str = "",
) -> list[StyleImage]:
    """List the images of a style folder with their captions.

    A caption comes from the image's ``<stem><caption_extension>`` file, else from the folder's
    ``metadata.jsonl`` (``file_name``, ``text``), else from the template; ``trigger`` is then
    prepended as the first tag (:func:`lightning_lora.data.captions.with_trigger`). Mask files
    (``<stem>.mask.png`` beside an image) are not training images.

    Args:
        image_dir: Folder holding the images (not searched recursively).
        caption_template: Caption for images without a caption; ``{token}`` is replaced.
        token: The style token substituted into the template.
        caption_extension: Extension of same-stem caption files.
        trigger: Prepended to every caption (empty: nothing).

    Returns:
        The examples sorted by file name.

    Raises:
        DatasetError: The folder is missing, holds no supported image, or a caption file or the
            ``metadata.jsonl`` is unreadable.
    """
    folder = Path(image_dir)
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist or is not a folder")
    sidecar = read_metadata_jsonl(folder)
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    image_stems = {p.stem for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    items: list[StyleImage] = []
    skipped: list[str] = []
    for path in files:
        if path.suffix == caption_extension or path.name == METADATA_FILE:
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(path.name)
            continue
        if path.stem.endswith(MASK_SUFFIX) and path.stem[: -len(MASK_SUFFIX)] in image_stems:
            continue  # the mask of another image
        caption_file = path.with_suffix(caption_extension)
        if caption_file.exists():
            try:
                caption = caption_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise DatasetError(f"caption file {caption_file} is unreadable: {exc}") from exc
        elif path.name in sidecar:
            caption = sidecar[path.name]
        else:
            caption = caption_template.format(token=token)
        items.append(StyleImage(path, with_trigger(caption, trigger)))
    if skipped:
        log.warning(
            "ignoring %d file(s) of unsupported type in %s (supported: %s): %s",
            len(skipped),
            folder,
            ", ".join(IMAGE_EXTENSIONS),
            ", ".join(skipped[:10]),
        )
    if not items:
        supported = ", ".join(IMAGE_EXTENSIONS)
        found = f" (found only unsupported files: {', '.join(skipped[:10])})" if skipped else ""
        raise DatasetError(f"no training images in {folder}: expected {supported} files{found}")
    return items


def load_rgb(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image safely: size check before decoding, EXIF orientation, RGB on white.

    Args:
        path: The image file.
        max_pixels: Largest accepted width x height.

    Returns:
        A fully decoded RGB image.

    Raises:
        InvalidImageError: Naming the file, when it is empty, not an image, truncated or corrupt,
            of an unsupported format, or larger than ``max_pixels``.
    """
    return _decode(path, max_pixels)


def load_training_image(
    path: Path, resolution: int | Bucket, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Open an image like :func:`load_rgb` and keep only its training-size copy.

    The image is decoded, EXIF-transposed, converted to RGB and resized (to the least size that
    covers the bucket, :func:`training_size`, BICUBIC) in one call, and the full-size decode is
    released before this returns, so memory grows with ``resolution``, not with the upload.
    :func:`preprocess` of the result equals :func:`preprocess` of :func:`load_rgb`'s image
    bit for bit (the same resize, done earlier; ``preprocess`` then has nothing to resize).

    Args:
        path: The image file.
        resolution: Training resolution in pixels (a square), or the ``(width, height)`` bucket.
        max_pixels: Largest accepted width x height.

    Returns:
        An RGB image covering the bucket (for a square: shorter side ``resolution``).

    Raises:
        InvalidImageError: As :func:`load_rgb`.
    """
    return _decode(path, max_pixels, as_bucket(resolution))


def training_size(width: int, height: int, resolution: int | Bucket) -> tuple[int, int]:
    """Return the size :func:`preprocess` resizes a ``width`` x ``height`` image to.

    Args:
        width: Image width.
        height: Image height.
        resolution: Training resolution (the shorter side after resizing), or a
            ``(width, height)`` bucket (the least size covering it, :func:`buckets.fit_size`).

    Returns:
        ``(new_width, new_height)``, covering the bucket.
    """
    return fit_size(width, height, as_bucket(resolution))


def as_bucket(resolution: int | Sequence[int]) -> Bucket:
    """A square resolution or a ``(width, height)`` pair as a bucket."""
    if isinstance(resolution, int):
        return resolution, resolution
    width, height = resolution
    return int(width), int(height)


def image_size(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """An image's ``(width, height)`` after EXIF orientation, read from its header only.

    Raises:
        InvalidImageError: As :func:`load_rgb`'s checks before decoding.
    """
    return _probe(path, max_pixels)


@contextlib.contextmanager
def _image_errors(path: Path) -> Iterator[None]:
    """Turn Pillow's and the file system's errors on ``path`` into an :class:`InvalidImageError`."""
    try:
        yield
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(
            f"image {path} is too large (decompression bomb guard): {exc}"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"image {path} is unreadable, truncated or corrupt: {exc}") from exc


def _probe(path: Path, max_pixels: int) -> tuple[int, int]:
    """The checks before decoding (size, format, pixel limit); the oriented size."""
    with _image_errors(path):
        if path.stat().st_size == 0:
            raise InvalidImageError(f"image {path} is empty (0 bytes)")
        with Image.open(path) as probe:
            fmt = probe.format
            width, height = probe.size
            if width * height > max_pixels:
                raise InvalidImageError(
                    f"image {path} is {width}x{height} = {width * height} pixels, above the "
                    f"limit of {max_pixels} (data.max_image_pixels)"
                )
            if fmt not in {"JPEG", "PNG", "WEBP", "MPO"}:
                raise InvalidImageError(
                    f"image {path} is a {fmt} file; supported formats are JPEG, PNG and WEBP"
                )
            probe.verify()
        with Image.open(path) as probe:  # verify() leaves the image unusable: reopen it
            orientation = probe.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _decode(path: Path, max_pixels: int, bucket: Bucket | None = None) -> Image.Image:
    """Check, decode, transpose and convert an image; resize it to cover ``bucket`` if given.

    Only one full-size copy of the pixels exists at a time when the file is RGB already; converting
    other modes holds up to three for a moment (RGBA: the decode, its white background and the RGB
    result). The full-size images are closed, which frees their pixels, before this returns or
    raises: Pillow's ``with`` block closes only the file, and reference counting alone would keep
    a decode alive as long as a traceback holds this frame.
    """
    _probe(path, max_pixels)
    with _image_errors(path), Image.open(path) as img:
        try:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            if bucket is None:
                return _to_rgb(img)  # always a new image: ``img`` is unusable once closed
            if img.mode == "RGB":
                return img.resize(fit_size(*img.size, bucket), Image.Resampling.BICUBIC)
            rgb = _to_rgb(img)
            img.close()  # the decode goes before the resize allocates
            try:
                return rgb.resize(fit_size(*rgb.size, bucket), Image.Resampling.BICUBIC)
            finally:
                rgb.close()
        finally:
            img.close()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB (always a new image); transparent pixels are put on white."""
    if img.mode in {"I;16", "I;16B", "I;16L", "I"}:
        img = img.point(lambda v: v * (1 / 256)).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "LA", "PA"}:
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        background.alpha_composite(img if img.mode == "RGBA" else img.convert("RGBA"))
        return background.convert("RGB")
    return img.convert("RGB")


@overload
def preprocess(
    img: Image.Image,
    resolution: int | Bucket,
    random_crop: bool = False,
    flip: bool = False,
    rng: RandomSource | None = None,
    mask: None = None,
) -> torch.Tensor: ...


@overload
def preprocess(
    img: Image.Image,
    resolution: int | Bucket,
    random_crop: bool = False,
    flip: bool = False,
    rng: RandomSource | None = None,
    *,
    mask: Image.Image,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def preprocess(
    img: Image.Image,
    resolution: int | Bucket,
    random_crop: bool = False,
    flip: bool = False,
    rng: RandomSource | None = None,
    mask: Image.Image | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Resize to cover the bucket, crop to it, optionally flip, scale to [-1, 1].

    Args:
        img: An RGB image.
        resolution: Output side length (a square) or the ``(width, height)`` bucket.
        random_crop: Crop at a random position instead of the center.
        flip: Mirror horizontally.
        rng: Random source for the crop position.
        mask: An ``L`` mask of ``img``'s size, given the same resize, crop and flip.

    Returns:
        A ``(3, height, width)`` float tensor in [-1, 1]; with ``mask``, also the mask as a
        ``(1, height, width)`` tensor in [0, 1].
    """
    bucket = as_bucket(resolution)
    size = fit_size(*img.size, bucket)
    box = crop_box(size, bucket, (rng or random) if random_crop else None)
    pixels = _to_tensor(_geometry(img, size, box, flip, Image.Resampling.BICUBIC)) / 127.5 - 1.0
    if mask is None:
        return pixels
    return pixels, mask_tensor(_geometry(mask, size, box, flip, Image.Resampling.BILINEAR))


def _geometry(
    img: Image.Image,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    flip: bool,
    resample: Image.Resampling,
) -> Image.Image:
    if img.size != size:  # images from load_training_image are at this size already
        img = img.resize(size, resample)
    img = img.crop(box)
    return ImageOps.mirror(img) if flip else img


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image -> a ``(3, H, W)`` float tensor of 0..255."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.size[1], img.size[0], 3).permute(2, 0, 1).float()
