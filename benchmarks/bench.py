"""``python -m benchmarks`` (from the repository root): our training step against diffusers' recipe.

Rows: ``baseline`` (the project's implementation of the training step of diffusers'
``train_text_to_image_lora.py``, the default comparison), ``reference`` (the shared
``sd15_lora_reference.py``, a cross-check run only where the file is found:
``$LIGHTNING_LORA_REFERENCE``, else ``../shared/bench`` beside the repository), ``ours`` (timed
steps of a real ``train(cfg)``) and ``job`` (a whole warm-worker job). See
:mod:`benchmarks.runner` for what each times.

The model has SD1.5's architecture (or, with ``--tiny``, the default on a CPU, its layout with few
channels) and random weights, saved once as a diffusers folder and loaded through
:func:`lightning_lora.training.models.load_components` like a real model. MFU is model FLOPs (UNet
forward plus LoRA-training backward, counted on the meta device) times samples/s over the device's
matrix rate (``--peak-tflops``; 790 TFLOP/s, the bf16 rate measured on this project's H200s).

Examples::

    python -m benchmarks                                # CUDA: SD1.5 shapes, b4 and b16
    python -m benchmarks --repeat 3                     # CPU: tiny, b2/b4, gc off/on, pairs
    python -m benchmarks --tiny --batch-sizes 2 --steps 3 --warmup 1 --json bench.json
    python -m benchmarks --case base:4:gc --case ours:4:gc --case ours:4:regional
        --case job:4:regional:images=20:epochs=100 --json bench.json   # (one line)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from benchmarks.cases import PRECISIONS, Case, parse_case
from benchmarks.runner import run
from lightning_lora.training.compilation import COMPILE_MODES

__all__ = ["Case", "build_parser", "main", "parse_case"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time the project's LoRA training step against diffusers' recipe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1] if __doc__ else None,
    )
    p.add_argument("--case", action="append", default=[], help="a case spec (repeatable)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="grid: batch sizes")
    p.add_argument(
        "--grad-ckpt",
        nargs="+",
        choices=["on", "off"],
        help="grid: gradient checkpointing (default: off on CUDA, off and on on CPU)",
    )
    p.add_argument("--compile", nargs="+", default=["none"], choices=COMPILE_MODES)
    p.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        help="precisions of ours (default: bf16-mixed on CUDA, 32-true on CPU)",
    )
    p.add_argument("--no-baseline", action="store_true", help="grid: skip the baseline")
    p.add_argument("--no-reference", action="store_true", help="grid: skip the shared reference")
    p.add_argument("--tiny", action="store_true", help="tiny model shapes (default on CPU)")
    p.add_argument("--full", action="store_true", help="SD1.5 shapes even on CPU")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    p.add_argument("--resolution", type=int, help="pixels (default 512, tiny 64)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps per case")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds over all the cases; each row is its case's median run",
    )
    p.add_argument("--audit-steps", type=int, default=5, help="sync-audit steps (CUDA)")
    p.add_argument("--steps-per-epoch", type=int, default=5, help="images = batch * this")
    p.add_argument("--peak-tflops", type=float, help="device matrix rate for MFU")
    p.add_argument("--flops-per-sample", type=float, help="skip the FLOP count, use this")
    p.add_argument("--no-flops", action="store_true", help="no FLOP count (no MFU)")
    p.add_argument("--budget-s", type=float, help="skip cases that would not fit this time")
    p.add_argument(
        "--reuse-compile",
        dest="reset_compile",
        action="store_false",
        help="keep dynamo's caches between compiled cases (default: reset before each)",
    )
    p.add_argument(
        "--compile-cache-dir",
        help="one compile cache folder for all compiled cases (default: a fresh one per case)",
    )
    p.add_argument("--override", action="append", default=[], help="extra Hydra override")
    p.add_argument("--e2e", action="store_true", help="also a job through the queue worker")
    p.add_argument("--e2e-only", action="store_true", help="only the job through the worker")
    p.add_argument("--e2e-epochs", type=int, default=10, help="epochs of the e2e job")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--table", help="write the markdown table here")
    p.add_argument("--workdir", help="scratch folder (kept); default: a temporary one")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--model-dir", help="random-weight model folder (built when missing)")
    p.add_argument("--fail-fast", action="store_true", help="raise on the first failed case")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the tables, write ``--json``; exit status 1 when a case failed."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning.pytorch", "lightning.fabric", "lightning_lora.data.datamodule"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(eval mode|does not have many workers).*")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    doc = run(args)
    print(doc["table"])
    if doc.get("jobs_table"):
        print()
        print(doc["jobs_table"])
    if "e2e" in doc:
        print(f"\ne2e: {json.dumps(doc['e2e'], default=str)}")
    failed = [r for r in doc["results"] if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
