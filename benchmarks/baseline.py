"""The baselines: diffusers' LoRA training step, ours to run anywhere, and the shared reference.

:class:`DiffusersLoRAStep` is this project's implementation of the training step of diffusers'
``examples/text_to_image/train_text_to_image_lora.py``, written from that recipe:

* the UNet, VAE and text encoder are frozen and held in the weight dtype (fp16 under the recipe's
  ``--mixed_precision fp16``); a PEFT LoRA (``init_lora_weights="gaussian"``) goes on
  ``to_k``/``to_q``/``to_v``/``to_out.0`` and its parameters are upcast to fp32
  (``cast_training_params``);
* every step encodes the pixels with the VAE (``latent_dist.sample() * scaling_factor``) and the
  token ids with the text encoder, draws the noise (``randn_like``) and the timesteps, noises the
  latents with the scheduler's ``add_noise``, predicts with the UNet under autocast (what
  Accelerate's ``prepare`` does for a mixed-precision model), and takes the MSE against the
  scheduler's target (the noise for ``epsilon``, ``get_velocity`` for ``v_prediction``);
* the loss is scaled by a ``GradScaler`` (fp16), the gradients are unscaled and clipped to
  ``max_grad_norm`` (1.0), AdamW (``lr=1e-4``, betas 0.9/0.999, weight decay 1e-2, eps 1e-8) steps
  over the LoRA parameters only, the ``constant`` LR schedule steps, and the gradients are zeroed;
* the step's loss is read back with ``.item()`` (the recipe's ``train_loss += avg_loss.item()``),
  which is one host-device sync per step, as in the recipe;
* gradient checkpointing is ``unet.enable_gradient_checkpointing()``.

Not reproduced: Accelerate's process group and gradient accumulation (one process, one micro-batch
per step), the data loader (a fixed synthetic batch: standard-normal pixels and random token ids),
logging, EMA and validation. The precision is the case's (:func:`recipe_precision`: the recipe's
``--mixed_precision fp16``, ``bf16`` or ``no``), so that a baseline and our step compare at the
same precision; on a CPU fp16 becomes bf16 (as Lightning does), and the LoRA parameters stay in
fp32 as under the recipe's fp16 path (the recipe leaves them in bf16 under
``--mixed_precision bf16``).

The shared ``sd15_lora_reference.py`` (another implementation of the same step) is not part of
this repository. When it is found (:func:`reference_path`), the bench also runs it, as a
cross-check column.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from transformers import CLIPTextModel

from benchmarks.timers import cuda_sync, free_memory, gib, peak_memory, reset_peak_memory

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_ENV = "LIGHTNING_LORA_REFERENCE"
REFERENCE_FILE = "sd15_lora_reference.py"
#: The recipe's ``target_modules``.
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


@dataclasses.dataclass(frozen=True)
class RecipeSettings:
    """The recipe's command-line settings that the training step reads.

    Attributes:
        rank: ``--rank`` (the bench uses the project's 16).
        alpha: ``lora_alpha`` (the recipe sets it to the rank; the project's default is 32).
        learning_rate: ``--learning_rate``.
        adam_beta1: ``--adam_beta1``.
        adam_beta2: ``--adam_beta2``.
        adam_weight_decay: ``--adam_weight_decay``.
        adam_epsilon: ``--adam_epsilon``.
        max_grad_norm: ``--max_grad_norm`` (``None``: no clipping).
        gradient_checkpointing: ``--gradient_checkpointing``.
        mixed_precision: ``fp16``, ``bf16`` or ``no``; ``None`` picks fp16 on CUDA, bf16 elsewhere.
    """

    rank: int = 16
    alpha: float = 32
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str | None = None

    def weight_dtype(self, device: torch.device) -> torch.dtype:
        """Dtype of the frozen weights (and of autocast) on ``device``."""
        mode = self.mixed_precision or ("fp16" if device.type == "cuda" else "bf16")
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[mode]


def recipe_precision(precision: str, device: str | torch.device) -> str:
    """The recipe's ``--mixed_precision`` for a Lightning precision on ``device``.

    ``bf16-mixed``/``bf16-true`` -> ``bf16``; ``16-mixed`` -> ``fp16`` on CUDA and ``bf16``
    elsewhere (Lightning's choice on a CPU); ``32-true``/``32`` -> ``no``.
    """
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16" if torch.device(device).type == "cuda" else "bf16"
    return "no"


class DiffusersLoRAStep:
    """The training step of diffusers' ``train_text_to_image_lora.py`` (see the module docstring).

    The constructor adds the LoRA adapter to ``unet`` (in place): give it components that nothing
    else trains.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        noise_scheduler: DDPMScheduler,
        device: str | torch.device,
        settings: RecipeSettings | None = None,
    ) -> None:
        """Freeze the components, move them to the device, add the LoRA and build the optimizer.

        Args:
            unet: The UNet (gets the adapter).
            vae: The autoencoder.
            text_encoder: The CLIP text encoder.
            noise_scheduler: The DDPM training scheduler (the model folder's, in the recipe).
            device: Where to train.
            settings: The recipe's settings (its defaults when ``None``).
        """
        settings = settings or RecipeSettings()
        self.device = torch.device(device)
        self.settings = settings
        self.weight_dtype = settings.weight_dtype(self.device)
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.noise_scheduler = noise_scheduler
        for model in (unet, vae, text_encoder):
            model.requires_grad_(False)
            model.to(self.device, dtype=self.weight_dtype)
        unet.add_adapter(
            LoraConfig(
                r=settings.rank,
                lora_alpha=settings.alpha,
                init_lora_weights="gaussian",
                target_modules=list(LORA_TARGETS),
            )
        )
        cast_training_params(unet, dtype=torch.float32)
        if settings.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.lora_parameters = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.lora_parameters,
            lr=settings.learning_rate,
            betas=(settings.adam_beta1, settings.adam_beta2),
            weight_decay=settings.adam_weight_decay,
            eps=settings.adam_epsilon,
        )
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.weight_dtype == torch.float16
        )

    def synthetic_batch(
        self, batch_size: int, resolution: int, sequence_length: int = 77
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard-normal pixels and random token ids of the text encoder's vocabulary.

        Args:
            batch_size: Samples.
            resolution: Image side in pixels.
            sequence_length: Token ids per sample (the tokenizer's ``model_max_length``).

        Returns:
            ``(pixel_values, input_ids)`` on the device, pixels in the weight dtype.
        """
        pixels = torch.randn(
            batch_size, 3, resolution, resolution, device=self.device, dtype=self.weight_dtype
        )
        vocab = self.text_encoder.config.vocab_size
        ids = torch.randint(0, vocab, (batch_size, sequence_length), device=self.device)
        return pixels, ids

    def step(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> float:
        """One optimisation step on a batch; returns its loss (a host sync, as in the recipe)."""
        latents = self.vae.encode(pixel_values.to(dtype=self.weight_dtype)).latent_dist.sample()
        latents = latents * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train_timesteps, (bsz,), device=latents.device).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(input_ids, return_dict=False)[0]
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unknown prediction type {prediction_type}")
        autocast = self.weight_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=autocast):
            model_pred = self.unet(
                noisy_latents, timesteps, encoder_hidden_states, return_dict=False
            )[0]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        self.scaler.scale(loss).backward()
        if self.settings.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.lora_parameters, self.settings.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()


def time_baseline(
    model_dir: str | Path,
    batch_size: int,
    resolution: int,
    grad_ckpt: bool,
    steps: int,
    warmup: int,
    device: str,
    seed: int = 0,
    settings: RecipeSettings | None = None,
) -> dict[str, Any]:
    """Time :class:`DiffusersLoRAStep` on a fresh copy of a model folder's components.

    Args:
        model_dir: A diffusers SD1.5-shaped folder (loaded with ``reuse=False``: the adapter
            goes on a private copy).
        batch_size: Samples per step.
        resolution: Image side in pixels.
        grad_ckpt: Gradient checkpointing.
        steps: Timed steps.
        warmup: Steps before the clock starts.
        device: ``cuda`` or ``cpu``.
        seed: Seeds the LoRA initialisation, the batch and the per-step draws.
        settings: Recipe settings (defaults, with ``grad_ckpt``).

    Returns:
        ``step_s``, ``samples_per_s``, ``peak_gib`` (CUDA), ``losses`` (every step) and the
        precision used.
    """
    from lightning_lora.training.models import load_components

    settings = dataclasses.replace(settings or RecipeSettings(), gradient_checkpointing=grad_ckpt)
    dtype = settings.weight_dtype(torch.device(device))
    components = load_components(str(model_dir), torch_dtype=dtype, reuse=False)
    free_memory()
    torch.manual_seed(seed)
    recipe = DiffusersLoRAStep(
        components.unet,
        components.vae,
        components.text_encoder,
        components.noise_scheduler,
        device,
        settings,
    )
    batch = recipe.synthetic_batch(batch_size, resolution, components.tokenizer.model_max_length)
    losses = [recipe.step(*batch) for _ in range(warmup)]
    cuda_sync()
    reset_peak_memory()
    start = time.perf_counter()
    losses += [recipe.step(*batch) for _ in range(steps)]
    cuda_sync()
    step_s = (time.perf_counter() - start) / steps
    peak = peak_memory()
    del recipe, components
    free_memory()
    return {
        "step_s": step_s,
        "samples_per_s": batch_size / step_s,
        "peak_gib": gib(peak),
        "losses": losses,
    }


# --------------------------------------------------------------------------------- the reference
def reference_candidates() -> list[Path]:
    """Where the shared reference is looked for, in order.

    ``$LIGHTNING_LORA_REFERENCE`` (a file or a folder holding it) alone when set; else
    ``<repo>/../shared/bench`` (a checkout with ``shared/`` beside it, as in CI), then
    ``<repo>/shared/bench``.
    """
    env = os.environ.get(REFERENCE_ENV)
    if env:
        return [Path(env)]
    return [REPO_ROOT.parent / "shared" / "bench", REPO_ROOT / "shared" / "bench"]


def reference_path() -> Path | None:
    """The shared ``sd15_lora_reference.py``, or ``None`` where there is none (a user's clone)."""
    for candidate in reference_candidates():
        path = candidate / REFERENCE_FILE if candidate.is_dir() else candidate
        if path.is_file():
            return path.resolve()
    return None


def load_reference() -> ModuleType:
    """Import the shared reference recipe (once per process).

    Raises:
        FileNotFoundError: Naming the places searched, when there is no reference file.
    """
    path = reference_path()
    if path is None:
        places = ", ".join(map(str, reference_candidates()))
        raise FileNotFoundError(f"{REFERENCE_FILE} not found in {places}; set {REFERENCE_ENV}")
    name = "sd15_lora_reference"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def time_reference(
    batch_size: int,
    resolution: int,
    grad_ckpt: bool,
    steps: int,
    warmup: int,
    tiny: bool,
    device: str,
) -> dict[str, Any]:
    """Time the shared reference's step (its own random-weight model of the same shape)."""
    ref = load_reference()
    free_memory()
    out = ref.reference_samples_per_s(
        batch_size=batch_size,
        resolution=resolution,
        grad_ckpt=grad_ckpt,
        steps=steps,
        warmup=warmup,
        tiny=tiny,
        device=device,
    )
    free_memory()
    return {
        "step_s": float(out["step_s"]),
        "samples_per_s": float(out["samples_per_s"]),
        "peak_gib": out.get("peak_gib"),
    }
