"""The disk latent cache on a 10k-image set: what a second run saves, and host memory.

Run by hand (tiny model, CPU)::

    .venv/bin/python benchmarks/disk_cache.py --count 10000 --resolution 64 --steps 10

It writes ``--count`` small synthetic PNGs of mixed aspect ratios (bucketed with
``data.bucketing.step=16`` so the tiny model's 64 px resolution has several buckets), then trains
the tiny model for ``--steps`` steps three times, each in a fresh interpreter:

1. ``disk_cold``: ``data.cache.dir`` empty: every image is decoded, encoded and written to shards.
2. ``disk_warm``: the same folder again: every latent is found, nothing is decoded or encoded.
3. ``memory``: no ``data.cache.dir``: the device cache (here the CPU), for comparison: the
   decoded training-size images and every latent stay in memory.

It prints JSON per run: ``cache_s`` (building or finding the cache), ``wall_s`` (the whole
``train()`` call), ``peak_rss_mb`` (the child's peak resident set size) and ``baseline_rss_mb``
(after imports and the model build, before training); with ``--also-count N`` the disk runs are
repeated on an N-image set, so memory growth with the dataset size can be read off.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource, sys, time
import psutil
from lightning_lora.data.datamodule import StyleDataModule
from lightning_lora.training.models import tiny_model_path
from lightning_lora.config import compose_config
from lightning_lora.training.run import train

image_dir, out_dir, cache_dir, steps, resolution = sys.argv[1:6]
tiny_model_path()
timing = {}
original = StyleDataModule.build_cache
def timed(self, *args, **kwargs):
    start = time.perf_counter()
    original(self, *args, **kwargs)
    timing["cache_s"] = time.perf_counter() - start
StyleDataModule.build_cache = timed
overrides = [
    "model=tiny", "trainer=cpu", f"data.resolution={resolution}", "data.batch_size=4",
    "data.bucketing.step=16", f"data.image_dir={image_dir}", f"+trainer.max_steps={steps}",
    "trainer.enable_progress_bar=false", "+trainer.enable_checkpointing=false",
    "module.gradient_checkpointing=false", "validation.prompts=[]", "callbacks=none",
    "logger=csv",
]
if cache_dir != "-":
    overrides.append(f"data.cache.dir={cache_dir}")
cfg = compose_config(overrides, output_dir=out_dir)
baseline = psutil.Process().memory_info().rss
start = time.perf_counter()
result = train(cfg)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({
    "cache_s": timing.get("cache_s"), "wall_s": wall, "peak_rss_mb": peak / 2**20,
    "baseline_rss_mb": baseline / 2**20, "steps": result.metrics["steps"],
    "buckets": len(result.metadata["bucket_info"]),
}))
"""


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """Write ``count`` small PNGs (48-160 px sides, mixed aspect ratios, a few shapes each)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        size = (rng.randint(48, 160), rng.randint(48, 160))
        img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.randrange(size[0]), rng.randrange(size[1])
            draw.ellipse([x - 10, y - 10, x + 10, y + 10], fill=(rng.randrange(256), 40, 90))
        img.save(folder / f"{i:05d}.png")


def run(image_dir: Path, out_dir: Path, cache_dir: Path | None, steps: int, res: int) -> dict:
    """Train in a fresh interpreter and return its figures."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            str(image_dir),
            str(out_dir),
            str(cache_dir or "-"),
            str(steps),
            str(res),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(count: int, resolution: int, steps: int, also: int | None) -> dict:
    """The three runs (and the disk runs on ``also`` images) in a temporary folder."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="disk-cache-") as tmp:
        root = Path(tmp)
        for n in [count] + ([also] if also else []):
            images = root / f"images-{n}"
            write_images(images, n)
            cache = root / f"cache-{n}"
            results[f"disk_cold_{n}"] = run(images, root / "o1", cache, steps, resolution)
            results[f"disk_warm_{n}"] = run(images, root / "o2", cache, steps, resolution)
            size = sum(p.stat().st_size for p in cache.glob("*.safetensors"))
            results[f"disk_warm_{n}"]["cache_mb"] = size / 2**20
            if n == count:
                results[f"memory_{n}"] = run(images, root / "o3", None, steps, resolution)
            shutil.rmtree(images)
    return results


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, measure, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--also-count", type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.count, args.resolution, args.steps, args.also_count), indent=2))


if __name__ == "__main__":
    main()
