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
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lightning_lora.export import DIFFUSERS_WEIGHT_NAME
from lightning_lora.models import load_components, tiny_model_path
from lightning_lora.validation import build_pipeline, generate, make_grid

log = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA loaded into a pipeline.

    Attributes:
        adapter: Its adapter name in the pipeline.
        source: The path or hub id it came from.
        weight: Its ``set_adapters`` weight (multiplied by the LoRA scale when generating).
    """

    adapter: str
    source: str
    weight: float


def _lora_location(source: str | Path) -> tuple[str, str | None]:
    """``(folder_or_hub_id, weight_name)`` for ``load_lora_weights``."""
    path = Path(source)
    if path.is_file():
        return str(path.parent), path.name
    if path.is_dir():
        if (path / DIFFUSERS_WEIGHT_NAME).is_file():
            return str(path), DIFFUSERS_WEIGHT_NAME
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return str(path), files[0].name
        raise ValueError(
            f"{path} holds {len(files)} .safetensors files and no {DIFFUSERS_WEIGHT_NAME}; "
            "pass the file itself"
        )
    return str(source), None  # a hub id


def load_pipeline(
    model: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """Load a base SD1.5 model as an inference pipeline (DPM-Solver++, no safety checker).

    The components are loaded afresh (not shared with training in the same process), so adding
    LoRAs to this pipeline never touches another pipeline's UNet.

    Args:
        model: A hub id or a local diffusers pipeline folder.
        device: Where to run.
        dtype: Weight dtype (``float16`` on a GPU, ``float32`` on CPU).

    Returns:
        The pipeline.
    """
    components = load_components(str(model), torch_dtype=dtype, reuse=False)
    pipe = build_pipeline(components).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_loras(
    pipe: StableDiffusionPipeline,
    sources: Sequence[str | Path],
    weights: Sequence[float] | None = None,
) -> list[LoadedLora]:
    """Load LoRAs into the pipeline as adapters ``lora0``, ``lora1``, ... and activate them all.

    Args:
        pipe: The pipeline.
        sources: LoRA folders, files (diffusers or kohya format) or hub ids.
        weights: One ``set_adapters`` weight per LoRA (default 1.0 each).

    Returns:
        The loaded adapters.

    Raises:
        ValueError: If the number of weights does not match the number of LoRAs.
    """
    weights = list(weights) if weights else [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ValueError(f"{len(sources)} LoRAs but {len(weights)} weights")
    loaded = []
    for i, (source, weight) in enumerate(zip(sources, weights, strict=True)):
        location, weight_name = _lora_location(source)
        adapter = f"lora{i}"
        pipe.load_lora_weights(location, weight_name=weight_name, adapter_name=adapter)
        loaded.append(LoadedLora(adapter, str(source), float(weight)))
        log.info("loaded LoRA %s as %s (weight %s)", source, adapter, weight)
    return loaded


def set_lora_scale(
    pipe: StableDiffusionPipeline, loras: Sequence[LoadedLora], scale: float
) -> None:
    """Set every adapter's strength to ``weight * scale`` (0 turns the LoRAs off exactly)."""
    if loras:
        pipe.set_adapters([lo.adapter for lo in loras], [lo.weight * scale for lo in loras])


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
