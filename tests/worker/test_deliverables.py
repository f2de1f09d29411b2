"""What a worker job delivers beside the LoRA: the final sample grid and the model card.

Real components only: a job handled by an in-process ``TrainingWorker`` whose images, LoRA,
samples and card live on moto's S3 server over HTTP, and whose webhooks go to a real local
HTTP receiver (the ``stack`` of ``tests/support/worker_stack.py``). Nothing is patched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lightning_lora.clients.contract import COMPLETE_PATH
from lightning_lora.jobs.layout import kohya_key, model_card_key, model_key, samples_key
from tests.support.worker_stack import _delivery, _job, _terminal, _worker

pytestmark = pytest.mark.slow  # trains

PROMPTS = ("a red circle on a blue background", "a white triangle on a green background")


def test_a_job_with_prompts_delivers_samples_and_card_and_lists_the_samples_url(
    stack, tmp_path: Path
) -> None:
    receiver, storage = stack["receiver"], stack["storage"]
    prompts = ",".join(f"'{p}'" for p in PROMPTS)
    worker = _worker(
        stack,
        "trainer.max_epochs=1",
        f"validation.prompts=[{prompts}]",
        "validation.num_inference_steps=2",
    )
    settlement = worker.handle(_delivery(json.dumps(_job(stack, 91)).encode(), redelivered=False))
    assert settlement.outcome.name == "ACK"
    (done,) = _terminal(receiver, 91)  # exactly one terminal webhook
    assert done.path == COMPLETE_PATH and 200 <= done.status < 300
    assert set(done.json) == {"style_id", "model_url", "metadata"}
    bucket = storage.bucket
    assert done.json["model_url"] == f"s3://{bucket}/{model_key(91)}"
    meta = done.json["metadata"]
    assert meta["samples_url"] == f"s3://{bucket}/models/style_91/samples.png"
    assert meta["model_card_url"] == f"s3://{bucket}/models/style_91/README.md"
    keys = set(storage.list_keys("models/style_91/"))
    assert keys == {model_key(91), kohya_key(91), samples_key(91), model_card_key(91)}
    grid = Image.open(storage.download_file(samples_key(91), tmp_path / "samples.png"))
    assert grid.size == (2 * 64, 64)  # the run's resolution, one column per prompt
    card = storage.download_file(model_card_key(91), tmp_path / "README.md").read_text("utf-8")
    front = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", card, re.S).group(1))
    assert front["library_name"] == "diffusers" and "lora" in front["tags"]
    assert "](samples.png)" in card
    assert all(p in card for p in PROMPTS)
    assert f"| rank | {meta['lora_rank']} |" in card and f"| alpha | {meta['lora_alpha']} |" in card
    assert f"| steps | {meta['training_steps']} |" in card
    assert f"| dataset size | {meta['num_images']} images |" in card
    assert f"| dataset hash (SHA-256) | {meta['dataset_hash']} |" in card
    assert 'weight_name="lora_weights.safetensors"' in card and "<lora:lora_kohya:1>" in card
