"""Aspect-ratio buckets: equal-area training sizes, image assignment and a lockstep batch sampler.

kohya sd-scripts, SimpleTuner, OneTrainer and ai-toolkit train each image at the size of the
bucket nearest its aspect ratio instead of a center-cropped square. The scheme here follows
kohya's (``make_bucket_resolutions`` / ``BucketManager``), written for this project:

* :func:`make_buckets`: every ``(width, height)`` on a ``step`` grid between ``min_side`` and
  ``max_side`` whose area is at most ``resolution**2`` and as large as the grid allows, plus the
  ``resolution x resolution`` square.
* :func:`assign_bucket`: the bucket whose aspect ratio is nearest the image's (in log space, so a
  2:1 and a 1:2 image are equally far from the square); with ``no_upscale`` an image smaller than
  that bucket gets a bucket of its own size, rounded down to the grid.
* :func:`fit_size` / :func:`crop_box`: the image is scaled so it covers the bucket (the smallest
  scale that does) and the overhang is cropped, centered unless random crops are on. For a square
  bucket that is exactly the old shorter-side resize and center crop.
* :class:`BucketBatchSampler`: one bucket per batch; buckets and the images in them are shuffled
  every epoch from ``(seed, epoch)`` alone, so every data-parallel rank computes the same global
  batch list and takes its own slice of each batch: the ranks step through the same bucket
  sequence in lockstep.

Small buckets: a bucket whose image count is not a multiple of the (global) batch size ends in a
**ragged** batch (fewer images, same shape); nothing is merged into another bucket, so no image
is cropped to a shape further from its own. Under DDP a remainder smaller than the world size is
padded with repeats of the same bucket's images (as ``DistributedSampler`` pads), so every rank
gets at least one image of that shape in that step.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch.utils.data.distributed import DistributedSampler
from typing_extensions import override

from lightning_lora.errors import DatasetError

#: The VAE's downsampling factor: every training side is a multiple of it.
VAE_FACTOR = 8
#: A bucket's ``(width, height)`` in pixels.
Bucket = tuple[int, int]


@dataclass(frozen=True)
class BucketSettings:
    """``data.bucketing``: how images are grouped by aspect ratio.

    Attributes:
        enabled: Bucket by aspect ratio; off, every image is center-cropped to the square.
        step: Grid of bucket sides in pixels (a multiple of 8). When ``resolution`` is not a
            multiple of it, the grid is ``gcd(step, resolution)`` so the square stays a bucket.
        min_side: Smallest bucket side (``None``: ``resolution // 2``).
        max_side: Largest bucket side (``None``: ``resolution * 2``).
        no_upscale: Never enlarge an image: one smaller than its bucket gets a bucket of its own
            size, rounded down to the grid.
    """

    enabled: bool = True
    step: int = 64
    min_side: int | None = None
    max_side: int | None = None
    no_upscale: bool = False

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | BucketSettings | None) -> BucketSettings:
        """Build from a config mapping (``None``: the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, BucketSettings):
            return value
        return cls(**{str(k): v for k, v in dict(value).items()})

    def grid(self, resolution: int) -> tuple[int, int, int]:
        """The effective ``(step, min_side, max_side)`` for ``resolution``, checked.

        Raises:
            DatasetError: Naming the ``data.bucketing`` key that is out of range.
        """
        if self.step <= 0 or self.step % VAE_FACTOR:
            raise DatasetError(
                f"data.bucketing.step must be a positive multiple of {VAE_FACTOR}, got {self.step}"
            )
        step = self.step if resolution % self.step == 0 else math.gcd(self.step, resolution)
        lo = resolution // 2 if self.min_side is None else int(self.min_side)
        hi = resolution * 2 if self.max_side is None else int(self.max_side)
        lo = max(step, -(-lo // step) * step)  # up to the grid
        hi = hi // step * step  # down to the grid
        if lo > resolution:
            raise DatasetError(
                f"data.bucketing.min_side ({self.min_side}) must be at most data.resolution "
                f"({resolution})"
            )
        if hi < resolution:
            raise DatasetError(
                f"data.bucketing.max_side ({self.max_side}) must be at least data.resolution "
                f"({resolution})"
            )
        return step, lo, hi


def make_buckets(
    resolution: int, step: int = 64, min_side: int | None = None, max_side: int | None = None
) -> list[Bucket]:
    """The equal-area buckets around ``resolution**2``, sorted by aspect ratio (width / height).

    Args:
        resolution: The training resolution; the square ``resolution x resolution`` is a bucket.
        step: Grid of the sides (see :class:`BucketSettings`).
        min_side: Smallest side (``None``: ``resolution // 2``).
        max_side: Largest side (``None``: ``resolution * 2``).

    Returns:
        ``(width, height)`` pairs, each side a multiple of the grid, area at most
        ``resolution**2``; for every ``(w, h)`` also ``(h, w)``.
    """
    step, lo, hi = BucketSettings(True, step, min_side, max_side).grid(resolution)
    area = resolution * resolution
    sizes: set[Bucket] = {(resolution, resolution)}
    for width in range(lo, hi + 1, step):
        height = min(hi, area // width // step * step)
        if height >= lo:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def assign_bucket(
    width: int, height: int, buckets: Sequence[Bucket], no_upscale: bool = False, step: int = 64
) -> Bucket:
    """The bucket of a ``width`` x ``height`` image: the nearest aspect ratio.

    Args:
        width: Image width (after EXIF orientation).
        height: Image height.
        buckets: The candidates (:func:`make_buckets`).
        no_upscale: Give an image smaller than its bucket its own size, rounded down to ``step``
            (at least ``step``).
        step: The grid for ``no_upscale``.

    Returns:
        ``(bucket_width, bucket_height)``.
    """
    aspect = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
    if no_upscale and (width < best[0] or height < best[1]):
        scale = min(1.0, math.sqrt(best[0] * best[1] / (width * height)))
        own = (
            max(step, int(width * scale) // step * step),
            max(step, int(height * scale) // step * step),
        )
        if own[0] * own[1] < best[0] * best[1]:
            return own
    return best


def fit_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """The size an image is resized to before cropping to ``bucket``: the least that covers it.

    For a square bucket of side ``r`` this is the shorter side resized to ``r`` (the same
    rounding as before buckets existed), so square-bucket crops are unchanged bit for bit.
    """
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    return max(bw, round(width * scale)), max(bh, round(height * scale))


class RandomSource(Protocol):
    """What a random crop draws from: a ``random.Random``, or the ``random`` module itself."""

    def randint(self, a: int, b: int) -> int: ...


def crop_box(
    size: tuple[int, int], bucket: Bucket, rng: RandomSource | None = None
) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` crop of an image of ``size`` (from :func:`fit_size`).

    Args:
        size: The resized image's ``(width, height)``.
        bucket: The target ``(width, height)``.
        rng: Random crop position when given; centered otherwise.
    """
    (w, h), (bw, bh) = size, bucket
    if rng is not None:
        left, top = rng.randint(0, w - bw), rng.randint(0, h - bh)
    else:
        left, top = (w - bw) // 2, (h - bh) // 2
    return left, top, left + bw, top + bh


def bucket_name(bucket: Bucket) -> str:
    """``"576x448"`` (width x height), the key of ``bucket_info``."""
    return f"{bucket[0]}x{bucket[1]}"


def bucket_info(assigned: Sequence[Bucket]) -> dict[str, int]:
    """Image count per bucket, as kohya's ``ss_bucket_info`` records it (largest count first)."""
    counts = Counter(assigned)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][0] / kv[0][1], kv[0]))
    return {bucket_name(b): n for b, n in ordered}


def bucket_table(assigned: Sequence[Bucket]) -> str:
    """The bucket table the training log prints: resolution, aspect ratio, image count."""
    lines = [f"{'bucket':>11}  {'aspect':>6}  {'images':>6}"]
    for name, count in bucket_info(assigned).items():
        w, h = (int(v) for v in name.split("x"))
        lines.append(f"{name:>11}  {w / h:6.3f}  {count:6d}")
    return "\n".join(lines)


@dataclass(frozen=True)
class BatchRequest:
    """What :class:`BucketBatchSampler` yields: one batch's dataset indices and its epoch.

    The epoch travels with the indices (not as dataset state), so per-epoch caption variants are
    the same in dataloader worker processes, after a resume and on every rank.

    Attributes:
        indices: Dataset indices, all of one bucket.
        epoch: The epoch the batch belongs to.
    """

    indices: tuple[int, ...]
    epoch: int


class BucketBatchSampler(DistributedSampler):
    """Batches of one bucket each, shuffled from ``(seed, epoch)``, sharded across ranks.

    Used as a DataLoader's ``sampler`` with ``batch_size=None`` (it yields whole batches). It
    subclasses ``DistributedSampler`` (without its constructor) so that Lightning neither replaces
    it under DDP nor forgets ``set_epoch``; the sharding is its own: every rank builds the same
    list of global batches (``batch_size * num_replicas`` images of one bucket) and takes every
    ``num_replicas``-th image of each, so all ranks step through the same buckets in lockstep.
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        repeats: Sequence[int] | None = None,
    ) -> None:
        """Plan the batches.

        Args:
            buckets: Each dataset index's bucket.
            batch_size: Images per batch and rank.
            seed: Seed of the per-epoch shuffles (the run's ``seed``, the same on every rank).
            num_replicas: Data-parallel world size.
            rank: This process's global rank.
            shuffle: Shuffle buckets and images each epoch (off: dataset order).
            repeats: Times each dataset index appears per epoch (its image set's ``repeats``;
                ``None``: once).
        """
        if batch_size < 1:
            raise DatasetError(f"data.batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside the world size {num_replicas}")
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.epoch = 0
        self.drop_last = False
        groups: dict[Bucket, list[int]] = {}
        counts = list(repeats) if repeats is not None else [1] * len(self.buckets)
        if len(counts) != len(self.buckets) or min(counts, default=1) < 1:
            raise ValueError("repeats needs one count >= 1 per dataset index")
        for index, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).extend([index] * counts[index])
        #: Dataset indices per bucket, buckets in a fixed order (by aspect ratio, then width).
        self.groups = dict(sorted(groups.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0])))

    @override
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle :meth:`__iter__` yields (Lightning calls this)."""
        self.epoch = int(epoch)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's images of each step of ``epoch`` together, in step order."""
        rng = random.Random(f"buckets:{self.seed}:{epoch}")
        span = self.batch_size * self.num_replicas
        batches: list[list[int]] = []
        for indices in self.groups.values():
            order = list(indices)
            if self.shuffle:
                rng.shuffle(order)
            for start in range(0, len(order), span):
                batch = order[start : start + span]
                if len(batch) < self.num_replicas:  # pad so that every rank gets one
                    batch += [order[i % len(order)] for i in range(self.num_replicas - len(batch))]
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    @override
    def __iter__(self) -> Iterator[BatchRequest]:
        for batch in self.global_batches(self.epoch):
            yield BatchRequest(tuple(batch[self.rank :: self.num_replicas]), self.epoch)

    @override
    def __len__(self) -> int:
        span = self.batch_size * self.num_replicas
        return sum(-(-len(indices) // span) for indices in self.groups.values())
