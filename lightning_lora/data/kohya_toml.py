"""Import a kohya sd-scripts dataset config (``--dataset_config`` TOML) as ``data.datasets``.

kohya's file has ``[general]``, ``[[datasets]]`` and ``[[datasets.subsets]]`` scopes; a subset's
option overrides its dataset's, which overrides the general one. Each subset becomes one image set
(:class:`~lightning_lora.data.sources.ImageSet`):

=========================== ==========================================
kohya                       ``data.datasets`` entry
=========================== ==========================================
``image_dir``               ``image_dir``
``num_repeats``             ``repeats``
``is_reg``                  ``regularization``
``class_tokens``            ``caption_template`` (uncaptioned images)
``caption_extension``       ``caption.caption_ext``
``shuffle_caption``         ``caption.shuffle_tags``
``keep_tokens``             ``caption.keep_tokens``
``caption_tag_dropout_rate`` ``caption.tag_dropout``
=========================== ==========================================

Per-dataset ``resolution``, ``batch_size`` and bucket options have no per-set equivalent here
(``data.resolution``, ``data.batch_size`` and ``data.bucketing`` hold for all sets): they and any
other option are reported in the log and not applied. Subsets without ``image_dir`` (kohya's
fine-tuning ``metadata_file`` subsets) are refused.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any

from lightning_lora.errors import DatasetError

log = logging.getLogger(__name__)

#: kohya option -> (key of the set entry, key inside its ``caption``, or ``None``)
_OPTIONS: dict[str, tuple[str, str | None]] = {
    "image_dir": ("image_dir", None),
    "num_repeats": ("repeats", None),
    "is_reg": ("regularization", None),
    "class_tokens": ("caption_template", None),
    "caption_extension": ("caption", "caption_ext"),
    "shuffle_caption": ("caption", "shuffle_tags"),
    "keep_tokens": ("caption", "keep_tokens"),
    "caption_tag_dropout_rate": ("caption", "tag_dropout"),
}


def kohya_datasets(path: str | Path) -> list[dict[str, Any]]:
    """The ``data.datasets`` entries of a kohya dataset config file.

    Args:
        path: The TOML file.

    Returns:
        One entry per subset, in file order.

    Raises:
        DatasetError: The file is unreadable, not TOML, has no subsets, or a subset has no
            ``image_dir``.
    """
    try:
        config = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DatasetError(f"kohya dataset config {path} is unreadable: {exc}") from exc
    general = dict(config.get("general", {}))
    entries: list[dict[str, Any]] = []
    ignored: set[str] = set()
    for dataset in config.get("datasets", []):
        scope = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        for subset in dataset.get("subsets", []):
            options = {**scope, **subset}
            if not options.get("image_dir"):
                raise DatasetError(
                    f"kohya dataset config {path}: a subset without image_dir (metadata_file "
                    "subsets are not supported)"
                )
            entry: dict[str, Any] = {}
            for name, value in options.items():
                if name not in _OPTIONS:
                    ignored.add(name)
                    continue
                key, inner = _OPTIONS[name]
                if inner is None:
                    entry[key] = value
                else:
                    entry.setdefault(key, {})[inner] = value
            if "caption_template" in entry:  # a literal caption, not a template
                template = str(entry["caption_template"])
                entry["caption_template"] = template.replace("{", "{{").replace("}", "}}")
            entries.append(entry)
    if not entries:
        raise DatasetError(f"kohya dataset config {path} has no [[datasets.subsets]]")
    if ignored:
        log.warning(
            "kohya dataset config %s: not applied (no per-set equivalent): %s",
            path,
            ", ".join(sorted(ignored)),
        )
    return entries
