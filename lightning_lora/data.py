"""The style dataset: an image folder with optional captions, preprocessing and latent caching."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from lightning_lora.errors import DatasetError, InvalidImageError
from lightning_lora.images import IMAGE_EXTENSIONS  # re-exported: the extensions listed

log = logging.getLogger(__name__)

#: Pillow's own bomb guard stays on; this is our (lower or equal) limit, checked before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
#: A batch of latent-distribution parameters and text embeddings (cached path) or of pixels and
#: captions (uncached path).
Batch = dict[str, Any]


@dataclass(frozen=True)
class StyleImage:
    """One training example on disk.

    Attributes:
        path: The image file.
        caption: Its caption (from ``<stem>.txt`` or the template).
    """

    path: Path
    caption: str


def find_style_images(
    image_dir: str | Path, caption_template: str, token: str, caption_extension: str = ".txt"
) -> list[StyleImage]:
    """List the images of a style folder with their captions.

    Args:
        image_dir: Folder holding the images (not searched recursively).
        caption_template: Caption for images without a caption file; ``{token}`` is replaced.
        token: The style token substituted into the template.
        caption_extension: Extension of same-stem caption files.

    Returns:
        The examples sorted by file name.

    Raises:
        DatasetError: The folder is missing, holds no supported image, or a caption file is
            unreadable.
    """
    folder = Path(image_dir)
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist or is not a folder")
    items: list[StyleImage] = []
    skipped: list[str] = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix == caption_extension or path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(path.name)
            continue
        caption_file = path.with_suffix(caption_extension)
        if caption_file.exists():
            try:
                caption = caption_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise DatasetError(f"caption file {caption_file} is unreadable: {exc}") from exc
        else:
            caption = caption_template.format(token=token)
        items.append(StyleImage(path, caption))
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
    path: Path, resolution: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Open an image like :func:`load_rgb` and keep only its training-size copy.

    The image is decoded, EXIF-transposed, converted to RGB and resized (shorter side to
    ``resolution``, :func:`training_size`, BICUBIC) in one call, and the full-size decode is
    released before this returns, so memory grows with ``resolution``, not with the upload.
    :func:`preprocess` of the result equals :func:`preprocess` of :func:`load_rgb`'s image
    bit for bit (the same resize, done earlier; ``preprocess`` then has nothing to resize).

    Args:
        path: The image file.
        resolution: Training resolution in pixels.
        max_pixels: Largest accepted width x height.

    Returns:
        An RGB image whose shorter side is ``resolution``.

    Raises:
        InvalidImageError: As :func:`load_rgb`.
    """
    return _decode(path, max_pixels, resolution)


def training_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Return the size :func:`preprocess` resizes a ``width`` x ``height`` image to.

    Args:
        width: Image width.
        height: Image height.
        resolution: Training resolution: the shorter side after resizing.

    Returns:
        ``(new_width, new_height)``, each at least ``resolution``.
    """
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def _decode(path: Path, max_pixels: int, resolution: int | None = None) -> Image.Image:
    """Check, decode, transpose and convert an image; resize it when ``resolution`` is given.

    Only one full-size copy of the pixels exists at a time when the file is RGB already (two
    while converting other modes); the file's own image is closed before returning.
    """
    try:
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
        with Image.open(path) as img:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            if resolution is None:
                return _to_rgb(img)  # always a new image: ``img`` is unusable once closed
            rgb = img if img.mode == "RGB" else _to_rgb(img)
            return rgb.resize(training_size(*rgb.size, resolution), Image.Resampling.BICUBIC)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(
            f"image {path} is too large (decompression bomb guard): {exc}"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"image {path} is unreadable, truncated or corrupt: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB (always a new image); transparent pixels are put on white."""
    if img.mode in {"I;16", "I;16B", "I;16L", "I"}:
        img = img.point(lambda v: v * (1 / 256)).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "LA", "PA"}:
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        background.alpha_composite(img.convert("RGBA"))
        return background.convert("RGB")
    return img.convert("RGB")


