"""``lightning-lora-tools``: resize, merge, bake and extract kohya-format LoRA files.

Four subcommands on kohya LoRA/LoCon safetensors files (``lora_kohya.safetensors`` from a
training run, or files from A1111/ComfyUI/kohya's sd-scripts; ``bake`` also takes LyCORIS
LoHa/LoKr files)::

    lightning-lora-tools resize lora.safetensors small.safetensors --rank 4
    lightning-lora-tools resize lora.safetensors small.safetensors --keep-share 0.9
    lightning-lora-tools merge merged.safetensors a.safetensors:0.7 b.safetensors:0.5 [--rank 16]
    lightning-lora-tools bake lora.safetensors --base MODEL --out baked/ [--scale 0.8]
    lightning-lora-tools extract --base MODEL --tuned TUNED --out lora.safetensors --rank 8

resize, merge and extract print a table: per module its rank (old -> new) and the share of its
delta's spectrum (Frobenius energy) that was kept. The math is in
:mod:`lightning_lora.lora.surgery`; this module reads and writes files and loads models.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_lora.lora import surgery
from lightning_lora.lora.safetensors_io import save_file
from lightning_lora.lora.surgery import ModuleReport
from lightning_lora.training.models import tiny_model_path
from lightning_lora.version import __version__

log = logging.getLogger(__name__)

PROG = "lightning-lora-tools"
#: The module types a LoRA targets.
LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


def load_lora(
    path: str | Path, lycoris: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a kohya LoRA file: its tensors and string metadata.

    Args:
        path: The ``.safetensors`` file.
        lycoris: Accept LyCORIS LoHa/LoKr modules too (``bake`` applies them).

    Returns:
        ``(tensors, metadata)``.

    Raises:
        UnsupportedLoraError: Keys that are not kohya LoRA/LoCon (naming the key).
    """
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    surgery.check_supported(state, lycoris=lycoris)
    return state, metadata


def _save(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, metadata=metadata)


def resize_file(
    src: str | Path, dst: str | Path, rank: int | None = None, keep_share: float | None = None
) -> list[ModuleReport]:
    """Resize a kohya LoRA file (see :func:`lightning_lora.lora.surgery.resize`).

    Args:
        src: The input file.
        dst: The output file.
        rank: The new rank (modules of a lower rank keep theirs).
        keep_share: Or the least rank per module keeping this share of its spectrum.

    Returns:
        One report per module.
    """
    state, metadata = load_lora(src)
    out, reports = surgery.resize(state, rank=rank, keep_share=keep_share)
    action: dict[str, object] = {"tool": "resize", "source": Path(src).name}
    action.update({"rank": rank} if rank is not None else {"keep_share": keep_share})
    _save(out, dst, surgery.updated_metadata(metadata, reports, action))
    return reports


def parse_weighted(spec: str) -> tuple[Path, float]:
    """``PATH:WEIGHT`` (or just ``PATH``, weight 1) -> ``(path, weight)``."""
    path, sep, weight = spec.rpartition(":")
    if sep:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(spec), 1.0


def merge_files(
    dst: str | Path, inputs: Sequence[tuple[str | Path, float]], rank: int | None = None
) -> list[ModuleReport]:
    """Merge weighted kohya LoRA files (see :func:`lightning_lora.lora.surgery.merge`).

    Args:
        dst: The output file (metadata from the first input, updated).
        inputs: ``(file, weight)`` pairs.
        rank: ``None``: exact (ranks concatenated); else the SVD rank of the weighted sum.

    Returns:
        One report per module.
    """
    loaded = [(load_lora(path), weight) for path, weight in inputs]
    out, reports = surgery.merge([(state, w) for (state, _), w in loaded], rank=rank)
    action: dict[str, object] = {
        "tool": "merge",
        "inputs": [[Path(p).name, w] for p, w in inputs],
        "rank": rank if rank is not None else "concatenated",
    }
    _save(out, dst, surgery.updated_metadata(loaded[0][0][1], reports, action))
    return reports


def _source(model: str | None, tiny: bool) -> str:
    if tiny:
        return tiny_model_path()
    if not model:
        raise ValueError("give the base model (a diffusers folder or hub id) or --tiny")
    return model


