"""The style dataset: an image folder with captions, aspect-ratio buckets, masks and latent caching.

Images are grouped into aspect-ratio buckets (:mod:`lightning_lora.buckets`), captions come from
caption files, ``metadata.jsonl`` or the template (:mod:`lightning_lora.captions`), masks weight
the loss (:mod:`lightning_lora.masks`), and the encoded latents live on the device or in a disk
cache (:mod:`lightning_lora.latent_cache`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from lightning_lora.buckets import (
    BatchRequest,
    Bucket,
    BucketBatchSampler,
    BucketSettings,
    assign_bucket,
    bucket_info,
    bucket_table,
    crop_box,
    fit_size,
    make_buckets,
)
from lightning_lora.captions import (
    METADATA_FILE,
    CaptionSettings,
    caption_variant,
    read_metadata_jsonl,
    with_trigger,
)
from lightning_lora.errors import DatasetError, InvalidImageError
from lightning_lora.images import IMAGE_EXTENSIONS  # re-exported: the extensions listed
from lightning_lora.latent_cache import (
    ENTRIES_PER_SHARD,
    DiskLatentCache,
    DiskLatentStore,
    MemoryLatentStore,
    entry_key,
    file_sha256,
    module_fingerprint,
)
from lightning_lora.masks import MASK_SUFFIX, latent_weights, load_mask, mask_path, mask_tensor

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
    prepended as the first tag (:func:`lightning_lora.captions.with_trigger`). Mask files
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
    return _decode(path, max_pixels, _as_bucket(resolution))


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
    return fit_size(width, height, _as_bucket(resolution))


def _as_bucket(resolution: int | Sequence[int]) -> Bucket:
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


def _probe(path: Path, max_pixels: int) -> tuple[int, int]:
    """The checks before decoding (size, format, pixel limit); the oriented size."""
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
        with Image.open(path) as probe:  # verify() leaves the image unusable: reopen it
            orientation = probe.getexif().get(0x0112, 1)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(
            f"image {path} is too large (decompression bomb guard): {exc}"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"image {path} is unreadable, truncated or corrupt: {exc}") from exc
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _decode(path: Path, max_pixels: int, bucket: Bucket | None = None) -> Image.Image:
    """Check, decode, transpose and convert an image; resize it to cover ``bucket`` if given.

    Only one full-size copy of the pixels exists at a time when the file is RGB already (two
    while converting other modes); the file's own image is closed before returning.
    """
    _probe(path, max_pixels)
    try:
        with Image.open(path) as img:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            if bucket is None:
                return _to_rgb(img)  # always a new image: ``img`` is unusable once closed
            rgb = img if img.mode == "RGB" else _to_rgb(img)
            return rgb.resize(fit_size(*rgb.size, bucket), Image.Resampling.BICUBIC)
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
    resolution: int | Bucket,
    random_crop: bool = False,
    flip: bool = False,
    rng: random.Random | None = None,
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
    bucket = _as_bucket(resolution)
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


class StyleImageDataset(Dataset):
    """Decoded, preprocessed training images with captions (the uncached path), per bucket."""

    def __init__(
        self,
        items: Sequence[StyleImage],
        resolution: int | Sequence[Bucket],
        random_crop: bool = False,
        random_flip: bool = False,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        masked_loss: bool = False,
        preload: bool = True,
        captions: CaptionSettings | None = None,
        seed: int = 0,
    ) -> None:
        """Decode and check every image once (``preload``), so a bad file fails before training.

        Images are decoded one at a time and only their training-size copies are kept
        (:func:`load_training_image`), so memory grows with the buckets' size and the number of
        images, not with the uploads' pixel counts. Without ``preload`` nothing is kept: an
        image is decoded when asked for (the disk cache's path, whose memory must not grow with
        the dataset).

        Args:
            items: The examples.
            resolution: Output side length for every image (a square), or each image's bucket.
            random_crop: Random instead of center crops.
            random_flip: Random horizontal flips (probability 0.5).
            max_pixels: Largest accepted image.
            masked_loss: Load each image's mask (:mod:`lightning_lora.masks`) as well.
            preload: Decode every image now and keep its training-size copy.
            captions: Per-epoch caption variants (:mod:`lightning_lora.captions`).
            seed: Seed of the caption variants.
        """
        self.items = list(items)
        if isinstance(resolution, int):
            self.buckets: list[Bucket] = [(resolution, resolution)] * len(self.items)
        else:
            self.buckets = [_as_bucket(b) for b in resolution]
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.max_pixels = max_pixels
        self.masked_loss = masked_loss
        self.captions = captions or CaptionSettings()
        self.seed = seed
        #: The RGB images resized to cover their buckets (not full size); empty unless preloaded.
        self.images: list[Image.Image] = []
        #: Their masks at the same size (``None``: no mask), when ``masked_loss``.
        self.masks: list[Image.Image | None] = []
        if preload:
            for index in range(len(self.items)):
                img, mask = self._decode(index)
                self.images.append(img)
                self.masks.append(mask)

    def __len__(self) -> int:
        return len(self.items)

    def _decode(self, index: int) -> tuple[Image.Image, Image.Image | None]:
        item, bucket = self.items[index], self.buckets[index]
        img = load_training_image(item.path, bucket, self.max_pixels)
        mask = None
        if self.masked_loss:
            mask = load_mask(item.path, image_size(item.path, self.max_pixels))
            if mask is not None:
                mask = mask.resize(img.size, Image.Resampling.BILINEAR)
        return img, mask

    def _image(self, index: int) -> tuple[Image.Image, Image.Image | None]:
        if self.images:
            return self.images[index], self.masks[index]
        return self._decode(index)

    def example(
        self, index: int, flip: bool = False, rng: random.Random | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image ``index`` in its bucket and its pixel mask (``None`` without one).

        Center-cropped (deterministic) unless ``rng`` is given and random crops are on.
        """
        img, mask = self._image(index)
        bucket = self.buckets[index]
        random_crop = self.random_crop and rng is not None
        if mask is None:
            return preprocess(img, bucket, random_crop, flip, rng), None
        return preprocess(img, bucket, random_crop, flip, rng, mask=mask)

    def pixels(self, index: int, flip: bool = False) -> torch.Tensor:
        """Return image ``index`` center-cropped to its bucket (deterministic), maybe flipped."""
        return self.example(index, flip)[0]

    def pixel_mask(self, index: int, flip: bool = False) -> torch.Tensor:
        """Image ``index``'s mask, cropped like :meth:`pixels` (all ones without a mask)."""
        pixels, mask = self.example(index, flip)
        return torch.ones_like(pixels[:1]) if mask is None else mask

    def caption(self, index: int, epoch: int = 0) -> str:
        """The caption image ``index`` is trained with in ``epoch``."""
        return caption_variant(self.items[index].caption, self.captions, self.seed, epoch, index)

    def sample(self, index: int, epoch: int = 0) -> dict[str, Any]:
        """One training sample: random crop and flip as configured, the epoch's caption."""
        flip = self.random_flip and random.random() < 0.5
        pixels, mask = self.example(index, flip, random)
        out = {"pixel_values": pixels, "caption": self.caption(index, epoch)}
        if self.masked_loss:
            out["pixel_mask"] = torch.ones_like(pixels[:1]) if mask is None else mask
        return out

    def __getitem__(self, index: int | BatchRequest) -> dict[str, Any]:
        if isinstance(index, BatchRequest):
            return _collate_images([self.sample(i, index.epoch) for i in index.indices])
        return self.sample(index)


