"""Caption tooling: ``metadata.jsonl`` sidecars, a trigger word, tag shuffling and tag dropout.

Captions come from, in this order: the image's ``<stem><caption_ext>`` file, the folder's
``metadata.jsonl`` (the datasets ImageFolder convention: one ``{"file_name": ..., "text": ...}``
object a line), or ``data.caption_template``. Then ``trigger`` is prepended as its own first tag.

Tags are the comma-separated parts of a caption (booru / WD14 style). With ``shuffle_tags`` or
``tag_dropout`` each epoch sees another variant: the first ``keep_tokens`` tags (after the
trigger, which always stays first) keep their place and are never dropped; the rest are dropped
with probability ``tag_dropout`` and shuffled. A variant depends only on ``(seed, epoch, image)``
(:func:`caption_variant`), so runs, ranks, dataloader workers and resumes agree.

Varying captions and the text-embedding cache: the cache would need one embedding per variant,
and variants are combinatorial (with 20 tags, 20! orders), so caching "each variant" means
encoding ``epochs x images`` captions up front and keeping them all. Varying captions are
encoded per step instead (the batch carries the caption strings, the module runs the frozen text
encoder on them); the image latents stay cached. ``benchmarks/caption_variants.py`` measures both
(see docs/PERFORMANCE.md).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_lora.errors import DatasetError

#: The sidecar file of the datasets ImageFolder convention.
METADATA_FILE = "metadata.jsonl"
#: How tags are separated in a caption, and joined again.
TAG_SEPARATOR = ","


@dataclass(frozen=True)
class CaptionSettings:
    """``data.caption``: caption files and per-epoch caption variants.

    Attributes:
        caption_ext: Extension of same-stem caption files.
        trigger: Prepended to every caption as its first tag (empty: nothing).
        shuffle_tags: Shuffle the comma-separated tags every epoch.
        keep_tokens: The first N tags (after the trigger) are never shuffled or dropped.
        tag_dropout: Probability of dropping each of the other tags, every epoch.
    """

    caption_ext: str = ".txt"
    trigger: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.tag_dropout < 1.0:
            raise DatasetError(
                f"data.caption.tag_dropout must be in [0, 1), got {self.tag_dropout}"
            )
        if self.keep_tokens < 0:
            raise DatasetError(f"data.caption.keep_tokens must be >= 0, got {self.keep_tokens}")
        if not self.caption_ext.startswith("."):
            raise DatasetError(
                f"data.caption.caption_ext must start with a dot, got {self.caption_ext!r}"
            )

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | CaptionSettings | None) -> CaptionSettings:
        """Build from a config mapping (``None``: the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, CaptionSettings):
            return value
        return cls(**{str(k): v for k, v in dict(value).items()})

    @property
    def varies(self) -> bool:
        """Whether captions change from epoch to epoch (then they are encoded per step)."""
        return self.shuffle_tags or self.tag_dropout > 0


def read_metadata_jsonl(folder: str | Path) -> dict[str, str]:
    """Read a folder's ``metadata.jsonl``: file name -> caption (empty when there is none).

    Raises:
        DatasetError: Naming the line that is not a JSON object with string ``file_name`` and
            ``text``.
    """
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return {}
    captions: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is unreadable: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {number} is not JSON: {exc}") from exc
        if not (
            isinstance(record, dict)
            and isinstance(record.get("file_name"), str)
            and isinstance(record.get("text"), str)
        ):
            raise DatasetError(
                f"{path} line {number}: expected an object with string 'file_name' and 'text'"
            )
        captions[Path(record["file_name"]).name] = record["text"].strip()
    return captions


def split_tags(caption: str) -> list[str]:
    """The non-empty, stripped comma-separated tags of a caption."""
    return [tag.strip() for tag in caption.split(TAG_SEPARATOR) if tag.strip()]


def with_trigger(caption: str, trigger: str) -> str:
    """Prepend ``trigger`` as the first tag (unless the caption already starts with it)."""
    trigger = trigger.strip()
    if not trigger:
        return caption
    tags = split_tags(caption)
    if tags and tags[0] == trigger:
        return caption
    return f"{trigger}{TAG_SEPARATOR} {caption}" if caption else trigger


def caption_variant(
    caption: str, settings: CaptionSettings, seed: int, epoch: int, index: int
) -> str:
    """The caption image ``index`` is trained with in ``epoch`` (deterministic).

    Args:
        caption: The image's caption, trigger included (:func:`with_trigger`).
        settings: The caption settings.
        seed: The run's seed.
        epoch: The epoch.
        index: The image's dataset index.

    Returns:
        The caption itself when captions do not vary; otherwise the kept tags followed by the
        others, dropped and shuffled by a random source seeded from ``(seed, epoch, index)``.
    """
    if not settings.varies:
        return caption
    tags = split_tags(caption)
    fixed = 1 if settings.trigger.strip() and tags[:1] == [settings.trigger.strip()] else 0
    fixed += settings.keep_tokens
    kept, rest = tags[:fixed], tags[fixed:]
    rng = random.Random(f"caption:{seed}:{epoch}:{index}")
    if settings.tag_dropout > 0:
        rest = [tag for tag in rest if rng.random() >= settings.tag_dropout]
    if settings.shuffle_tags:
        rng.shuffle(rest)
    return f"{TAG_SEPARATOR} ".join(kept + rest)