def unet_stems(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Kohya stem -> Linear/Conv2d module of a diffusers UNet (``lora_unet_<name>``)."""
    return {
        surgery.stem_of(name, "lora_unet_"): m
        for name, m in unet.named_modules()
        if isinstance(m, LAYERS)
    }


def text_encoder_stems(text_encoder: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Kohya stem -> Linear module of a CLIP text encoder (``lora_te_text_model_<...>``).

    transformers 5 names CLIP's modules without the ``text_model.`` level that the SD1.5
    checkpoint (and so kohya files) use: both namings map, and so does the bare name.
    """
    stems: dict[str, torch.nn.Module] = {}
    for name, m in text_encoder.named_modules():
        if isinstance(m, LAYERS):
            full = name if name.startswith("text_model.") else f"text_model.{name}"
            stems[surgery.stem_of(name, "lora_te_")] = m
            stems[surgery.stem_of(full, "lora_te_")] = m
    return stems


def bake(
    lora: str | Path,
    base: str,
    out: str | Path,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Add a LoRA's deltas to a base model's weights and save the pipeline as a diffusers folder.

    Args:
        lora: The kohya LoRA file (``lora_unet_`` and optionally ``lora_te_`` keys).
        base: The base pipeline: a diffusers folder or hub id.
        out: The output folder (``StableDiffusionPipeline.from_pretrained`` loads it).
        scale: The LoRA's strength.
        dtype: The weights' dtype (the deltas are added in float64 and cast).

    Returns:
        The stems baked in.

    Raises:
        UnsupportedLoraError: A key naming no module (or another prefix), or a shape mismatch.
    """
    state, _ = load_lora(lora, lycoris=True)
    by_prefix: dict[str, dict[str, torch.Tensor]] = {"lora_unet_": {}, "lora_te_": {}}
    for key, tensor in state.items():
        prefix = next((p for p in by_prefix if key.startswith(p)), None)
        if prefix is None:
            raise surgery.UnsupportedLoraError(
                f"{key!r}: neither a UNet (lora_unet_) nor an SD1.5 text encoder (lora_te_) key"
            )
        by_prefix[prefix][key] = tensor
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=dtype)
    baked = surgery.add_to_weights(unet_stems(pipe.unet), by_prefix["lora_unet_"], scale)
    if by_prefix["lora_te_"]:
        stems = text_encoder_stems(pipe.text_encoder)
        baked += surgery.add_to_weights(stems, by_prefix["lora_te_"], scale)
    Path(out).mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out))
    return baked


def load_unet(source: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A UNet from a pipeline folder or hub id (its ``unet``), or a UNet folder itself."""
    path = Path(source)
    if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return UNet2DConditionModel.from_pretrained(source, torch_dtype=dtype)
    return UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)


def module_weights(unet: torch.nn.Module, all_modules: bool = False) -> dict[str, torch.Tensor]:
    """Module name -> weight of the UNet's Linear/Conv2d modules in attention blocks and resnets.

    Args:
        unet: The UNet.
        all_modules: Every Linear/Conv2d (also conv_in/out, time embedding, down/upsamplers).
    """
    return {
        name: m.weight.detach()
        for name, m in unet.named_modules()
        if isinstance(m, LAYERS) and (all_modules or _in_blocks(name))
    }


def _in_blocks(name: str) -> bool:
    return ".attentions." in name or ".resnets." in name


def extract_file(
    base: str,
    tuned: str,
    out: str | Path,
    rank: int,
    conv_rank: int | None = None,
    min_diff: float = 1e-6,
    all_modules: bool = False,
) -> list[ModuleReport]:
    """Extract a kohya LoRA from the difference of two UNets.

    Args:
        base: The base model (pipeline folder, UNet folder or hub id).
        tuned: The tuned model (same forms).
        out: The LoRA file to write.
        rank: The rank of Linear and 1x1 Conv2d modules.
        conv_rank: The rank of 3x3 Conv2d modules (default ``rank``).
        min_diff: Modules whose weights differ by at most this (max abs) are left out.
        all_modules: Also modules outside the attention blocks and resnets.

    Returns:
        One report per extracted module.
    """
    a = module_weights(load_unet(base), all_modules)
    b = module_weights(load_unet(tuned), all_modules)
    state, reports = surgery.extract(a, b, rank, conv_rank, min_diff)
    if not reports:
        raise ValueError(f"no module differs by more than {min_diff} between {base} and {tuned}")
    conv = conv_rank or rank
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": surgery.network_alpha(reports),
        "ss_network_args": json.dumps({"conv_dim": str(conv), "conv_alpha": str(conv)}),
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": str(base),
        "ss_training_comment": f"{PROG} extract from {tuned} minus {base}",
        surgery.TOOL_KEY: json.dumps(
            {
                "tool": "extract",
                "base": str(base),
                "tuned": str(tuned),
                "rank": rank,
                "conv_rank": conv,
                "min_diff": min_diff,
                "version": __version__,
            },
            sort_keys=True,
        ),
    }
    _save(state, out, metadata)
    return reports


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _add_base(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--base", help=f"{what}: a diffusers pipeline folder or hub id")
    group.add_argument("--tiny", action="store_true", help="the tiny test model as the base")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Resize, merge, bake and extract kohya-format LoRA files."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    resize = sub.add_parser(
        "resize",
        help="change a LoRA's rank by SVD of each module's delta",
        description="Resize each module by SVD of its full delta. Prints "
        "per module the rank (old->new) and the share of the spectrum kept.",
    )
    resize.add_argument("input", type=Path, metavar="IN", help="kohya LoRA file")
    resize.add_argument("output", type=Path, metavar="OUT", help="the resized file")
    how = resize.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--rank", type=_positive_int, help="the new rank (lower-rank modules keep theirs)"
    )
    how.add_argument(
        "--keep-share",
        type=_share,
        metavar="S",
        help="per module the least rank keeping this share of the squared singular values",
    )

    merge = sub.add_parser(
        "merge",
        help="combine weighted LoRAs into one",
        description="Merge LoRAs: exactly (ranks concatenated, alpha = total rank) or, with "
        "--rank, by SVD of the weighted sum of deltas. Modules in only some inputs are kept.",
    )
    merge.add_argument("output", type=Path, metavar="OUT", help="the merged file")
    merge.add_argument(
        "inputs", nargs="+", metavar="IN:W", help="kohya LoRA file and its weight (default 1)"
    )
    merge.add_argument("--rank", type=_positive_int, help="SVD merge to this rank")

    bake_p = sub.add_parser(
        "bake",
        help="add a LoRA to a base model's weights, save a diffusers pipeline folder",
        description="Bake a kohya LoRA/LoCon or LyCORIS LoHa/LoKr into the base model's UNet "
        "(and text encoder for lora_te_ keys) and save the pipeline with save_pretrained.",
    )
    bake_p.add_argument("lora", type=Path, metavar="LORA", help="kohya LoRA file")
    _add_base(bake_p, "the base model")
    bake_p.add_argument("--out", type=Path, required=True, help="the output folder")
    bake_p.add_argument("--scale", type=float, default=1.0, help="LoRA strength (default 1)")
    bake_p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")

    extract = sub.add_parser(
        "extract",
        help="a LoRA from the difference of two UNets",
        description="Extract a LoRA from the weight differences of a tuned and a "
        "base UNet, per Linear/Conv2d of the attention blocks and resnets, by truncated SVD.",
    )
    _add_base(extract, "the base model")
    extract.add_argument(
        "--tuned", required=True, help="the tuned model: pipeline folder, UNet folder or hub id"
    )
    extract.add_argument("--out", type=Path, required=True, help="the LoRA file to write")
    extract.add_argument("--rank", type=_positive_int, required=True, help="Linear/1x1 rank")
    extract.add_argument("--conv-rank", type=_positive_int, help="3x3 Conv2d rank (default rank)")
    extract.add_argument(
        "--min-diff",
        type=float,
        default=1e-6,
        help="skip modules whose weights differ by at most this, max abs (default 1e-6)",
    )
    extract.add_argument(
        "--all-modules",
        action="store_true",
        help="also conv_in/conv_out, time embedding, down/upsamplers (not all loaders map them)",
    )
    return parser


def _run(args: argparse.Namespace) -> Iterator[str]:
    if args.command == "resize":
        reports = resize_file(args.input, args.output, args.rank, args.keep_share)
    elif args.command == "merge":
        inputs = [parse_weighted(spec) for spec in args.inputs]
        reports = merge_files(args.output, inputs, args.rank)
    elif args.command == "bake":
        base = _source(args.base, args.tiny)
        stems = bake(args.lora, base, args.out, args.scale, getattr(torch, args.dtype))
        yield f"baked {len(stems)} modules at scale {args.scale} into {args.out}"
        return
    else:
        base = _source(args.base, args.tiny)
        reports = extract_file(
            base,
            args.tuned,
            args.out,
            args.rank,
            args.conv_rank,
            args.min_diff,
            args.all_modules,
        )
    yield surgery.format_report(reports)
    yield f"wrote {args.out if args.command == 'extract' else args.output}"


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-lora-tools``: resize, merge, bake or extract; 0 on success, 1 on an error."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        for line in _run(args):
            print(line)
    except (ValueError, OSError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
