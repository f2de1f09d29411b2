"""The style dataset: image sets with captions, aspect-ratio buckets, masks and latent caching.

The images come from one or more image sets and a held-out validation set
(:mod:`lightning_lora.data.sources`).

Images are grouped into aspect-ratio buckets (:mod:`lightning_lora.data.buckets`), captions come
from caption files, ``metadata.jsonl`` or the template (:mod:`lightning_lora.data.captions`), masks
weight the loss (:mod:`lightning_lora.data.masks`), and the encoded latents live on the device or in
a disk cache (:mod:`lightning_lora.data.latent_cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_lora.clients.image_types import (
    IMAGE_EXTENSIONS,  # re-exported: the extensions listed
)
from lightning_lora.data.buckets import (
    Bucket,
    BucketBatchSampler,
    BucketSettings,
    assign_bucket,
    bucket_info,
    bucket_table,
    make_buckets,
)
from lightning_lora.data.captions import (
    CaptionSettings,
)
from lightning_lora.data.datasets import (
    Batch,
    CachedLatentDataset,
    SetWeightedBatches,
    StyleImageDataset,
    collate_identity,
    collate_images,
    plain_settings,
)
from lightning_lora.data.image_folder import (
    DEFAULT_MAX_IMAGE_PIXELS,
    StyleImage,
    find_style_images,
    image_size,
    load_rgb,
    load_training_image,
    preprocess,
    training_size,
)
from lightning_lora.data.kohya_toml import kohya_datasets
from lightning_lora.data.latent_cache import (
    ENTRIES_PER_SHARD,
    DiskLatentCache,
    DiskLatentStore,
    MemoryLatentStore,
    entry_key,
    file_sha256,
    module_fingerprint,
)
from lightning_lora.data.masks import latent_weights, mask_path
from lightning_lora.data.sources import (
    ImageSet,
    ValidationSettings,
    collect_images,
    image_sets,
    plain,
)
from lightning_lora.errors import DatasetError

__all__ = [  # the data path's public names, importable from here
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTENSIONS",
    "Batch",
    "CachedLatentDataset",
    "Encoders",
    "StyleDataModule",
    "StyleImage",
    "StyleImageDataset",
    "collate_images",
    "find_style_images",
    "image_size",
    "load_rgb",
    "load_training_image",
    "preprocess",
    "training_size",
]

log = logging.getLogger(__name__)


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

    #: what ``save_hyperparameters`` stores (Lightning types it ``AttributeDict | MutableMapping``)
    hparams: AttributeDict

    def __init__(
        self,
        image_dir: str | None = None,
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
        datasets: Sequence[Mapping[str, Any]] | None = None,
        validation: Mapping[str, Any] | None = None,
        prior_loss_weight: float = 1.0,
        dataset_config: str | None = None,
    ) -> None:
        """Configure the data.

        Args:
            image_dir: Folder of images (jpg, jpeg, png, webp), optional ``<stem>.txt``
                captions, ``metadata.jsonl`` and ``<stem>.mask.png`` masks: the short form of
                one image set (ignored when ``datasets`` is given).
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
            val_max_images: How many images the deterministic validation loss uses (the first
                ones of the validation set).
            bucketing: ``data.bucketing`` (:class:`~lightning_lora.data.buckets.BucketSettings`);
                ``None``: on, with the defaults.
            caption: ``data.caption`` (:class:`~lightning_lora.data.captions.CaptionSettings`).
            masked_loss: Weight the loss by each image's mask (:mod:`lightning_lora.data.masks`).
            cache: ``data.cache``: ``dir``, the disk latent cache folder (``None``: keep the
                cache on the training device).
            seed: Seed of the bucket and caption shuffles (the run's ``seed``).
            datasets: ``data.datasets``: image sets (:class:`~.sources.ImageSet` fields:
                ``image_dir``, ``repeats``, ``loss_weight``, ``regularization``,
                ``caption_template``, ``token``, ``caption``); ``None``: ``image_dir`` alone.
            validation: ``data.validation``: ``image_dir`` or ``val_split`` (and its ``seed``)
                of a held-out validation set (:class:`~.sources.ValidationSettings`); ``None``:
                the first training images (a measure of fit).
            prior_loss_weight: Weight of the regularization sets' (prior-preservation) loss.
            dataset_config: A kohya dataset config TOML whose subsets are the image sets
                (:mod:`~lightning_lora.data.kohya_toml`), instead of ``datasets``.
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
        bucketing = plain_settings(bucketing)
        caption = plain_settings(caption)
        cache = plain_settings(cache)
        datasets = plain(datasets) or None
        if dataset_config:
            if datasets:
                raise DatasetError("give data.datasets or data.dataset_config, not both")
            datasets = kohya_datasets(dataset_config)
        validation = plain_settings(plain(validation))
        if prior_loss_weight < 0:
            raise DatasetError(f"data.prior_loss_weight must be >= 0, got {prior_loss_weight}")
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
        #: The image sets (``data.datasets``, or ``image_dir`` as one set).
        self.sets: list[ImageSet] = image_sets(
            datasets, image_dir, caption_template, token, self.captions
        )
        self.validation = ValidationSettings.from_config(validation, self.seed)
        self.prior_loss_weight = float(prior_loss_weight)
        self.masked_loss = masked_loss
        cache_dir = (cache or {}).get("dir")
        self.cache_dir = Path(str(cache_dir)).expanduser() if cache_dir else None
        self.items: list[StyleImage] = []
        #: Each training image's set (an index into :attr:`sets`).
        self.item_sets: list[int] = []
        #: The validation images (held out; empty: the first training images are used).
        self.val_items: list[StyleImage] = []
        #: Each image's bucket ``(width, height)``.
        self.buckets: list[Bucket] = []
        self.images: StyleImageDataset | None = None
        self.cache: CachedLatentDataset | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        """Find the images, read their sizes, assign buckets, decode and check (idempotent).

        With the disk cache nothing is decoded here: images are decoded when they are encoded,
        and an image whose latents are cached already is not decoded at all.
        """
        if self.images is not None:
            return
        hp = self.hparams
        self.find_images()
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
            captions=self.caption_settings(),
            seed=self.seed,
        )
        log.info(
            "%d training images from %s in %d bucket(s):\n%s",
            len(self.items),
            ", ".join(s.image_dir for s in self.sets),
            len(set(self.buckets)),
            bucket_table(self.buckets),
        )

    def find_images(self) -> None:
        """List every set's images (:attr:`items`, :attr:`item_sets`) and the validation set.

        With ``val_split``, the held-out share of the instance images leaves :attr:`items` for
        :attr:`val_items`; regularization images are never held out.
        """
        val = self.validation
        self.items, self.item_sets, self.val_items = collect_images(self.sets, val)
        if val.held_out:
            log.info("val/loss on %d held-out image(s)", min(len(self.val_items), self.val_count))

    @property
    def val_count(self) -> int:
        """How many validation images ``val/loss`` is measured on."""
        return int(self.hparams.val_max_images)

    def caption_settings(self) -> list[CaptionSettings]:
        """Each training image's caption settings (its set's)."""
        return [self.sets[s].caption for s in self.item_sets]

    @property
    def captions_vary(self) -> bool:
        """Whether any set's captions change from epoch to epoch."""
        return any(s.caption.varies for s in self.sets)

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
        """SHA-256 over the training set's file contents and captions (for LoRA metadata).

        With several image sets, each image's set settings (repeats, weight, regularization)
        count too; one set hashes as before sets existed.
        """
        digest = hashlib.sha256()
        for item, number in zip(self.items, self.item_sets, strict=True):
            digest.update(item.path.name.encode())
            digest.update(hashlib.sha256(item.path.read_bytes()).digest())
            digest.update(item.caption.encode())
            if len(self.sets) > 1:
                image_set = self.sets[number]
                digest.update(
                    f"{image_set.repeats}:{image_set.loss_weight}:{image_set.regularization}".encode()
                )
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
        # a text encoder that trains (its LoRA) encodes captions every step, too
        varying = self.captions_vary or bool(
            getattr(getattr(self, "_encoders", None), "trains_text_encoder", False)
        )
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
            store,
            len(self.items),
            captions if varying else None,
            self.caption_settings(),
            self.seed,
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
            clip_skip = getattr(encoders, "clip_skip", 1)
            if clip_skip != 1:  # another layer's embeddings: other keys (clip skip 1's unchanged)
                fingerprint += f"-clip_skip{clip_skip}"
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
        repeats = [self.sets[s].repeats for s in self.item_sets]
        return BucketBatchSampler(
            self.buckets, self.batch_size, self.seed, world, rank, repeats=repeats
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Bucketed batches from the latent cache (built on first use), else decoded images."""
        if self.cache_latents:
            self._ensure_cache()
            assert self.cache is not None  # _ensure_cache built it
            dataset: Dataset = self.cache
            workers = 0
        else:
            assert self.images is not None
            dataset, workers = self.images, self.num_workers
        if self.weighted:
            dataset = SetWeightedBatches(
                dataset,
                [self.sets[s].loss_weight for s in self.item_sets],
                [self.sets[s].regularization for s in self.item_sets],
                self.prior_loss_weight,
            )
        return DataLoader(
            dataset,
            batch_size=None,  # the sampler yields whole batches (BatchRequest), one bucket each
            sampler=self.batch_sampler(),
            num_workers=workers,
            collate_fn=collate_identity,  # type: ignore[arg-type]  # batch_size=None: one whole batch per call, not a list
            persistent_workers=workers > 0,
        )

    @property
    def weighted(self) -> bool:
        """Whether batches carry set weights (a regularization set or a ``loss_weight`` != 1)."""
        return any(s.regularization or s.loss_weight != 1.0 for s in self.sets)

    def validation_items(self) -> list[StyleImage]:
        """The images ``val/loss`` is measured on (at most ``val_max_images``).

        The held-out set when ``data.validation`` names one, else the first instance
        (non-regularization) training images.
        """
        if self.validation.held_out:
            pool = self.val_items
        else:
            pool = [
                item
                for item, s in zip(self.items, self.item_sets, strict=True)
                if not self.sets[s].regularization
            ]
        return pool[: self.val_count]

    def validation_examples(self) -> tuple[torch.Tensor, list[str]]:
        """Fixed pixels and captions for the deterministic validation loss.

        The validation batch is :meth:`validation_items` center-cropped to the ``resolution``
        square, unflipped, with their base captions: one fixed batch whatever the buckets, so
        ``val/loss`` is comparable across runs with and without bucketing, and the eager
        validation pass needs one shape only.
        """
        assert self.images is not None
        square = self.resolution
        items = self.validation_items()
        pixels = torch.stack(
            [
                preprocess(
                    load_training_image(item.path, square, self.hparams.max_image_pixels),
                    square,
                )
                for item in items
            ]
        )
        return pixels, [item.caption for item in items]
