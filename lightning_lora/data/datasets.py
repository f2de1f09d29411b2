"""The two datasets a :class:`~.datamodule.StyleDataModule` serves, and their collates.

:class:`StyleImageDataset` decodes and preprocesses images (the uncached path);
:class:`CachedLatentDataset` serves encoded latents and text embeddings per bucket batch.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_lora.data.buckets import (
    BatchRequest,
    Bucket,
    RandomSource,
)
from lightning_lora.data.captions import (
    CaptionSettings,
    caption_variant,
)
from lightning_lora.data.image_folder import (
    DEFAULT_MAX_IMAGE_PIXELS,
    StyleImage,
    as_bucket,
    image_size,
    load_training_image,
    preprocess,
)
from lightning_lora.data.latent_cache import (
    DiskLatentStore,
    MemoryLatentStore,
)
from lightning_lora.data.masks import latent_weights, load_mask

log = logging.getLogger(__name__)

#: A batch of latent-distribution parameters and text embeddings (cached path) or of pixels and
#: captions (uncached path).
Batch = dict[str, Any]


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
        captions: CaptionSettings | Sequence[CaptionSettings] | None = None,
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
            masked_loss: Load each image's mask (:mod:`lightning_lora.data.masks`) as well.
            preload: Decode every image now and keep its training-size copy.
            captions: Per-epoch caption variants (:mod:`lightning_lora.data.captions`): one
                setting for all images, or each image's (its image set's).
            seed: Seed of the caption variants.
        """
        self.items = list(items)
        if isinstance(resolution, int):
            self.buckets: list[Bucket] = [(resolution, resolution)] * len(self.items)
        else:
            self.buckets = [as_bucket(b) for b in resolution]
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.max_pixels = max_pixels
        self.masked_loss = masked_loss
        self.captions = per_image(captions, len(self.items))
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
        self, index: int, flip: bool = False, rng: RandomSource | None = None
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
        settings = self.captions[index]
        return caption_variant(self.items[index].caption, settings, self.seed, epoch, index)

    def sample(self, index: int, epoch: int = 0) -> dict[str, Any]:
        """One training sample: random crop and flip as configured, the epoch's caption."""
        flip = self.random_flip and random.random() < 0.5
        pixels, mask = self.example(index, flip, random)
        out = {"pixel_values": pixels, "caption": self.caption(index, epoch)}
        if self.masked_loss:
            out["pixel_mask"] = torch.ones_like(pixels[:1]) if mask is None else mask
        return out

    @override
    def __getitem__(self, index: int | BatchRequest) -> dict[str, Any]:
        if isinstance(index, BatchRequest):
            return collate_images([self.sample(i, index.epoch) for i in index.indices])
        return self.sample(index)


class CachedLatentDataset(Dataset):
    """Pre-encoded latent distributions (and text embeddings), one bucket per batch.

    A batch is assembled by its store (:mod:`lightning_lora.data.latent_cache`) with one indexing
    operation per tensor (device store) or one read per entry (disk store), without dataloader
    workers or per-sample collation. Captions that vary per epoch are not cached: the batch
    carries them as strings and the module encodes them (see :mod:`lightning_lora.data.captions`).
    """

    def __init__(
        self,
        store: MemoryLatentStore | DiskLatentStore,
        size: int,
        captions: Sequence[str] | None = None,
        caption_settings: CaptionSettings | Sequence[CaptionSettings] | None = None,
        seed: int = 0,
    ) -> None:
        """Wrap the cache.

        Args:
            store: Where the tensors are; ``flipped_*`` tensors, when present, are drawn instead
                of the plain ones with probability 0.5 per sample.
            size: Number of images.
            captions: The images' captions when they vary per epoch (no cached embeddings).
            caption_settings: How they vary (one setting, or each image's).
            seed: Seed of the caption variants.
        """
        self.store = store
        self.size = size
        self.captions = list(captions) if captions is not None else None
        self.caption_settings = per_image(caption_settings, size)
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
                caption_variant(self.captions[i], settings[i], seed, epoch, i) for i in indices
            ]
        if weights is not None:
            out["loss_weights"] = weights
        return out

    def __getitems__(self, indices: list[int]) -> Batch:
        return self.batch(indices)

    @override
    def __getitem__(self, index: int | BatchRequest) -> Batch:
        if isinstance(index, BatchRequest):
            return self.batch(index.indices, index.epoch)
        return {k: v[0] for k, v in self.batch([index]).items()}


class SetWeightedBatches(Dataset):
    """A bucket-batch dataset whose batches also carry each sample's image-set weight.

    Adds ``sample_weights`` (``(B,)`` float32: the set's ``loss_weight``) and, when any set is a
    regularization set, ``prior`` (a tuple of bools: which samples are regularization images) and
    ``prior_loss_weight`` (``data.prior_loss_weight``); the module combines them
    (:func:`lightning_lora.training.losses.combine_sample_losses`).
    """

    def __init__(
        self,
        inner: Dataset,
        weights: Sequence[float],
        prior: Sequence[bool],
        prior_loss_weight: float = 1.0,
    ) -> None:
        """Wrap ``inner`` (a :class:`StyleImageDataset` or :class:`CachedLatentDataset`).

        Args:
            inner: The dataset that assembles the batches.
            weights: Each image's set ``loss_weight``.
            prior: Whether each image is of a regularization set.
            prior_loss_weight: Weight of the prior (regularization) loss term.
        """
        self.inner = inner
        self.weights = [float(w) for w in weights]
        self.prior = [bool(p) for p in prior]
        self.has_prior = any(self.prior)
        self.prior_loss_weight = float(prior_loss_weight)

    def __len__(self) -> int:
        return len(self.weights)

    @override
    def __getitem__(self, index: BatchRequest) -> Batch:
        batch: Batch = dict(self.inner[index])
        batch["sample_weights"] = torch.tensor(
            [self.weights[i] for i in index.indices], dtype=torch.float32
        )
        if self.has_prior:
            batch["prior"] = tuple(self.prior[i] for i in index.indices)
            batch["prior_loss_weight"] = self.prior_loss_weight
        return batch


def per_image(
    settings: CaptionSettings | Sequence[CaptionSettings] | None, count: int
) -> list[CaptionSettings]:
    """Each image's caption settings from one setting (or the defaults) or a list of them."""
    if settings is None or isinstance(settings, CaptionSettings):
        return [settings or CaptionSettings()] * count
    if len(settings) != count:
        raise ValueError(f"{len(settings)} caption settings for {count} images")
    return list(settings)


def collate_identity(batch: Batch) -> Batch:
    """Collate for batches that the dataset assembles whole (from a :class:`BatchRequest`)."""
    return batch


def collate_images(samples: list[dict[str, Any]]) -> Batch:
    """Stack decoded samples into a batch (pixels, captions, loss weights when masked)."""
    batch: Batch = {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "captions": [s["caption"] for s in samples],
    }
    if "pixel_mask" in samples[0]:
        batch["loss_weights"] = latent_weights(torch.stack([s["pixel_mask"] for s in samples]))
    return batch


def plain_settings(value: Any) -> dict[str, Any] | None:
    """A config mapping or settings dataclass as a plain ``dict`` (``None`` stays ``None``)."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return {str(k): v for k, v in dict(value).items()}