def preprocess(
    img: Image.Image,
    resolution: int,
    random_crop: bool = False,
    flip: bool = False,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Resize the shorter side to ``resolution``, crop square, optionally flip, scale to [-1, 1].

    Args:
        img: An RGB image.
        resolution: Output side length in pixels.
        random_crop: Crop at a random position instead of the center.
        flip: Mirror horizontally.
        rng: Random source for the crop position.

    Returns:
        A ``(3, resolution, resolution)`` float tensor in [-1, 1].
    """
    new_w, new_h = training_size(*img.size, resolution)
    if img.size != (new_w, new_h):  # images from load_training_image are at this size already
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if random_crop:
        rng = rng or random
        left, top = rng.randint(0, new_w - resolution), rng.randint(0, new_h - resolution)
    else:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = ImageOps.mirror(img)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    pixels = data.view(resolution, resolution, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


class StyleImageDataset(Dataset):
    """Decoded, preprocessed training images with captions (the uncached path)."""

    def __init__(
        self,
        items: Sequence[StyleImage],
        resolution: int,
        random_crop: bool = False,
        random_flip: bool = False,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        """Decode and check every image once, so a bad file fails before training.

        Images are decoded one at a time and only their training-size copies are kept
        (:func:`load_training_image`), so memory grows with ``resolution`` and the number of
        images, not with the uploads' pixel counts.

        Args:
            items: The examples.
            resolution: Output side length.
            random_crop: Random instead of center crops.
            random_flip: Random horizontal flips (probability 0.5).
            max_pixels: Largest accepted image.
        """
        self.items = list(items)
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        #: The RGB images resized so the shorter side is ``resolution`` (not full size).
        self.images = [
            load_training_image(item.path, resolution, max_pixels) for item in self.items
        ]

    def __len__(self) -> int:
        return len(self.items)

    def pixels(self, index: int, flip: bool = False) -> torch.Tensor:
        """Return image ``index`` center-cropped (deterministic), optionally flipped."""
        return preprocess(self.images[index], self.resolution, flip=flip)

    def __getitem__(self, index: int) -> dict[str, Any]:
        flip = self.random_flip and random.random() < 0.5
        pixels = preprocess(self.images[index], self.resolution, self.random_crop, flip)
        return {"pixel_values": pixels, "caption": self.items[index].caption}


class CachedLatentDataset(Dataset):
    """Pre-encoded latent distributions and text embeddings, kept on the training device.

    Batches are assembled with one indexing operation per tensor (``__getitems__``), without
    dataloader workers or per-sample collation.
    """

    def __init__(
        self,
        latent_params: torch.Tensor,
        text_embeds: torch.Tensor,
        flipped_latent_params: torch.Tensor | None = None,
    ) -> None:
        """Wrap the cache.

        Args:
            latent_params: ``(N, 2*C, h, w)`` VAE latent distribution parameters (mean, logvar).
            text_embeds: ``(N, L, D)`` text encoder hidden states of the captions.
            flipped_latent_params: The same for mirrored images; when given, each sample draws
                the mirrored version with probability 0.5.
        """
        self.latent_params = latent_params
        self.text_embeds = text_embeds
        self.flipped_latent_params = flipped_latent_params

    def __len__(self) -> int:
        return self.latent_params.shape[0]

    def __getitems__(self, indices: list[int]) -> Batch:
        device = self.latent_params.device
        idx = torch.as_tensor(indices, dtype=torch.long)
        if device.type == "cuda":
            # A plain host-to-device copy waits for the device's queue (a sync every step); from
            # pinned memory it is asynchronous and the host runs ahead.
            idx = idx.pin_memory().to(device, non_blocking=True)
        else:
            idx = idx.to(device)
        params = self.latent_params.index_select(0, idx)
        if self.flipped_latent_params is not None:
            flip = torch.rand(len(indices), device=idx.device) < 0.5
            flipped = self.flipped_latent_params.index_select(0, idx)
            params = torch.where(flip[:, None, None, None], flipped, params)
        return {"latent_params": params, "text_embeds": self.text_embeds.index_select(0, idx)}

    def __getitem__(self, index: int) -> Batch:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def _collate_identity(batch: Batch) -> Batch:
    """Collate for :class:`CachedLatentDataset`, whose ``__getitems__`` returns a whole batch."""
    return batch


def _collate_images(samples: list[dict[str, Any]]) -> Batch:
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "captions": [s["caption"] for s in samples],
    }


class Encoders(Protocol):
    """The frozen encoders a latent cache is built with (a :class:`LoRAModule` is one)."""

    device: torch.device

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> latent distribution parameters."""
        ...

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Captions -> text encoder hidden states."""
        ...


class StyleDataModule(L.LightningDataModule):
    """Serves a style's images and captions, encoded once up front when ``cache_latents``."""

    def __init__(
        self,
        image_dir: str,
        resolution: int = 512,
        batch_size: int = 4,
        token: str = "sks",
        caption_template: str = "an artwork in the style of {token}",
        caption_extension: str = ".txt",
        caption_dropout: float = 0.0,
        random_crop: bool = False,
        random_flip: bool = False,
        cache_latents: bool = True,
        num_workers: int = 0,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        val_max_images: int = 8,
    ) -> None:
        """Configure the data.

        Args:
            image_dir: Folder of images (jpg, jpeg, png, webp) and optional ``<stem>.txt``.
            resolution: Training resolution in pixels (multiple of 8).
            batch_size: Samples per step.
            token: Style token substituted into ``caption_template``.
            caption_template: Caption for images without a caption file.
            caption_extension: Extension of caption files.
            caption_dropout: Probability of training a sample with an empty caption (applied by
                the LightningModule, so the cached and uncached paths agree).
            random_crop: Random crops (incompatible with ``cache_latents``).
            random_flip: Random horizontal flips (with caching, both orientations are cached).
            cache_latents: Encode images and captions once before training.
            num_workers: DataLoader workers for the uncached path.
            max_image_pixels: Largest accepted image (width x height).
            val_max_images: How many images the deterministic validation loss uses.
        """
        super().__init__()
        if resolution % 8:
            raise DatasetError(f"data.resolution must be a multiple of 8, got {resolution}")
        if not 0.0 <= caption_dropout < 1.0:
            raise DatasetError(f"data.caption_dropout must be in [0, 1), got {caption_dropout}")
        if cache_latents and random_crop:
            raise DatasetError(
                "data.random_crop=true cannot be combined with data.cache_latents=true (a cached "
                "latent has one fixed crop); set data.cache_latents=false or data.random_crop=false"
            )
        self.save_hyperparameters(logger=False)
        self.image_dir = image_dir
        self.resolution = resolution
        self.batch_size = batch_size
        self.caption_dropout = caption_dropout
        self.cache_latents = cache_latents
        self.num_workers = num_workers
        self.items: list[StyleImage] = []
        self.images: StyleImageDataset | None = None
        self.cache: CachedLatentDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Find, decode and check the images (idempotent)."""
        if self.images is not None:
            return
        hp = self.hparams
        self.items = find_style_images(
            self.image_dir, hp.caption_template, hp.token, hp.caption_extension
        )
        self.images = StyleImageDataset(
            self.items, self.resolution, hp.random_crop, hp.random_flip, hp.max_image_pixels
        )
        log.info("%d training images from %s", len(self.items), self.image_dir)

    @property
    def num_images(self) -> int:
        """Number of training images (after :meth:`setup`)."""
        return len(self.items)

    def dataset_hash(self) -> str:
        """SHA-256 over the training set's file contents and captions (for LoRA metadata)."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(item.path.name.encode())
            digest.update(hashlib.sha256(item.path.read_bytes()).digest())
            digest.update(item.caption.encode())
        return digest.hexdigest()

    @torch.no_grad()
    def build_cache(
        self,
        encode_images: Callable[[torch.Tensor], torch.Tensor],
        encode_text: Callable[[list[str]], torch.Tensor],
        device: torch.device,
        chunk: int = 8,
    ) -> None:
        """Encode every image (and its mirror when flipping) and caption once.

        Args:
            encode_images: Pixels ``(B, 3, H, W)`` in [-1, 1] -> latent distribution parameters.
            encode_text: Captions -> text encoder hidden states.
            device: Where to run the encoders and keep the cache.
            chunk: Images encoded per forward pass.
        """
        if not self.cache_latents or self.cache is not None:
            return
        assert self.images is not None, "setup() must run before build_cache()"
        n = len(self.images)

        def encode_all(flip: bool) -> torch.Tensor:
            out = []
            for start in range(0, n, chunk):
                idx = range(start, min(n, start + chunk))
                pixels = torch.stack([self.images.pixels(i, flip) for i in idx]).to(device)
                out.append(encode_images(pixels))
            return torch.cat(out)

        latents = encode_all(False)
        flipped = encode_all(True) if self.hparams.random_flip else None
        captions = [item.caption for item in self.items]
        embeds = torch.cat([encode_text(captions[i : i + chunk]) for i in range(0, n, chunk)])
        self.cache = CachedLatentDataset(latents, embeds, flipped)
        log.info(
            "cached %d latents%s and text embeddings on %s",
            n,
            " (and mirrored)" if flipped is not None else "",
            device,
        )

    def use_encoders(self, encoders: Encoders) -> None:
        """Give the datamodule the frozen encoders it builds its cache with (the module's).

        The cache is built once, when training first asks for batches (the model is on its
        device by then), like kohya's train_network caches before its loop.
        """
        self._encoders = encoders

    def _ensure_cache(self) -> None:
        if self.cache is not None:
            return
        encoders = getattr(self, "_encoders", None)
        if encoders is None:
            raise RuntimeError("no encoders for the latent cache: call use_encoders() first")
        trainer = getattr(self, "trainer", None)
        plugin = getattr(trainer, "precision_plugin", None)
        context = plugin.forward_context() if plugin is not None else contextlib.nullcontext()
        with context:  # the training step's autocast state
            self.build_cache(encoders.encode_images, encoders.encode_text, encoders.device)

    def train_dataloader(self) -> DataLoader:
        """Batches from the latent cache (built on first use), otherwise decoded images."""
        if self.cache_latents:
            self._ensure_cache()
            return DataLoader(
                self.cache, batch_size=self.batch_size, shuffle=True, collate_fn=_collate_identity
            )
        assert self.images is not None
        return DataLoader(
            self.images,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=_collate_images,
            persistent_workers=self.num_workers > 0,
        )

    def validation_examples(self) -> tuple[torch.Tensor, list[str]]:
        """Fixed pixels (center crop, unflipped) and captions for the deterministic val loss."""
        assert self.images is not None
        count = min(len(self.images), self.hparams.val_max_images)
        pixels = torch.stack([self.images.pixels(i) for i in range(count)])
        return pixels, [self.items[i].caption for i in range(count)]
