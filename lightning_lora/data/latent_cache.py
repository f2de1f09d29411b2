"""Where encoded latents and text embeddings live: on the device, or in safetensors shards on disk.

Both stores map a dataset index to named tensors (``latent_params``, ``flipped_latent_params``,
``loss_weights``, ``flipped_loss_weights``, ``text_embeds``) and hand out a batch, all of one
bucket, with :meth:`gather`:

* :class:`MemoryLatentStore` (``data.cache.dir`` unset): each bucket's tensors stacked on the
  training device, so a batch is one ``index_select`` per tensor; text embeddings are kept once
  per distinct caption. This is the cache the trainer always had, per bucket shape.
* :class:`DiskLatentCache` (``data.cache.dir`` set): entries in safetensors shards under that
  folder, read through memory maps one batch at a time, so host memory does not grow with the
  dataset. Entries are content-addressed (:func:`entry_key`: the encoder's fingerprint, the
  resolution, the bucket, the image file's SHA-256 and the options that change the tensors), so
  a second run, or another run on an overlapping image set, finds them and skips the encoding.
  Shards are written to a temporary name and renamed (atomic on POSIX): a crashed run leaves no
  half shard, and two runs writing at once only duplicate entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

#: Version of the on-disk layout (part of every key: a new layout never reads an old entry).
CACHE_FORMAT = "lightning_lora.data.latent_cache.v1"
#: Entries per shard file written by :meth:`DiskLatentCache.put_many`.
ENTRIES_PER_SHARD = 1024
_SEP = "/"


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """SHA-256 of a file's contents, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def module_fingerprint(module: torch.nn.Module | None) -> str:
    """Identify a frozen encoder: its class, config, dtype and a digest of its first weights.

    The config alone does not tell two checkpoints of one architecture apart, hence the weights;
    the first and last parameter tensors are enough to tell checkpoints apart, and cheap.
    """
    if module is None:
        return "none"
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        text = config.to_json_string()
    else:
        text = json.dumps(dict(config or {}), sort_keys=True, default=str)
    digest = hashlib.sha256(type(module).__qualname__.encode() + text.encode())
    params = list(module.parameters())
    for param in (params[0], params[-1]) if params else ():
        digest.update(str(param.dtype).encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def entry_key(**parts: Any) -> str:
    """A content address: SHA-256 over the layout version and the given parts (JSON)."""
    payload = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class MemoryLatentStore:
    """Per-bucket stacked tensors on the training device; text embeddings once per caption."""

    def __init__(
        self,
        entries: Mapping[int, Mapping[str, torch.Tensor]],
        text_ids: Sequence[int] | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> None:
        """Stack the entries.

        Args:
            entries: Dataset index -> its tensors (no batch dimension); indices with equal
                shapes are stacked together.
            text_ids: Each dataset index's row in ``text_embeds`` (distinct captions).
            text_embeds: ``(U, L, D)`` embeddings of the distinct captions.
        """
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, tensors in sorted(entries.items()):
            shape = tuple(tensors["latent_params"].shape)
            groups.setdefault(shape, []).append(index)
        #: Shape -> name -> ``(N_shape, ...)`` tensor.
        self.tensors: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}
        #: Dataset index -> (shape, row).
        self.rows: dict[int, tuple[tuple[Any, ...], int]] = {}
        for shape, indices in groups.items():
            names = entries[indices[0]].keys()
            self.tensors[shape] = {n: torch.stack([entries[i][n] for i in indices]) for n in names}
            self.rows.update({index: (shape, row) for row, index in enumerate(indices)})
        self.text_ids = None if text_ids is None else [int(i) for i in text_ids]
        self.text_embeds = text_embeds

    def gather(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The tensors of ``indices`` (all of one bucket) stacked, on the store's device."""
        shapes = {self.rows[i][0] for i in indices}
        if len(shapes) != 1:
            raise ValueError(f"a batch must hold one bucket, got latent shapes {sorted(shapes)}")
        tensors = self.tensors[shapes.pop()]
        device = next(iter(tensors.values())).device
        rows = _index([self.rows[i][1] for i in indices], device)
        out = {name: t.index_select(0, rows) for name, t in tensors.items()}
        if self.text_embeds is not None and self.text_ids is not None:
            ids = _index([self.text_ids[i] for i in indices], self.text_embeds.device)
            out["text_embeds"] = self.text_embeds.index_select(0, ids)
        return out


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    idx = torch.as_tensor(values, dtype=torch.long)
    if device.type == "cuda":
        # A plain host-to-device copy waits for the device's queue (a sync every step); from
        # pinned memory it is asynchronous and the host runs ahead.
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


class DiskLatentCache:
    """Content-addressed tensor entries in safetensors shards under one folder."""

    def __init__(self, folder: str | Path) -> None:
        """Open (or create) the cache folder and index the shards already in it."""
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        #: Entry key -> (shard path, the entry's tensor names).
        self.index: dict[str, tuple[Path, list[str]]] = {}
        self._handles: dict[Path, Any] = {}
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            self._index_shard(shard)

    def _index_shard(self, shard: Path) -> None:
        try:
            with safe_open(str(shard), framework="pt") as f:
                names = list(f.keys())
        except Exception as exc:  # a foreign or damaged file: ignore it, re-encode its entries
            log.warning("latent cache: skipping unreadable shard %s: %s", shard, exc)
            return
        by_key: dict[str, list[str]] = {}
        for name in names:
            key, _, tensor = name.partition(_SEP)
            by_key.setdefault(key, []).append(tensor)
        for key, tensors in by_key.items():
            self.index.setdefault(key, (shard, tensors))

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors of one entry (CPU, read from the shard's memory map)."""
        shard, names = self.index[key]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(shard), framework="pt")
        return {name: handle.get_tensor(f"{key}{_SEP}{name}") for name in names}

    def put_many(self, entries: Iterable[tuple[str, Mapping[str, torch.Tensor]]]) -> int:
        """Write entries into new shards (:data:`ENTRIES_PER_SHARD` each); returns the count."""
        written = 0
        batch: dict[str, torch.Tensor] = {}
        count = 0
        for key, tensors in entries:
            for name, tensor in tensors.items():
                batch[f"{key}{_SEP}{name}"] = tensor.detach().to("cpu").contiguous()
            count += 1
            if count == ENTRIES_PER_SHARD:
                self._write_shard(batch)
                written, batch, count = written + count, {}, 0
        if batch:
            self._write_shard(batch)
            written += count
        return written

    def _write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        shard = self.folder / f"shard-{uuid.uuid4().hex}.safetensors"
        partial = shard.with_suffix(".tmp")
        save_file(tensors, str(partial), metadata={"format": CACHE_FORMAT})
        os.replace(partial, shard)
        self._index_shard(shard)


class DiskLatentStore:
    """A batch view of a :class:`DiskLatentCache`: dataset index -> its entries' keys."""

    def __init__(
        self,
        cache: DiskLatentCache,
        latent_keys: Sequence[str],
        text_keys: Sequence[str] | None,
        device: torch.device,
    ) -> None:
        """Bind dataset indices to cache entries.

        Args:
            cache: The cache holding every key.
            latent_keys: Each dataset index's latent entry.
            text_keys: Each dataset index's text entry (``None``: captions vary, not cached).
            device: Where batches go.
        """
        self.cache = cache
        self.latent_keys = list(latent_keys)
        self.text_keys = None if text_keys is None else list(text_keys)
        self.device = torch.device(device)

    def gather(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Read the entries of ``indices`` and stack them on the device."""
        rows = [self.cache.get(self.latent_keys[i]) for i in indices]
        if self.text_keys is not None:
            for row, i in zip(rows, indices, strict=True):
                row.update(self.cache.get(self.text_keys[i]))
        out: dict[str, torch.Tensor] = {}
        pin = self.device.type == "cuda"
        for name in rows[0]:
            stacked = torch.stack([row[name] for row in rows])
            if pin:
                stacked = stacked.pin_memory()
            out[name] = stacked.to(self.device, non_blocking=pin)
        return out
