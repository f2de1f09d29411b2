"""Image types told by content (magic bytes), and the file extensions that go with them.

Training accepts JPEG, PNG and WebP. Uploads often have keys without an extension (UUIDs) or
with the wrong one, so the type is read from the file's first bytes, never from its name, and
the local file is given the extension of its content (:func:`with_image_extension`). Nothing
here decodes pixels: it is cheap enough to run on every download.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lightning_lora.errors import InvalidImageError

__all__ = [
    "EXTENSIONS_BY_FORMAT",
    "EXTENSION_BY_FORMAT",
    "IMAGE_EXTENSIONS",
    "SNIFF_BYTES",
    "SUPPORTED_FORMAT_NAMES",
    "checked_image_format",
    "describe_format",
    "local_image_name",
    "sniff_image_format",
    "with_image_extension",
]

#: The extension given to a local file of each supported format (Pillow's format names).
EXTENSION_BY_FORMAT: dict[str, str] = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
#: Every extension accepted for each supported format (lower case).
EXTENSIONS_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"),
    "PNG": (".png",),
    "WEBP": (".webp",),
}
#: The extensions of training images (``lightning_lora.data.image_folder`` lists these).
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(e for exts in EXTENSIONS_BY_FORMAT.values() for e in exts)
#: How the supported formats are named in error messages.
SUPPORTED_FORMAT_NAMES = "JPEG, PNG, WebP"
#: How many leading bytes :func:`sniff_image_format` reads.
SNIFF_BYTES = 32

_DISPLAY_NAMES = {"WEBP": "WebP", "JPEG2000": "JPEG 2000", "JXL": "JPEG XL"}
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})


def sniff_image_format(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
) -> str | None:
    """Tell an image's format from its first bytes (without decoding anything).

    Args:
        source: A file path, or the file's leading bytes (at least :data:`SNIFF_BYTES` of them
            for every format to be told).

    Returns:
        ``"JPEG"``, ``"PNG"`` or ``"WEBP"`` for the supported formats (the keys of
        :data:`EXTENSION_BY_FORMAT`); for recognised unsupported ones ``"GIF"``, ``"BMP"``,
        ``"TIFF"``, ``"HEIF"``, ``"AVIF"``, ``"ICO"``, ``"PSD"``, ``"JPEG2000"``, ``"JXL"`` or
        ``"PDF"``; ``None`` when the content is none of these (text, an empty file...).

    Raises:
        OSError: ``source`` is a path that cannot be read.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        head = bytes(source[:SNIFF_BYTES])
    else:
        with Path(source).open("rb") as file:
            head = file.read(SNIFF_BYTES)
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"  # also MPO (multi-picture JPEG), which decodes as its first picture
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AVIF_BRANDS:
            return "AVIF"
        if brand in _HEIF_BRANDS:
            return "HEIF"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    if head[:4] == b"8BPS":
        return "PSD"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JXL"
    if head.startswith(b"%PDF"):
        return "PDF"
    return None


def describe_format(fmt: str | None) -> str:
    """Return how a sniffed format reads in a message: ``"a GIF file"``, ``"an AVIF file"``.

    Args:
        fmt: A result of :func:`sniff_image_format`.

    Returns:
        The phrase; for ``None``, ``"not an image file (unrecognised content)"``.
    """
    if fmt is None:
        return "not an image file (unrecognised content)"
    name = _DISPLAY_NAMES.get(fmt, fmt)
    article = "an" if name[0] in "AEIOU" else "a"
    return f"{article} {name} file"


def with_image_extension(name: str, fmt: str) -> str:
    """Give a file name the extension of its (supported) format.

    A name whose extension already fits is kept (``a.JPEG`` for JPEG); a supported image
    extension of another format is replaced (``a.jpg`` holding a PNG becomes ``a.png``);
    anything else gets the extension appended (``3f2a9c`` -> ``3f2a9c.webp``,
    ``scan.v2`` -> ``scan.v2.jpg``).

    Args:
        name: A file name (no folders).
        fmt: A key of :data:`EXTENSION_BY_FORMAT`.

    Returns:
        The name, ending in one of ``EXTENSIONS_BY_FORMAT[fmt]``.

    Raises:
        ValueError: ``fmt`` is not a supported format.
    """
    if fmt not in EXTENSION_BY_FORMAT:
        raise ValueError(f"{fmt!r} is not a supported image format ({SUPPORTED_FORMAT_NAMES})")
    stem, dot, ext = name.rpartition(".")
    suffix = f".{ext.lower()}" if dot and stem else ""
    if suffix in EXTENSIONS_BY_FORMAT[fmt]:
        return name
    if suffix in IMAGE_EXTENSIONS:
        return stem + EXTENSION_BY_FORMAT[fmt]
    return name + EXTENSION_BY_FORMAT[fmt]


# --------------------------------------------------------------------------- local names

_MAX_BASENAME_CHARS = 100
_UNSAFE_NAME_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]+")


def local_image_name(index: int, key: str, width: int = 4, image_format: str | None = None) -> str:
    """Return a safe, collision-free local file name for the ``index``-th image.

    Only the key's basename is kept, restricted to ``[A-Za-z0-9._-]``, without leading dots
    and capped in length (keeping the extension); the index prefix makes names unique.

    Args:
        index: Position of the image in the job's list.
        key: The image's object key.
        width: Zero-padding of the index.
        image_format: The content's format (``"JPEG"``, ``"PNG"`` or ``"WEBP"``, from
            :func:`~lightning_lora.clients.image_types.sniff_image_format`): the name then ends in
            its extension (:func:`~lightning_lora.clients.image_types.with_image_extension`),
            whatever the key's.

    Returns:
        E.g. ``0003_1.jpg``; ``0004_3f2a9c.png`` for the key ``3f2a9c`` holding a PNG.
    """
    base = re.split(r"[/\\]", key)[-1]
    base = _UNSAFE_NAME_CHARS_RE.sub("_", base).lstrip(".") or "image"
    if image_format is not None:
        base = with_image_extension(base, image_format)
    if len(base) > _MAX_BASENAME_CHARS:
        stem, dot, ext = base.rpartition(".")
        if dot and stem and len(ext) <= 10:
            base = f"{stem[: _MAX_BASENAME_CHARS - len(ext) - 1]}.{ext}"
        else:
            base = base[:_MAX_BASENAME_CHARS]
    return f"{index:0{width}d}_{base}"


def checked_image_format(path: Path, url: str) -> str:
    """Return the supported format of a downloaded image, told by its first bytes.

    Raises:
        InvalidImageError: The file is empty or not a JPEG, PNG or WebP (names ``url``).
        OSError: The file cannot be read.
    """
    fmt = sniff_image_format(path)
    if fmt in EXTENSION_BY_FORMAT:
        return fmt
    if path.stat().st_size == 0:
        raise InvalidImageError(f"image {url} is empty (0 bytes)")
    raise InvalidImageError(
        f"image {url} is {describe_format(fmt)}; supported: {SUPPORTED_FORMAT_NAMES}"
    )
