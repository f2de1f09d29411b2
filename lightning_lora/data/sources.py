"""Where a run's images come from: image sets (``data.datasets``) and the held-out validation set.

A run trains on one or more **image sets** (kohya's dataset-config subsets: a folder, its
``num_repeats``, its caption settings and whether it ``is_reg``). ``data.image_dir`` alone is the
short form of one set with the defaults. Every image of every set is one dataset index: buckets,
the latent caches (memory and disk), masks and DDP sharding work per image, whatever its set.

A set's ``repeats`` puts each of its images that many times into every epoch (the sampler repeats
indices, the cache holds each image once). Its ``loss_weight`` scales its images' loss; a
``regularization`` set's images are the prior-preservation term, weighted by
``data.prior_loss_weight`` (see :func:`lightning_lora.training.losses.combine_sample_losses`).

**Validation** (``data.validation``): a folder (``image_dir``) or a seeded share of the instance
images (``val_split``) that is then not trained on. Neither given, ``val/loss`` is measured on the
first ``val_max_images`` training images: a measure of fit, not of generalisation.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_lora.data.captions import CaptionSettings
from lightning_lora.data.image_folder import StyleImage, find_style_images
from lightning_lora.errors import DatasetError

#: The keys of one ``data.datasets`` entry.
SET_KEYS = (
    "image_dir",
    "repeats",
    "loss_weight",
    "regularization",
    "caption_template",
    "token",
    "caption",
)


@dataclass(frozen=True)
class ImageSet:
    """One entry of ``data.datasets``.

    Attributes:
        image_dir: The set's folder (images, captions, ``metadata.jsonl``, masks).
        repeats: Times each image is seen per epoch (kohya's ``num_repeats``).
        loss_weight: Multiplies the loss of this set's images.
        regularization: A prior-preservation set (kohya's ``is_reg``): its loss is the prior
            term, weighted by ``data.prior_loss_weight``, and it is never held out.
        caption_template: Caption of its uncaptioned images (``{token}`` replaced).
        token: The token substituted into ``caption_template``.
        caption: Its caption files and per-epoch variants (``data.caption``'s fields).
    """

    image_dir: str
    repeats: int = 1
    loss_weight: float = 1.0
    regularization: bool = False
    caption_template: str = "an artwork in the style of {token}"
    token: str = "sks"
    caption: CaptionSettings = field(default_factory=CaptionSettings)

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise DatasetError(f"data.datasets: repeats must be >= 1, got {self.repeats}")
        if self.loss_weight < 0:
            raise DatasetError(f"data.datasets: loss_weight must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class ValidationSettings:
    """``data.validation``: the held-out images ``val/loss`` is measured on.

    Attributes:
        image_dir: A folder of validation images (captioned like the first set), or ``None``.
        val_split: Share of the instance (non-regularization) images held out, drawn from
            ``seed``; 0: none.
        seed: Seed of the split.
    """

    image_dir: str | None = None
    val_split: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_split < 1.0:
            raise DatasetError(f"data.validation.val_split must be in [0, 1), got {self.val_split}")
        if self.image_dir and self.val_split:
            raise DatasetError(
                "data.validation: give image_dir or val_split, not both "
                f"(got {self.image_dir!r} and {self.val_split})"
            )

    @property
    def held_out(self) -> bool:
        """Whether ``val/loss`` is measured on images that are not trained on."""
        return bool(self.image_dir) or self.val_split > 0

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | None, seed: int = 0) -> ValidationSettings:
        """Build from ``data.validation`` (``None``: no held-out set); ``seed`` if it has none."""
        values = dict(plain(value) or {})
        if values.get("seed") is None:
            values["seed"] = seed
        unknown = set(values) - {"image_dir", "val_split", "seed"}
        if unknown:
            raise DatasetError(f"data.validation: unknown key(s) {sorted(unknown)}")
        return cls(
            image_dir=str(values["image_dir"]) if values.get("image_dir") else None,
            val_split=float(values.get("val_split") or 0.0),
            seed=int(values["seed"]),
        )


def plain(value: Any) -> Any:
    """An OmegaConf node as plain containers (other values unchanged)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def image_sets(
    datasets: Sequence[Mapping[str, Any]] | None,
    image_dir: str | None,
    caption_template: str,
    token: str,
    caption: CaptionSettings,
) -> list[ImageSet]:
    """The run's image sets: ``data.datasets``, or ``data.image_dir`` as the one set.

    Args:
        datasets: ``data.datasets`` entries (keys :data:`SET_KEYS`; missing ones take the
            ``data.*`` values), or ``None``/empty for the short form.
        image_dir: ``data.image_dir`` (used without ``datasets``).
        caption_template: ``data.caption_template``, the sets' default.
        token: ``data.token``, the sets' default.
        caption: ``data.caption``, the sets' default (a set's ``caption`` overrides its fields).

    Returns:
        At least one set, with at least one that is not a regularization set.

    Raises:
        DatasetError: An unknown key, a bad value, or only regularization sets.
    """
    entries = list(plain(datasets) or [])
    if not entries:
        if not image_dir:
            raise DatasetError("no images: set data.image_dir or data.datasets")
        return [
            ImageSet(
                str(image_dir), caption_template=caption_template, token=token, caption=caption
            )
        ]
    sets = []
    for number, entry in enumerate(entries):
        entry = dict(entry)
        unknown = set(entry) - set(SET_KEYS)
        if unknown or not entry.get("image_dir"):
            raise DatasetError(
                f"data.datasets[{number}]: needs image_dir; unknown key(s) {sorted(unknown)} "
                f"(keys: {', '.join(SET_KEYS)})"
            )
        settings = {**_settings_dict(caption), **dict(entry.get("caption") or {})}
        sets.append(
            ImageSet(
                image_dir=str(entry["image_dir"]),
                repeats=int(entry.get("repeats", 1)),
                loss_weight=float(entry.get("loss_weight", 1.0)),
                regularization=bool(entry.get("regularization", False)),
                caption_template=str(entry.get("caption_template") or caption_template),
                token=str(entry.get("token") or token),
                caption=CaptionSettings.from_config(settings),
            )
        )
    if all(s.regularization for s in sets):
        raise DatasetError("data.datasets: every set is a regularization set; add an instance set")
    return sets


def _settings_dict(settings: CaptionSettings) -> dict[str, Any]:
    return {
        "caption_ext": settings.caption_ext,
        "trigger": settings.trigger,
        "shuffle_tags": settings.shuffle_tags,
        "keep_tokens": settings.keep_tokens,
        "tag_dropout": settings.tag_dropout,
    }


def held_out_indices(candidates: Sequence[int], share: float, seed: int) -> set[int]:
    """The indices ``val_split`` holds out: ``round(share * n)`` of ``candidates``, at least one.

    Drawn from ``seed`` alone, so every run (and every rank) with that seed holds out the same
    images; at least one candidate stays for training.

    Args:
        candidates: Indices that may be held out (the instance images).
        share: The share, in (0, 1); 0 holds out nothing.
        seed: Seed of the draw.

    Raises:
        DatasetError: Too few candidates to hold one out and train on another.
    """
    if share <= 0:
        return set()
    count = max(1, round(share * len(candidates)))
    if count >= len(candidates):
        raise DatasetError(
            f"data.validation.val_split={share} holds out {count} of {len(candidates)} instance "
            "image(s): none would be left to train on"
        )
    return set(random.Random(f"val_split:{seed}").sample(list(candidates), count))


def collect_images(
    sets: Sequence[ImageSet], validation: ValidationSettings
) -> tuple[list[StyleImage], list[int], list[StyleImage]]:
    """Every set's images, each image's set, and the validation images.

    With ``val_split``, the held-out share of the instance images leaves the training images
    for the validation images; regularization images are never held out. A validation folder
    is captioned with the first set's settings.

    Args:
        sets: The image sets (:func:`image_sets`).
        validation: ``data.validation``.

    Returns:
        ``(training images, each one's set index, validation images)``; the validation images
        are empty without a held-out set.
    """
    items: list[StyleImage] = []
    numbers: list[int] = []
    for number, image_set in enumerate(sets):
        found = _find(image_set, image_set.image_dir)
        items += found
        numbers += [number] * len(found)
    instance = [i for i, n in enumerate(numbers) if not sets[n].regularization]
    held = held_out_indices(instance, validation.val_split, validation.seed)
    val_items = [items[i] for i in sorted(held)]
    if validation.image_dir:
        val_items = _find(sets[0], validation.image_dir)
    kept = [i for i in range(len(items)) if i not in held]
    return [items[i] for i in kept], [numbers[i] for i in kept], val_items


def _find(image_set: ImageSet, folder: str) -> list[StyleImage]:
    return find_style_images(
        folder,
        image_set.caption_template,
        image_set.token,
        image_set.caption.caption_ext,
        image_set.caption.trigger,
    )
