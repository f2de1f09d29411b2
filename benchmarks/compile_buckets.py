"""How many graphs ``torch.compile`` builds for a bucketed run (tiny UNet, counted by Dynamo).

Run by hand::

    .venv/bin/python benchmarks/compile_buckets.py

The tiny UNet is wrapped with ``torch.compile`` as ``module.compile_mode=default`` does
(``dynamic=None``, Dynamo's automatic dynamic shapes), but with a backend that only counts the
graphs Dynamo hands it (the count does not depend on the backend; Inductor would compile each).
It then runs forward and backward on the latent shapes of a bucketed run at 512 px divided by 8
(a few buckets, full and ragged batches) and prints JSON: after each input shape, how many
graphs exist in total. Dynamo compiles the first shape statically; the first different shape
recompiles once with the changed dimensions dynamic, and later shapes reuse that graph.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: (batch, latent height, latent width): buckets 64x64, 80x48, 48x80, 96x40 (x8 px) at batch 4,
#: then ragged batches of 3 and 1 and a repeat of the first shape.
SHAPES = [(4, 8, 8), (4, 6, 10), (4, 10, 6), (4, 5, 12), (3, 6, 10), (1, 8, 8), (4, 8, 8)]


def measure() -> dict:
    """Run the shapes through the compiled tiny UNet and count the graphs."""
    import torch

    from lightning_lora.training.models import load_components, tiny_model_path

    unet = load_components(tiny_model_path()).unet
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    compiled = torch.compile(unet, backend=counting_backend)
    context = torch.randn(4, 77, 32)
    out = []
    for batch, h, w in SHAPES:
        x = torch.randn(batch, 4, h, w, requires_grad=True)
        t = torch.randint(0, 1000, (batch,))
        compiled(x, t, context[:batch], return_dict=False)[0].mean().backward()
        out.append({"shape": [batch, 4, h, w], "graphs_so_far": len(graphs)})
    return {"torch": torch.__version__, "runs": out, "graphs": len(graphs)}


if __name__ == "__main__":
    print(json.dumps(measure()))
