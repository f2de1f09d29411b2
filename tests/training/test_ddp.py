"""DDP with 2 CPU processes on the tiny model, through the ``lightning-lora-train`` console script.

Lightning's subprocess launcher re-runs the command for rank 1 (under Hydra, into the same run
folder). :class:`LoraHashCallback`, added from the command line as an extra callback, writes a
SHA-256 of each rank's LoRA weights at the start and at the end of training; the test checks that
both ranks end with identical, trained weights, that the latent cache and the validation loss work
under DDP, and that only rank 0 writes outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from tests.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast

REPO_ROOT = Path(__file__).resolve().parents[2]


def lora_sha256(pl_module: L.LightningModule) -> str:
    """SHA-256 over the names and fp32 bytes of the trainable (LoRA) parameters."""
    digest = hashlib.sha256()
    for name, param in sorted(pl_module.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class LoraHashCallback(L.Callback):
    """Writes ``lora_rank{N}.json``: this rank's LoRA hash at train start and end, and its steps."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.start: str | None = None
        self.batches: list[int] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = lora_sha256(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(int(batch["latent_params"].shape[0]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "is_global_zero": trainer.is_global_zero,
            "start": self.start,
            "end": lora_sha256(pl_module),
            "steps": trainer.global_step,
            "batch_sizes": self.batches,
            "cached": pl_module.trainer.datamodule.cache is not None,
        }
        path = self.out_dir / f"lora_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record), encoding="utf-8")


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree_and_only_rank_zero_writes(
    tmp_path: Path, ll_cache: Path, demo_images: Path, tiny_model: str
) -> None:
    run_dir, hashes = tmp_path / "run", tmp_path / "hashes"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("trainer=")]
    command = [
        str(Path(sys.executable).with_name("lightning-lora-train")),
        *overrides,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_epochs=2",
        f"data.image_dir={demo_images}",
        "validation.prompts=[a cat]",
        "validation.num_inference_steps=2",
        f"hydra.run.dir={run_dir}",
        "+callbacks.lora_hash._target_=tests.training.test_ddp.LoraHashCallback",
        f"+callbacks.lora_hash.out_dir={hashes}",
    ]
    env = {
        **os.environ,
        "LIGHTNING_LORA_CACHE": str(ll_cache),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    ranks = [json.loads((hashes / f"lora_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["cached"] for r in ranks)
    assert [r["is_global_zero"] for r in ranks] == [True, False]
    # 8 images, 4 per batch, 2 ranks: one batch of 4 per rank and epoch
    assert all(r["steps"] == 2 and r["batch_sizes"] == [4, 4] for r in ranks)
    assert ranks[0]["start"] == ranks[1]["start"]  # same initial LoRA
    assert ranks[0]["end"] == ranks[1]["end"]  # identical after all-reduced updates
    assert ranks[0]["end"] != ranks[0]["start"]  # and it trained

    # only rank 0 writes: one LoRA folder, one summary, one sample grid folder, one CSV log
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("summary.json")] == [
        Path("run/summary.json")
    ]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("lora") if p.is_dir()] == [
        Path("run/lora")
    ]
    assert len(list(tmp_path.rglob("metrics.csv"))) == 1
    grids = list((run_dir / "samples").glob("*.png"))
    assert len(grids) == 2  # epochs 1 and 2, rank 0 only
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["steps"] == 2
    assert "val/loss" in summary["metrics"]  # validation under DDP (averaged over the ranks)
    assert Path(summary["lora"]).exists()
