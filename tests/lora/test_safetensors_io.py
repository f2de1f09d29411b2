"""Byte-reproducible LoRA files: sorted safetensors headers, same sha256 across processes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_lora.lora.safetensors_io import add_metadata, save_file
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[2]


def _header(path: Path) -> tuple[bytes, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + length], json.loads(raw[8 : 8 + length])


def test_header_keys_are_sorted_and_content_is_unchanged(tmp_path: Path) -> None:
    tensors = {"b.weight": torch.arange(6.0).view(2, 3), "a.bias": torch.ones(3, dtype=torch.half)}
    meta = {f"key_{i}": str(i) for i in (9, 3, 7, 1, 5)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata=meta)
    raw_header, header = _header(path)
    assert len(raw_header) % 8 == 0 and raw_header.rstrip(b" ").endswith(b"}")
    assert list(header["__metadata__"]) == sorted(meta)
    assert list(header) == sorted(header)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
    # metadata added later keeps the old entries and the order; the same content -> same bytes
    add_metadata(path, {"key_0": "zero"})
    other = tmp_path / "y.safetensors"
    save_file(dict(reversed(tensors.items())), other, metadata={"key_0": "zero", **meta})
    assert path.read_bytes() == other.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {**meta, "key_0": "zero"}


def _train_in_subprocess(
    run_dir: Path, hash_seed: str, ll_cache: Path, demo_images: Path, threads: int = 2
) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),  # the guarantee's condition: the same thread count
        "PYTHONPATH": str(REPO),  # this checkout's code, also in the child
        "PYTHONHASHSEED": hash_seed,  # a different hash order in each process
        "LIGHTNING_LORA_CACHE": str(ll_cache),
        "HYDRA_FULL_ERROR": "1",
    }
    args = [
        *TINY_OVERRIDES,
        f"data.image_dir={demo_images}",
        "trainer.max_epochs=1",
        "callbacks=none",
        "seed=3",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_lora.tools.train", *args],
        cwd=run_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # two trainings in fresh processes
def test_two_runs_in_separate_processes_give_byte_identical_files(
    tmp_path: Path, ll_cache: Path, demo_images: Path
) -> None:
    runs = [tmp_path / "a", tmp_path / "b"]
    for run, seed in zip(runs, ("1", "2"), strict=True):
        _train_in_subprocess(run, seed, ll_cache, demo_images)
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        a, b = (run / "lora" / name for run in runs)
        header = _header(a)[1]
        assert len(header["__metadata__"]) > 10  # the run's metadata is in the header
        assert list(header["__metadata__"]) == sorted(header["__metadata__"])
        digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
        assert digests[0] == digests[1], name
    # the conditions of the guarantee are recorded with each run
    infos = [json.loads((run / "run_info.json").read_text()) for run in runs]
    assert infos[0]["compute"] == infos[1]["compute"]
    assert infos[0]["compute"]["torch_threads"] == 2
