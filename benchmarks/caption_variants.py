"""Varying captions with cached latents: encode per step, or cache every variant up front?

Run by hand (tiny model, CPU; add ``--device cuda`` on a GPU)::

    .venv/bin/python benchmarks/caption_variants.py --images 8 --epochs 40 --batch 4

With ``data.caption.shuffle_tags`` / ``tag_dropout`` every image has a new caption each epoch.
Two ways to keep the text-embedding cache's benefit were measured on the tiny model:

* ``per_step``: the batch carries the caption strings and the module runs the frozen text
  encoder on them every step (what the trainer does). Cost: one text-encoder forward a step.
* ``cache_variants``: encode every ``(epoch, image)`` variant before training and index them.
  Cost: ``epochs x images`` encodes up front and ``epochs x images x 77 x D`` floats kept.

It prints JSON: seconds per step for the text encoding and for the UNet forward and backward of
a training step (so the share is visible), the up-front seconds and the bytes of caching every
variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TAGS = "lldemo, 1girl, red hair, smile, outdoors, tree, sky, looking at viewer, long hair, dress"


def measure(images: int, epochs: int, batch: int, resolution: int, device: str) -> dict:
    """Time both options on the tiny model (built on first use) and return the figures."""
    import torch
    from peft import LoraConfig

    from lightning_lora.data.captions import CaptionSettings, caption_variant
    from lightning_lora.training.models import load_components, tiny_model_path
    from lightning_lora.training.module import LoRAModule

    torch.manual_seed(0)
    components = load_components(tiny_model_path())
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    module = LoRAModule(
        components,
        lora,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
        gradient_checkpointing=False,
    ).to(device)
    settings = CaptionSettings(shuffle_tags=True, keep_tokens=1, tag_dropout=0.1)

    def captions(epoch: int, indices: range) -> list[str]:
        return [caption_variant(TAGS, settings, 0, epoch, i) for i in indices]

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    steps = max(1, images // batch) * epochs
    latent = resolution // 8
    params = torch.randn(batch, 8, latent, latent, device=device)
    module.encode_text(captions(0, range(batch)))  # warm-up
    sync()
    start = time.perf_counter()
    for step in range(steps):
        module.encode_text(captions(step, range(batch)))
    sync()
    encode_s = (time.perf_counter() - start) / steps

    embeds = module.encode_text(captions(0, range(batch)))
    module.training_loss({"latent_params": params, "text_embeds": embeds}).backward()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        module.training_loss({"latent_params": params, "text_embeds": embeds}).backward()
    sync()
    unet_s = (time.perf_counter() - start) / steps

    sync()
    start = time.perf_counter()
    cached = [
        module.encode_text(captions(e, range(i, min(images, i + batch))))
        for e in range(epochs)
        for i in range(0, images, batch)
    ]
    sync()
    upfront_s = time.perf_counter() - start
    nbytes = sum(t.numel() * t.element_size() for t in cached)
    return {
        "device": device,
        "images": images,
        "epochs": epochs,
        "batch": batch,
        "steps": steps,
        "per_step_text_encode_s": encode_s,
        "train_step_unet_fwd_bwd_s": unet_s,
        "per_step_share_of_step": encode_s / (encode_s + unet_s),
        "cache_variants_upfront_s": upfront_s,
        "cache_variants_bytes": nbytes,
        "cache_variants_bytes_sd15_fp16": epochs * images * 77 * 768 * 2,
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, measure, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.images, args.epochs, args.batch, args.resolution, args.device)))


if __name__ == "__main__":
    main()