class CachedLatentDataset(Dataset):
    """Pre-encoded latent distributions (and text embeddings), one bucket per batch.

    A batch is assembled by its store (:mod:`lightning_lora.latent_cache`) with one indexing
    operation per tensor (device store) or one read per entry (disk store), without dataloader
    workers or per-sample collation. Captions that vary per epoch are not cached: the batch
    carries them as strings and the module encodes them (see :mod:`lightning_lora.captions`).
    """

    def __init__(
        self,
        store: MemoryLatentStore | DiskLatentStore,
        size: int,
        captions: Sequence[str] | None = None,
        caption_settings: CaptionSettings | None = None,
        seed: int = 0,
    ) -> None:
        """Wrap the cache.

        Args:
            store: Where the tensors are; ``flipped_*`` tensors, when present, are drawn instead
                of the plain ones with probability 0.5 per sample.
            size: Number of images.
            captions: The images' captions when they vary per epoch (no cached embeddings).
            caption_settings: How they vary.
            seed: Seed of the caption variants.
        """
        self.store = store
        self.size = size
        self.captions = list(captions) if captions is not None else None
        self.caption_settings = caption_settings or CaptionSettings()
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def batch(self, indices: Sequence[int], epoch: int = 0) -> Batch:
        """The batch of ``indices`` (one bucket) for ``epoch``."""
        tensors = self.store.gather(indices)
        params = tensors["latent_params"]
        weights = tensors.get("loss_weights")
        if "flipped_latent_params" in tensors:
            flip = torch.rand(len(indices), device=params.device) < 0.5
            params = torch.where(
                flip[:, None, None, None], tensors["flipped_latent_params"], params
            )
            if weights is not None:
                weights = torch.where(
                    flip[:, None, None, None], tensors["flipped_loss_weights"], weights
                )
        out: Batch = {"latent_params": params}
        if "text_embeds" in tensors:
            out["text_embeds"] = tensors["text_embeds"]
        else:
            assert self.captions is not None, "no cached text embeddings and no captions"
            settings, seed = self.caption_settings, self.seed
            out["captions"] = [
                caption_variant(self.captions[i], settings, seed, epoch, i) for i in indices
            ]
        if weights is not None:
            out["loss_weights"] = weights
        return out

    def __getitems__(self, indices: list[int]) -> Batch:
        return self.batch(indices)

    def __getitem__(self, index: int | BatchRequest) -> Batch:
        if isinstance(index, BatchRequest):
            return self.batch(index.indices, index.epoch)
        return {k: v[0] for k, v in self.batch([index]).items()}


