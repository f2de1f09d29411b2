"""Peak memory of decoding a style folder of very large images (``StyleDataModule.setup``).

Run by hand::

    .venv/bin/python benchmarks/image_memory.py --count 100 --side 8000 --resolution 512

It writes ``--count`` solid-colour ``--side`` x ``--side`` PNGs (about 190 kB each at 8000 px,
written a row at a time so writing them costs no memory), then runs the data module's setup in
a fresh interpreter and prints JSON: ``peak_rss_mb`` (the child's peak resident set size),
``baseline_mb`` (its resident set size after imports, before setup), ``delta_mb`` (the
difference) and ``seconds`` (time spent in setup). Sizes are in MiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.images import write_solid_png  # noqa: E402

_CHILD = """
import json, resource, sys, time
import psutil
from lightning_lora.data.datamodule import StyleDataModule
baseline = psutil.Process().memory_info().rss
start = time.perf_counter()
dm = StyleDataModule(sys.argv[1], resolution=int(sys.argv[2]))
dm.setup("fit")
seconds = time.perf_counter() - start
unit = 1 if sys.platform == "darwin" else 1024
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
sizes = sorted({im.size for im in dm.images.images})
print(json.dumps({"peak": peak, "baseline": baseline, "seconds": seconds, "sizes": sizes}))
"""


def measure(count: int, side: int, resolution: int) -> dict[str, object]:
    """Write the images and measure the data module's setup on them in a child process.

    Args:
        count: Number of images.
        side: Width and height of each image in pixels.
        resolution: Training resolution.

    Returns:
        The figures printed by :func:`main`.
    """
    with tempfile.TemporaryDirectory(prefix="image-memory-") as tmp:
        folder = Path(tmp)
        first = write_solid_png(folder / "0000.png", side, side)
        for i in range(1, count):
            shutil.copyfile(first, folder / f"{i:04d}.png")
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(folder), str(resolution)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            raise SystemExit(f"setup failed:\n{proc.stderr[-4000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        file_bytes = first.stat().st_size
    mib = 2**20
    return {
        "count": count,
        "side": side,
        "resolution": resolution,
        "file_kb": round(file_bytes / 1024, 1),
        "kept_sizes": child["sizes"],
        "peak_rss_mb": round(child["peak"] / mib, 1),
        "baseline_mb": round(child["baseline"] / mib, 1),
        "delta_mb": round((child["peak"] - child["baseline"]) / mib, 1),
        "seconds": round(child["seconds"], 1),
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the options, measure, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="number of images")
    parser.add_argument("--side", type=int, default=8000, help="image width and height")
    parser.add_argument("--resolution", type=int, default=512, help="training resolution")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.count, args.side, args.resolution), indent=2))


if __name__ == "__main__":
    main()
