"""Masked loss: per-latent-pixel loss weights from an image's alpha channel or ``<stem>.mask.png``.

With ``data.masked_loss=true`` each image may carry a mask: a ``<stem>.mask.png`` beside it
(grayscale; white = train, black = ignore), else its own alpha channel. The mask goes through the
same EXIF transpose, resize, crop and flip as the pixels, is averaged over each 8x8 patch (the VAE
factor) into one weight per latent pixel, and multiplies the per-element loss before the mean
(kohya's ``apply_masked_loss`` convention: no renormalisation, so a half-masked image contributes
half the loss). Masked-out latent pixels get exactly zero gradient. An image without either keeps
weight 1 everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from lightning_lora.data.buckets import VAE_FACTOR
from lightning_lora.errors import InvalidImageError

#: Suffix (before the extension) of mask files: ``cat.png`` -> ``cat.mask.png``.
MASK_SUFFIX = ".mask"


def mask_path(image: Path) -> Path:
    """Where an image's mask file would be: ``<stem>.mask.png`` beside it."""
    return image.with_name(f"{image.stem}{MASK_SUFFIX}.png")


def is_mask_file(path: Path) -> bool:
    """Whether ``path`` is some image's mask file (``x.mask.png`` with an image ``x.*`` beside)."""
    if not path.name.lower().endswith(f"{MASK_SUFFIX}.png"):
        return False
    stem = path.name[: -len(f"{MASK_SUFFIX}.png")]
    return any(p.stem == stem and p != path for p in path.parent.glob(f"{stem}.*"))


def load_mask(image: Path, size: tuple[int, int]) -> Image.Image | None:
    """An image's mask as an ``L`` image of ``size`` (its oriented size), or ``None``.

    Args:
        image: The image file.
        size: The image's ``(width, height)`` after EXIF orientation.

    Returns:
        The mask file's luminance, or the image's alpha channel, transposed like the image;
        ``None`` when it has neither.

    Raises:
        InvalidImageError: The mask file is unreadable or its size differs from the image's.
    """
    path = mask_path(image)
    source = path if path.is_file() else image
    try:
        with Image.open(source) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened)
            if source == path:
                mask = img.convert("L")
            elif img.mode in {"RGBA", "LA", "PA"} or (
                img.mode == "P" and "transparency" in img.info
            ):
                mask = img.convert("RGBA").getchannel("A")
            else:
                return None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"mask {source} is unreadable: {exc}") from exc
    if mask.size != size:
        raise InvalidImageError(f"mask {source} is {mask.size}, its image {image} is {size}")
    return mask


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """An ``L`` mask -> a ``(1, H, W)`` float tensor in [0, 1]."""
    data = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8)
    return data.view(1, mask.size[1], mask.size[0]).float() / 255.0


def latent_weights(pixel_mask: torch.Tensor) -> torch.Tensor:
    """Pixel mask ``(..., 1, H, W)`` -> per-latent-pixel weights ``(..., 1, H/8, W/8)``."""
    return F.avg_pool2d(pixel_mask, VAE_FACTOR)


def weight_loss(loss: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Multiply an element-wise loss ``(B, C, h, w)`` by ``(B, 1, h, w)`` weights (or keep it)."""
    if weights is None:
        return loss
    return loss * weights.to(device=loss.device, dtype=loss.dtype)
