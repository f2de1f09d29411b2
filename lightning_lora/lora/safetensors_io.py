"""Byte-reproducible safetensors files: the header written with sorted keys.

``safetensors`` keeps the metadata in a Rust ``HashMap``, so the order of the ``__metadata__``
entries in the JSON header (and with it the file's bytes, its sha256 and its S3 ETag) changes from
one process to the next even when tensors and metadata are identical. The library has no option to
sort them, so :func:`save_file` writes the file with ``safetensors`` and then rewrites only its
header: the same JSON with every object's keys sorted, padded to the same 8-byte alignment. The
tensor bytes are copied unchanged (their offsets are relative to the end of the header).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file as _save_file

#: safetensors aligns the start of the tensor data to this many bytes (the header is space-padded).
_ALIGNMENT = 8


def canonical_header(header: dict) -> bytes:
    """The header JSON with sorted keys, compact, space-padded to the 8-byte alignment.

    Args:
        header: The parsed safetensors header (tensor entries and ``__metadata__``).

    Returns:
        The header bytes (without the 8-byte length prefix).
    """
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    data = raw.encode("utf-8")
    return data + b" " * (-len(data) % _ALIGNMENT)


def canonicalize(path: str | Path) -> None:
    """Rewrite a safetensors file's header with sorted keys, in place (atomically).

    Args:
        path: The file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        body = f.read()
    new_header = canonical_header(header)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(new_header)))
        f.write(new_header)
        f.write(body)
    os.replace(tmp, path)


def save_file(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` with a deterministic (sorted) header.

    Args:
        tensors: Contiguous tensors by name.
        path: The file to write.
        metadata: String metadata.
    """
    _save_file(tensors, str(path), metadata=metadata)
    canonicalize(path)


def add_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Rewrite a safetensors file with extra metadata, keeping what it already has.

    Args:
        path: The file.
        metadata: Entries to add (they win over existing ones of the same name).
    """
    with safe_open(str(path), framework="pt") as f:
        existing = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    save_file(tensors, path, metadata={**existing, **metadata})