def _collate_identity(batch: Batch) -> Batch:
    """Collate for batches that the dataset assembles whole (from a :class:`BatchRequest`)."""
    return batch


def _collate_images(samples: list[dict[str, Any]]) -> Batch:
    batch: Batch = {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "captions": [s["caption"] for s in samples],
    }
    if "pixel_mask" in samples[0]:
        batch["loss_weights"] = latent_weights(torch.stack([s["pixel_mask"] for s in samples]))
    return batch


def _plain(value: Any) -> dict[str, Any] | None:
    """A config mapping or settings dataclass as a plain ``dict`` (``None`` stays ``None``)."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return {str(k): v for k, v in dict(value).items()}


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
    """Serves a style's images and captions in aspect-ratio buckets, encoded once when cached."""

    def __init__(
        self,
        image_dir: str,
        resolution: int = 512,
        batch_size: int = 4,
        token: str = "sks",
        caption_template: str = "an artwork in the style of {token}",
        caption_dropout: float = 0.0,
        random_crop: bool = False,
        random_flip: bool = False,
        cache_latents: bool = True,
        num_workers: int = 0,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        val_max_images: int = 8,
        bucketing: Mapping[str, Any] | BucketSettings | None = None,
        caption: Mapping[str, Any] | CaptionSettings | None = None,
        masked_loss: bool = False,
        cache: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        """Configure the data.

        Args:
            image_dir: Folder of images (jpg, jpeg, png, webp), optional ``<stem>.txt``
                captions, ``metadata.jsonl`` and ``<stem>.mask.png`` masks.
            resolution: Training resolution in pixels (multiple of 8): buckets have about its
                square's area.
            batch_size: Samples per step (and per rank).
            token: Style token substituted into ``caption_template``.
            caption_template: Caption for images without a caption file or sidecar entry.
            caption_dropout: Probability of training a sample with an empty caption (applied by
                the LightningModule, so the cached and uncached paths agree).
            random_crop: Random crops (incompatible with ``cache_latents``).
            random_flip: Random horizontal flips (with caching, both orientations are cached).
            cache_latents: Encode images (and fixed captions) once before training.
            num_workers: DataLoader workers for the uncached path.
            max_image_pixels: Largest accepted image (width x height).
            val_max_images: How many images the deterministic validation loss uses.
            bucketing: ``data.bucketing`` (:class:`~lightning_lora.buckets.BucketSettings`);
                ``None``: on, with the defaults.
            caption: ``data.caption`` (:class:`~lightning_lora.captions.CaptionSettings`).
            masked_loss: Weight the loss by each image's mask (:mod:`lightning_lora.masks`).
            cache: ``data.cache``: ``dir``, the disk latent cache folder (``None``: keep the
                cache on the training device).
            seed: Seed of the bucket and caption shuffles (the run's ``seed``).
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
        # plain dicts: the hparams go into checkpoints, which load with weights_only=True (an
        # OmegaConf DictConfig from the config, or a dataclass, would not)
        bucketing = _plain(bucketing)
        caption = _plain(caption)
        cache = _plain(cache)
        self.save_hyperparameters(logger=False)
        self.image_dir = image_dir
        self.resolution = resolution
        self.batch_size = batch_size
        self.caption_dropout = caption_dropout
        self.cache_latents = cache_latents
        self.num_workers = num_workers
        self.seed = int(seed)
        self.bucketing = BucketSettings.from_config(bucketing)
        self.bucketing.grid(resolution)  # checks the settings now
        self.captions = CaptionSettings.from_config(caption)
        self.masked_loss = masked_loss
        cache_dir = (cache or {}).get("dir")
        self.cache_dir = Path(str(cache_dir)).expanduser() if cache_dir else None
        self.items: list[StyleImage] = []
        #: Each image's bucket ``(width, height)``.
        self.buckets: list[Bucket] = []
        self.images: StyleImageDataset | None = None
        self.cache: CachedLatentDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Find the images, read their sizes, assign buckets, decode and check (idempotent).

        With the disk cache nothing is decoded here: images are decoded when they are encoded,
        and an image whose latents are cached already is not decoded at all.
        """
        if self.images is not None:
            return
        hp = self.hparams
        self.items = find_style_images(
            self.image_dir,
            hp.caption_template,
            hp.token,
            self.captions.caption_ext,
            self.captions.trigger,
        )
        self.buckets = self.assign_buckets(
            [image_size(i.path, hp.max_image_pixels) for i in self.items]
        )
        self.images = StyleImageDataset(
            self.items,
            self.buckets,
            hp.random_crop,
            hp.random_flip,
            hp.max_image_pixels,
            masked_loss=self.masked_loss,
            preload=not (self.cache_latents and self.cache_dir is not None),
            captions=self.captions,
            seed=self.seed,
        )
        log.info(
            "%d training images from %s in %d bucket(s):\n%s",
            len(self.items),
            self.image_dir,
            len(set(self.buckets)),
            bucket_table(self.buckets),
        )

    def assign_buckets(self, sizes: Sequence[tuple[int, int]]) -> list[Bucket]:
        """Each image's bucket from its oriented ``(width, height)``.

        Bucketing off, every image gets the ``resolution`` square (the old center crop).
        """
        square = (self.resolution, self.resolution)
        if not self.bucketing.enabled:
            return [square] * len(sizes)
        step, lo, hi = self.bucketing.grid(self.resolution)
        candidates = make_buckets(self.resolution, step, lo, hi)
        no_upscale = self.bucketing.no_upscale
        return [assign_bucket(w, h, candidates, no_upscale, step) for w, h in sizes]

    @property
    def num_images(self) -> int:
        """Number of training images (after :meth:`setup`)."""
        return len(self.items)

    def bucket_info(self) -> dict[str, int]:
        """Images per bucket, ``{"576x448": 7, ...}`` (``bucket_info`` / ``ss_bucket_info``)."""
        return bucket_info(self.buckets)

    def dataset_hash(self) -> str:
        """SHA-256 over the training set's file contents and captions (for LoRA metadata)."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(item.path.name.encode())
            digest.update(hashlib.sha256(item.path.read_bytes()).digest())
            digest.update(item.caption.encode())
        return digest.hexdigest()

    # ------------------------------------------------------------------------------ cache
    @torch.no_grad()
    def build_cache(
        self,
        encode_images: Callable[[torch.Tensor], torch.Tensor],
        encode_text: Callable[[list[str]], torch.Tensor],
        device: torch.device,
        chunk: int = 8,
        fingerprint: str | None = None,
    ) -> None:
        """Encode every image (and its mirror when flipping) and fixed caption once.

        Images are encoded bucket by bucket, ``chunk`` at a time. With ``data.cache.dir`` the
        results go to the disk cache and only images missing from it are decoded and encoded.

        Args:
            encode_images: Pixels ``(B, 3, H, W)`` in [-1, 1] -> latent distribution parameters.
            encode_text: Captions -> text encoder hidden states.
            device: Where to run the encoders and keep the (device) cache.
            chunk: Images encoded per forward pass.
            fingerprint: Identifies the encoders in disk-cache keys (required with a disk cache;
                :meth:`use_encoders` derives it from the module's VAE and text encoder).
        """
        if not self.cache_latents or self.cache is not None:
            return
        assert self.images is not None, "setup() must run before build_cache()"
        flip = bool(self.hparams.random_flip)
        varying = self.captions.varies
        captions = [item.caption for item in self.items]
        disk = DiskLatentCache(self.cache_dir) if self.cache_dir is not None else None
        if disk is not None and fingerprint is None:
            raise ValueError("a disk latent cache needs the encoders' fingerprint")
        keys = [self._latent_key(i, fingerprint, flip) for i in range(len(self.items))]
        todo = [i for i in range(len(self.items)) if disk is None or keys[i] not in disk]
        groups: dict[Bucket, list[int]] = {}
        for i in todo:
            groups.setdefault(self.buckets[i], []).append(i)
        encoded: dict[int, dict[str, torch.Tensor]] = {}
        pending: list[tuple[str, dict[str, torch.Tensor]]] = []
        for indices in groups.values():  # bucket by bucket: one shape per forward pass
            for start in range(0, len(indices), chunk):
                done = self._encode_images(indices[start : start + chunk], encode_images, device)
                if disk is None:
                    encoded.update(done)
                    continue
                pending += [(keys[i], tensors) for i, tensors in done.items()]
                if len(pending) >= ENTRIES_PER_SHARD:  # bounded host memory while encoding
                    disk.put_many(pending)
                    pending = []
        if disk is not None and pending:
            disk.put_many(pending)
        store: MemoryLatentStore | DiskLatentStore
        if disk is None:
            text_ids = text_embeds = None
            if not varying:  # one embedding per distinct caption
                distinct = list(dict.fromkeys(captions))
                text_embeds = torch.cat(
                    [encode_text(distinct[i : i + chunk]) for i in range(0, len(distinct), chunk)]
                )
                row_of = {c: r for r, c in enumerate(distinct)}
                text_ids = [row_of[c] for c in captions]
            store = MemoryLatentStore(encoded, text_ids, text_embeds)
        else:
            text_keys = None
            if not varying:
                text_keys = [
                    entry_key(kind="text", encoder=fingerprint, caption=c) for c in captions
                ]
                missing = list(dict.fromkeys(k for k in text_keys if k not in disk))
                caption_of = dict(zip(text_keys, captions, strict=True))
                entries = []
                for start in range(0, len(missing), chunk):
                    part = missing[start : start + chunk]
                    embeds = encode_text([caption_of[k] for k in part])
                    entries += [(k, {"text_embeds": e}) for k, e in zip(part, embeds, strict=True)]
                disk.put_many(entries)
            store = DiskLatentStore(disk, keys, text_keys, device)
        self.cache = CachedLatentDataset(
            store, len(self.items), captions if varying else None, self.captions, self.seed
        )
        log.info(
            "cached %d latents%s%s on %s%s",
            len(self.items),
            " (and mirrored)" if flip else "",
            "" if varying else " and text embeddings",
            device if disk is None else disk.folder,
            f" ({len(self.items) - len(todo)} found there)" if disk is not None else "",
        )

    def _encode_images(
        self,
        indices: list[int],
        encode_images: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Encode images of one bucket (and their mirrors; their mask weights): index -> tensors."""
        assert self.images is not None
        out: dict[int, dict[str, torch.Tensor]] = {i: {} for i in indices}
        for flipped in (False, True) if self.hparams.random_flip else (False,):
            examples = [self.images.example(i, flipped) for i in indices]
            params = encode_images(torch.stack([px for px, _ in examples]).to(device))
            prefix = "flipped_" if flipped else ""
            for row, i in enumerate(indices):
                out[i][f"{prefix}latent_params"] = params[row]
            if self.masked_loss:
                masks = [torch.ones_like(px[:1]) if m is None else m for px, m in examples]
                weights = latent_weights(torch.stack(masks)).to(device)
                for row, i in enumerate(indices):
                    out[i][f"{prefix}loss_weights"] = weights[row]
        return out

    def _latent_key(self, index: int, fingerprint: str | None, flip: bool) -> str:
        """The disk-cache key of image ``index``'s latents: model, resolution, bucket, file.

        ``""`` without a disk cache (no fingerprint): nothing is hashed then.
        """
        if fingerprint is None:
            return ""
        path = self.items[index].path
        mask = mask_path(path)
        return entry_key(
            kind="latents",
            encoder=fingerprint,
            resolution=self.resolution,
            bucket=list(self.buckets[index]),
            file=file_sha256(path),
            flip=flip,
            masked=self.masked_loss,
            mask=file_sha256(mask) if self.masked_loss and mask.is_file() else None,
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
        fingerprint = None
        if self.cache_dir is not None:
            vae = getattr(encoders, "vae", None)
            text = getattr(encoders, "text_encoder", None)
            fingerprint = f"{module_fingerprint(vae)}-{module_fingerprint(text)}"
        with context:  # the training step's autocast state
            self.build_cache(
                encoders.encode_images,
                encoders.encode_text,
                encoders.device,
                fingerprint=fingerprint,
            )

    # ------------------------------------------------------------------------------ loaders
    def batch_sampler(self) -> BucketBatchSampler:
        """This rank's bucket batches (world size and rank from the trainer, if any)."""
        trainer = getattr(self, "trainer", None)
        world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
        return BucketBatchSampler(self.buckets, self.batch_size, self.seed, world, rank)

    def train_dataloader(self) -> DataLoader:
        """Bucketed batches from the latent cache (built on first use), else decoded images."""
        if self.cache_latents:
            self._ensure_cache()
            dataset: Dataset = self.cache
            workers = 0
        else:
            assert self.images is not None
            dataset, workers = self.images, self.num_workers
        return DataLoader(
            dataset,
            batch_size=None,  # the sampler yields whole batches (BatchRequest), one bucket each
            sampler=self.batch_sampler(),
            num_workers=workers,
            collate_fn=_collate_identity,
            persistent_workers=workers > 0,
        )

    def validation_examples(self) -> tuple[torch.Tensor, list[str]]:
        """Fixed pixels and captions for the deterministic validation loss.

        The validation batch is the first ``val_max_images`` images center-cropped to the
        ``resolution`` square, unflipped, with their base captions: one fixed batch whatever the
        buckets, so ``val/loss`` is comparable across runs with and without bucketing, and the
        eager validation pass needs one shape only.
        """
        assert self.images is not None
        count = min(len(self.items), self.hparams.val_max_images)
        square = self.resolution
        pixels = torch.stack(
            [
                preprocess(
                    load_training_image(self.items[i].path, square, self.hparams.max_image_pixels),
                    square,
                )
                for i in range(count)
            ]
        )
        return pixels, [self.items[i].caption for i in range(count)]
