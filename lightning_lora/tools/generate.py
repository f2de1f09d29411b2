"""``lightning-lora-generate``: images from a base model plus one or more trained LoRAs.

A grid with one row per LoRA scale and one column per prompt, at a fixed seed (the same initial
noise for every scale, so rows are directly comparable)::

    lightning-lora-generate --tiny --lora outputs/.../lora --prompt "a house" \
        --prompt "a cat" --lora-scale 0 0.5 1 --steps 10 --resolution 64 --out grid.png

LoRAs are loaded with ``pipe.load_lora_weights`` (diffusers folder or file, kohya file, or a hub
id), each under its own adapter name; several are mixed with ``set_adapters`` weights
(``--lora-weight``, one per ``--lora``). A LoRA scale of 0 reproduces the base model's image
exactly.
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

from lightning_lora.training.inference import (
    LoadedLora,
    add_loras,
    generate,
    load_pipeline,
    make_grid,
    set_lora_scale,
)
from lightning_lora.training.models import tiny_model_path

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

    Returns:
        The grid and the images, ``images[row][column]``.
    """
    rows = []
    for scale in scales if loras else [0.0]:
        set_lora_scale(pipe, loras, scale)
        rows.append(generate(pipe, prompts, resolution, steps, guidance_scale, seed))
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
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--out", type=Path, default=Path("grid.png"), help="the grid PNG")
    args = parser.parse_args(argv)
    if args.lora_weight and len(args.lora_weight) != len(args.lora):
        parser.error(f"{len(args.lora)} --lora but {len(args.lora_weight)} --lora-weight")
    if args.resolution % 8:
        parser.error("--resolution must be a multiple of 8")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-lora-generate``: write a grid of prompts x LoRA scales."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    model = tiny_model_path() if args.tiny else (args.model or DEFAULT_MODEL)

    pipe = load_pipeline(model, device=device, dtype=dtype)
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
    }
    info = PngInfo()
    info.add_text("parameters", json.dumps(settings))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, pnginfo=info)
    print(f"grid ({len(scales)} scale(s) x {len(args.prompt)} prompt(s)): {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
