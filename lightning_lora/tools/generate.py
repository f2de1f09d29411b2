"""``lightning-lora-generate``: images from a base model plus one or more trained LoRAs.

A grid with one row per LoRA scale and one column per prompt, at a fixed seed (the same initial
noise for every scale, so rows are directly comparable)::

    lightning-lora-generate --tiny --lora outputs/.../lora --prompt "a house" \
        --prompt "a cat" --lora-scale 0 0.5 1 --steps 10 --resolution 64 --out grid.png

LoRAs are loaded with ``pipe.load_lora_weights`` (diffusers folder or file, kohya file, or a hub
id; LoHa/LoKr folders and LyCORIS files through PEFT, see
:func:`lightning_lora.training.inference.add_loras`), each under its own adapter name; several
are mixed with ``set_adapters`` weights (``--lora-weight``, one per ``--lora``). A LoRA scale of
0 reproduces the base model's image exactly.

The sampler follows the LoRA's training: its prediction type, zero-terminal-SNR betas and clip
skip come from the first ``--lora``'s metadata (``ss_v_parameterization``,
``ss_zero_terminal_snr``, ``ss_clip_skip``) unless ``--prediction-type``,
``--zero-terminal-snr`` / ``--no-zero-terminal-snr`` or ``--clip-skip`` say otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lightning_lora.lora.export import read_metadata
from lightning_lora.training.inference import (
    LoadedLora,
    add_loras,
    generate,
    load_pipeline,
    lora_file,
    make_grid,
    set_lora_scale,
)
from lightning_lora.training.models import tiny_model_path
from lightning_lora.training.noise import PREDICTION_TYPES

log = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def render_grid(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    loras: Sequence[LoadedLora] = (),
    scales: Sequence[float] = (1.0,),
    resolution: int = 512,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    clip_skip: int = 1,
) -> tuple[Image.Image, list[list[Image.Image]]]:
    """Generate every prompt at every LoRA scale with the same seeds.

    Args:
        pipe: The pipeline (with the LoRAs loaded by :func:`add_loras`).
        prompts: The prompts (grid columns).
        loras: The loaded LoRAs (none: the base model, scales are ignored).
        scales: LoRA scales (grid rows).
        resolution: Image side in pixels (a multiple of 8).
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale.
        seed: Seed of the initial noise (prompt ``i`` uses ``seed + i``, identical for all rows).
        clip_skip: The text encoder layer of the conditioning (kohya's count; 1 = the last).

    Returns:
        The grid and the images, ``images[row][column]``.
    """
    rows = []
    for scale in scales if loras else [0.0]:
        set_lora_scale(pipe, loras, scale)
        rows.append(
            generate(pipe, prompts, resolution, steps, guidance_scale, seed, clip_skip=clip_skip)
        )
    set_lora_scale(pipe, loras, 1.0)
    grid = make_grid([img for row in rows for img in row], cols=len(prompts))
    return grid, rows


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lightning-lora-generate",
        description="Generate a grid (rows: LoRA scales, columns: prompts) at a fixed seed.",
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--model", default=None, help=f"base model hub id or folder (default {DEFAULT_MODEL})"
    )
    model.add_argument(
        "--tiny", action="store_true", help="the tiny test model (CPU, built on first use)"
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH",
        help="LoRA folder, .safetensors file (diffusers or kohya) or hub id; repeatable",
    )
    parser.add_argument(
        "--lora-weight",
        action="append",
        type=float,
        default=[],
        metavar="W",
        help="adapter weight of the matching --lora (default 1.0 each)",
    )
    parser.add_argument(
        "--prompt", action="append", default=[], required=True, help="a prompt; repeatable"
    )
    parser.add_argument(
        "--lora-scale",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="S",
        help="one grid row per scale (0 = the base model exactly); default 1",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument("--resolution", type=int, default=512, help="image side (default 512)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        default=None,
        help="the model's target (default: the LoRA's ss_v_parameterization, else the model's)",
    )
    parser.add_argument(
        "--zero-terminal-snr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="zero-terminal-SNR betas, trailing timesteps (default: the LoRA's metadata)",
    )
    parser.add_argument(
        "--clip-skip",
        type=int,
        default=None,
        help="text encoder layer, 1 = last, 2 = penultimate (default: the LoRA's ss_clip_skip)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--out", type=Path, default=Path("grid.png"), help="the grid PNG")
    args = parser.parse_args(argv)
    if args.lora_weight and len(args.lora_weight) != len(args.lora):
        parser.error(f"{len(args.lora)} --lora but {len(args.lora_weight)} --lora-weight")
    if args.resolution % 8:
        parser.error("--resolution must be a multiple of 8")
    return args


def sampling_options(
    loras: Sequence[str | Path],
    prediction_type: str | None = None,
    zero_terminal_snr: bool | None = None,
    clip_skip: int | None = None,
) -> tuple[str | None, bool, int]:
    """The sampler's options: those given, else the first LoRA file's metadata, else defaults.

    Args:
        loras: The ``--lora`` sources (a hub id has no metadata here).
        prediction_type: ``--prediction-type``.
        zero_terminal_snr: ``--zero-terminal-snr`` / ``--no-zero-terminal-snr``.
        clip_skip: ``--clip-skip``.

    Returns:
        ``(prediction_type or None = the model's, zero_terminal_snr, clip_skip)``.
    """
    meta: dict[str, str] = {}
    path = lora_file(loras[0]) if loras else None
    if path is not None:
        meta = read_metadata(path)
    if prediction_type is None and "ss_v_parameterization" in meta:
        prediction_type = "v_prediction" if meta["ss_v_parameterization"] == "True" else None
    if zero_terminal_snr is None:
        zero_terminal_snr = meta.get("ss_zero_terminal_snr") == "True"
    if clip_skip is None:
        stored = meta.get("ss_clip_skip", "")
        clip_skip = int(stored) if stored.isdigit() else 1
    return prediction_type, zero_terminal_snr, clip_skip


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-lora-generate``: write a grid of prompts x LoRA scales."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    model = tiny_model_path() if args.tiny else (args.model or DEFAULT_MODEL)

    prediction_type, zero_terminal_snr, clip_skip = sampling_options(
        args.lora, args.prediction_type, args.zero_terminal_snr, args.clip_skip
    )
    pipe = load_pipeline(
        model,
        device=device,
        dtype=dtype,
        prediction_type=prediction_type,
        zero_terminal_snr=zero_terminal_snr,
    )
    loras = add_loras(pipe, args.lora, args.lora_weight or None)
    scales = args.lora_scale if loras else [0.0]
    grid, _ = render_grid(
        pipe,
        args.prompt,
        loras,
        scales,
        resolution=args.resolution,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        clip_skip=clip_skip,
    )
    settings = {
        "model": str(model),
        "loras": [{"source": lo.source, "weight": lo.weight} for lo in loras],
        "prompts": args.prompt,
        "rows_lora_scale": scales,
        "seed": args.seed,
        "steps": args.steps,
        "resolution": args.resolution,
        "guidance_scale": args.guidance_scale,
        "prediction_type": pipe.scheduler.config["prediction_type"],
        "zero_terminal_snr": zero_terminal_snr,
        "clip_skip": clip_skip,
    }
    info = PngInfo()
    info.add_text("parameters", json.dumps(settings))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, pnginfo=info)
    print(f"grid ({len(scales)} scale(s) x {len(args.prompt)} prompt(s)): {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
