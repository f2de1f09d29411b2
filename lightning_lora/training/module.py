"""The LightningModule: LoRA on a frozen SD1.5 UNet, trained with the diffusers recipe's loss."""

from __future__ import annotations

import contextlib
import inspect
import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import cast_training_params
from omegaconf import DictConfig
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTokenizer
from typing_extensions import override

from lightning_lora.config import plain_dict
from lightning_lora.data.masks import weight_loss
from lightning_lora.errors import NonFiniteLossError
from lightning_lora.lora.adapters import inject_lora
from lightning_lora.lora.networks import (
    LearningRates,
    NetworkConfig,
    check_checkpoint_record,
    checkpoint_record,
    optimizer_groups,
)
from lightning_lora.lora.text_encoder import inject_text_encoder_lora
from lightning_lora.training.compilation import CompileCache, compiled_unet, eager
from lightning_lora.training.conditioning import text_hidden_states
from lightning_lora.training.ema import LoraEMA
from lightning_lora.training.eval_weights import EvalWeightsMixin
from lightning_lora.training.losses import combine_sample_losses, elementwise_loss, timestep_weights
from lightning_lora.training.models import SDComponents
from lightning_lora.training.noise import NoiseTables, configure_scheduler
from lightning_lora.training.rng import restore_rng_state_tensors, rng_state_tensors
from lightning_lora.training.timesteps import check_sampling, sample_timesteps

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]

#: Timesteps at which the deterministic validation loss is measured.
VAL_TIMESTEPS = (100, 300, 500, 700, 900)


class LoRAModule(EvalWeightsMixin, L.LightningModule):
    """Trains a LoRA adapter of the SD1.5 UNet; VAE, text encoder and UNet base stay frozen.

    Checkpoints hold only the LoRA weights (plus optimizer, scheduler, loop and RNG state), so they
    are megabytes and resume exactly.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler

    def __init__(
        self,
        components: SDComponents,
        lora: NetworkConfig,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        gradient_checkpointing: bool = True,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        caption_dropout: float = 0.0,
        lora_seed: int = 0,
        check_finite_every_n_steps: int = 10,
        channels_last: bool = False,
        compile_mode: str = "none",
        compile_extra_blocks: Sequence[str] = (),
        compile_cache_dir: str | None = None,
        loss: str = "l2",
        huber_c: float = 0.1,
        debiased_estimation: bool = False,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        min_timestep: int = 0,
        max_timestep: int | None = None,
        ema: Mapping[str, Any] | None = None,
        text_encoder_lora: LoraConfig | None = None,
        text_encoder_lr: float | None = None,
        lora_lr: LearningRates | None = None,
        prediction_type: str | None = None,
        zero_terminal_snr: bool = False,
        ip_noise_gamma: float = 0.0,
    ) -> None:
        """Wrap the components and inject a fresh LoRA.

        Args:
            components: Frozen SD1.5 parts (see :func:`~.models.load_components`).
            lora: The PEFT LoRA config.
            optimizer: Partial optimizer constructor taking the parameter list.
            scheduler: Partial LR scheduler constructor taking the optimizer (and
                ``num_training_steps`` when its signature has it), stepped every step.
            gradient_checkpointing: Recompute UNet activations in backward to save memory.
            snr_gamma: Min-SNR-gamma loss weighting (off when ``None``).
            noise_offset: Noise offset strength (0 = off).
            caption_dropout: Probability of replacing a sample's caption with the empty caption.
            lora_seed: Seed of the LoRA initialisation.
            check_finite_every_n_steps: How often the loss is checked for NaN/inf (a host sync).
            channels_last: Use the channels-last memory format for the UNet.
            compile_mode: ``none``, ``default``, ``reduce-overhead``, ``max-autotune`` (whole-UNet
                ``torch.compile``) or ``regional`` (the repeated blocks only); see
                :mod:`lightning_lora.training.compilation`.
            compile_extra_blocks: Block classes that ``regional`` compiles besides the ones
                diffusers declares for the UNet (``BasicTransformerBlock``), e.g.
                ``["ResnetBlock2D"]``.
            compile_cache_dir: Persistent compile cache folder (Inductor's caches and portable
                artifacts keyed by torch, device and shapes), shared by restarts and, on a
                shared folder, by a fleet; ``None`` leaves torch's defaults.
            loss: Per-element loss: ``l2``, ``huber`` or ``smooth_l1`` (see
                :mod:`lightning_lora.training.losses`).
            huber_c: The Huber ``c`` of ``huber`` and ``smooth_l1``.
            debiased_estimation: Weight the loss by ``1/sqrt(SNR)`` (with min-SNR, both apply).
            timestep_sampling: ``uniform``, ``logit_normal`` or ``range`` (see
                :mod:`lightning_lora.training.timesteps`).
            logit_mean: Mean of ``logit_normal``.
            logit_std: Standard deviation of ``logit_normal``.
            min_timestep: First timestep of ``range``.
            max_timestep: End (exclusive) of ``range``; ``None`` = the scheduler's count.
            ema: ``enabled``, ``decay``, ``every_n_steps``, ``device`` (``null``: the training
                device, or ``cpu``) of an EMA of the LoRA weights, which validation and export
                use (see :mod:`lightning_lora.training.ema`).
            text_encoder_lora: A LoRA of the text encoder too (``None``: it stays frozen).
            text_encoder_lr: Learning rate of the text encoder's LoRA (``None``: the optimizer's).
            lora_lr: LR multipliers by block and LoRA+ (lora.block_lr, lora.plus_lr_ratio).
            prediction_type: The loss's target, ``epsilon`` or ``v_prediction`` (``None``: the
                scheduler config's); the sampling pipelines use it too.
            zero_terminal_snr: Rescale the betas to a zero terminal SNR (diffusers'
                ``rescale_zero_terminal_snr``); pair it with ``v_prediction``.
            ip_noise_gamma: Input perturbation: the noisy latents are made with
                ``noise + gamma * randn`` while the target stays that of ``noise`` (0 = off).
        """
        super().__init__()
        # a plain list: the hparams go into checkpoints, which load with weights_only=True
        # (an OmegaConf ListConfig from the config would not)
        compile_extra_blocks = [str(name) for name in compile_extra_blocks]
        ema = plain_dict(ema) if isinstance(ema, DictConfig) else dict(ema or {})
        self.save_hyperparameters(
            ignore=["components", "optimizer", "scheduler", "lora", "text_encoder_lora", "lora_lr"]
        )
        self.lora_lr = lora_lr or LearningRates()
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        #: this run's scheduler: the base model's with prediction_type and zero-terminal-SNR betas
        self.noise_scheduler = configure_scheduler(
            components.noise_scheduler, prediction_type, zero_terminal_snr
        )
        #: the text encoder layer that conditions the UNet (kohya's clip skip; 1 = the last)
        self.clip_skip = components.clip_skip
        if ip_noise_gamma < 0:
            raise ValueError(f"module.ip_noise_gamma must be >= 0, got {ip_noise_gamma}")
        if (
            zero_terminal_snr
            and self.noise_scheduler.config["prediction_type"] == "epsilon"
            and (snr_gamma or debiased_estimation)
        ):
            raise ValueError(
                "module.zero_terminal_snr makes the last timestep's SNR 0, where the epsilon "
                "weights of module.snr_gamma / module.debiased_estimation divide by zero: use "
                "module.prediction_type=v_prediction"
            )
        self.lora_config = lora
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.strict_loading = False
        check_sampling(
            timestep_sampling,
            self.noise_scheduler.config["num_train_timesteps"],
            min_timestep,
            max_timestep,
        )
        elementwise_loss(torch.zeros(1), torch.zeros(1), loss, huber_c)  # rejects bad settings now
        self.num_trainable = inject_lora(self.unet, lora, lora_seed)
        self.text_encoder_lora = text_encoder_lora
        self.num_trainable += inject_text_encoder_lora(
            self.text_encoder, text_encoder_lora, lora_seed + 1
        )
        # CLIP has no dropout of its own: train mode only switches on its LoRA's dropout
        self.text_encoder.train(self.trains_text_encoder)
        self.ema: LoraEMA | None = None
        self._ema_state: dict[str, Any] | None = None
        self._val_captions: list[str] = []
        #: The last batch's ``loss_instance``/``loss_prior`` (regularization sets; losses.py)
        self.loss_terms: dict[str, torch.Tensor] = {}
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        self.unet.train()
        self._nonfinite = torch.zeros((), dtype=torch.int64)
        self._empty_embed: torch.Tensor | None = None
        self._val_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        #: forward diffusion, v-targets and SNR from device-side tables (bit-identical to diffusers)
        self.noise = NoiseTables(self.noise_scheduler)
        self._compile_cache: CompileCache | None = None
        self._compile_saved = False
        if compile_cache_dir and compile_mode not in (None, "none"):
            self._compile_cache = CompileCache(compile_cache_dir)
            self._compile_cache.activate()  # before anything compiles

    # ----------------------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> VAE latent distribution parameters (mean and log-variance)."""
        pixels = pixels.to(self.device, self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.parameters.contiguous()

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Captions -> text encoder hidden states (the UNet's cross-attention context).

        The last layer's, or with ``model.clip_skip`` N > 1 the N-th last layer's through the final
        layer norm (:func:`~lightning_lora.training.conditioning.text_hidden_states`).
        """
        return self.text_context(captions)

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder has a LoRA that trains (then text is encoded every step)."""
        return self.text_encoder_lora is not None

    def text_context(self, captions: list[str]) -> torch.Tensor:
        """:meth:`encode_text` with gradients (into the text encoder's LoRA when it trains)."""
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return text_hidden_states(self.text_encoder, ids, self.clip_skip)

    # ----------------------------------------------------------------------------- the loss
    def _latents(self, latent_params: torch.Tensor, sample: bool = True) -> torch.Tensor:
        dist = DiagonalGaussianDistribution(latent_params)
        latents = dist.sample() if sample else dist.mode()
        return latents * self.vae.config["scaling_factor"]

    def diffusion_loss(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        compiled: bool = True,
        weights: torch.Tensor | None = None,
        input_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss of predicting the scheduler's target from noisy latents.

        Args:
            latents: Scaled latents ``(B, C, h, w)``.
            context: Text encoder hidden states ``(B, L, D)``.
            noise: Gaussian noise like ``latents``.
            timesteps: ``(B,)`` integer timesteps on the latents' device.
            compiled: Run the UNet through ``torch.compile`` when ``compile_mode`` asks for it
                (the validation loss runs it eagerly: no extra graph for eval mode and its shapes).
            weights: ``(B, 1, h, w)`` per-latent-pixel loss weights (masked loss), or ``None``.
            input_noise: The noise that makes the noisy latents when it differs from ``noise``
                (input perturbation); the target is always that of ``noise``.

        Returns:
            ``(B,)`` float32 losses (``module.loss``; weighted by min-SNR and/or debiased
            estimation when they are on).
        """
        sched = self.noise_scheduler
        noisy = self.noise.add_noise(
            latents, noise if input_noise is None else input_noise, timesteps
        )
        prediction_type = sched.config["prediction_type"]
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise.velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")
        mode = self.hparams.compile_mode
        context_manager: contextlib.AbstractContextManager[None]
        if compiled:
            unet = compiled_unet(self.unet, mode, self.hparams.compile_extra_blocks)
            cache = self._compile_cache
            if cache is not None and cache.key is None:
                key = cache.artifact_key(
                    mode,
                    self.unet,
                    (noisy, timesteps, context),
                    extra={
                        "channels_last": self.hparams.channels_last,
                        "extra_blocks": list(self.hparams.compile_extra_blocks),
                    },
                )
                cache.load(key)
            context_manager = contextlib.nullcontext()
        else:
            unet, context_manager = self.unet, eager(self.unet)
        with context_manager:
            pred = unet(noisy, timesteps, context, return_dict=False)[0]
        hp = self.hparams
        loss = elementwise_loss(pred, target, hp.loss, hp.huber_c)  # losses.py
        loss = weight_loss(loss, weights).mean(dim=(1, 2, 3))  # masked loss (masks.py)
        if hp.snr_gamma or hp.debiased_estimation:
            snr = self.noise.snr(timesteps)
            snr_weights = timestep_weights(
                snr, prediction_type, hp.snr_gamma, hp.debiased_estimation
            )
            assert snr_weights is not None  # a weighting is on
            loss = loss * snr_weights
        return loss

    def batch_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent distribution parameters and text context of a cached or uncached batch."""
        # a training text encoder encodes with gradients, always per step
        encode = self.text_context if self.trains_text_encoder else self.encode_text
        if "latent_params" in batch:  # captions that vary per epoch are encoded per step
            context = batch.get("text_embeds")
            if context is None:
                context = encode(batch["captions"])
            return batch["latent_params"], context
        return self.encode_images(batch["pixel_values"]), encode(batch["captions"])

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The diffusers recipe's training loss for one batch (draws latents, noise, timesteps)."""
        latent_params, context = self.batch_inputs(batch)
        latents = self._latents(latent_params)
        # an explicit shape, not randn_like: the draw must not depend on the latents' strides
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
        if self.hparams.noise_offset:
            noise = noise + self.hparams.noise_offset * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=noise.dtype
            )
        bsz = latents.shape[0]
        hp = self.hparams
        timesteps = sample_timesteps(
            bsz,
            self.noise_scheduler.config["num_train_timesteps"],
            latents.device,
            hp.timestep_sampling,
            hp.logit_mean,
            hp.logit_std,
            hp.min_timestep,
            hp.max_timestep,
        )
        p = self.hparams.caption_dropout
        if p > 0:
            drop = torch.rand(bsz, device=latents.device) < p
            context = torch.where(drop[:, None, None], self.empty_embed().to(context), context)
        weights = batch.get("loss_weights")
        input_noise = None
        if hp.ip_noise_gamma:  # input perturbation (kohya's --ip_noise_gamma)
            input_noise = noise + hp.ip_noise_gamma * torch.randn(
                latents.shape, device=latents.device, dtype=noise.dtype
            )
        losses = self.diffusion_loss(
            latents, context, noise, timesteps, weights=weights, input_noise=input_noise
        )
        # image-set weights and the prior-preservation term (data.datasets; losses.py)
        keys = ("sample_weights", "prior", "prior_loss_weight")
        loss, self.loss_terms = combine_sample_losses(losses, *(batch.get(k) for k in keys))
        return loss

    def empty_embed(self) -> torch.Tensor:
        """Text context of the empty caption (used for caption dropout)."""
        if self.trains_text_encoder:
            return self.text_context([""])  # changes as the text encoder trains
        if self._empty_embed is None:
            self._empty_embed = self.encode_text([""])
        return self._empty_embed

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        detached = loss.detach()
        self._nonfinite = self._nonfinite.to(detached.device) + (~torch.isfinite(detached)).long()
        if self._logging_due():
            # Only on the steps the loggers write, and as a CPU value: Lightning reads progress-bar
            # values with .item() after every batch, which on a GPU would be a host-device sync
            # per step. This copy is the one sync of a logging step.
            bsz = batch["latent_params" if "latent_params" in batch else "pixel_values"].shape[0]
            self.log("train/loss", detached.float().cpu(), prog_bar=True, batch_size=bsz)
            for name, term in self.loss_terms.items():  # train/loss_instance, train/loss_prior
                self.log(f"train/{name}", term.detach().float().cpu(), batch_size=bsz)
        return loss

    def _logging_due(self) -> bool:
        """Whether Lightning's loggers write this training step's metrics.

        Lightning's own rule (its logger connector's ``should_update_logs``) from public
        counters: the step about to finish (``global_step + 1``) is a multiple of
        ``log_every_n_steps``, or training is stopping; ``fast_dev_run`` logs every step.
        """
        trainer = self.attached_trainer()
        if trainer is None:
            return True
        if trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
            return True
        every = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
        return every > 0 and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)

    @override
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, keeping plain numbers (from callbacks) on the CPU.

        Lightning turns a number into a tensor on the module's device and reads every
        progress-bar value with ``.item()`` after each batch until the next log; on a GPU that
        is a host-device sync per step. A CPU tensor is read for free. Values that are reduced
        across processes (``sync_dist=True``) keep Lightning's default.
        """
        if isinstance(value, numbers.Real) and not kwargs.get("sync_dist", False):
            value = torch.tensor(float(value), dtype=torch.float32)
        super().log(name, value, *args, **kwargs)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = max(1, self.hparams.check_finite_every_n_steps)
        if self.trainer.global_step % every == 0:
            self.check_finite()
        if self.ema is not None:
            self.ema.maybe_update(self.trainer.global_step)
        if self._compile_cache is not None and not self._compile_saved:
            # after the first step, forward and backward are compiled: share them early
            self._compile_cache.save()
            self._compile_saved = True

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if any loss since the start was NaN or infinite."""
        if int(self._nonfinite) > 0:
            raise NonFiniteLossError(
                f"training loss became NaN/inf ({int(self._nonfinite)} step(s) by step "
                f"{self.trainer.global_step}, epoch {self.current_epoch}); no LoRA was written. "
                "Lower module.optimizer.lr, enable gradient clipping (trainer.gradient_clip_val) "
                "or use trainer.precision=bf16-mixed"
            )

    # ----------------------------------------------------------------------------- validation
    def prepare_validation(self, pixels: torch.Tensor, captions: list[str]) -> None:
        """Encode the fixed validation examples and draw their fixed noise once."""
        latents = self._latents(self.encode_images(pixels), sample=False)
        context = self.encode_text(captions)
        self._val_captions = list(captions)
        gen = torch.Generator().manual_seed(1234)
        noise = torch.randn((len(VAL_TIMESTEPS), *latents.shape), generator=gen)
        self._val_inputs = (latents, context, noise.to(latents.device, latents.dtype))

    @torch.no_grad()
    def validation_loss(self) -> torch.Tensor:
        """Deterministic loss: fixed images, fixed timesteps, fixed noise, LoRA dropout off.

        With an EMA or a schedule-free optimizer, the loss of the evaluation weights.
        """
        assert self._val_inputs is not None, "prepare_validation() first"
        latents, context, noise = self._val_inputs
        was_training = self.unet.training, self.text_encoder.training
        self.unet.eval()
        self.text_encoder.eval()
        losses = []
        try:
            with self.evaluation_weights(), self.trainer.precision_plugin.forward_context():
                if self.trains_text_encoder:  # the cached context is of the untrained encoder
                    context = self.encode_text(self._val_captions)
                for i, t in enumerate(VAL_TIMESTEPS):
                    timesteps = torch.full((latents.shape[0],), t, device=latents.device)
                    losses.append(
                        self.diffusion_loss(latents, context, noise[i], timesteps, compiled=False)
                    )
        finally:
            self.unet.train(was_training[0])
            self.text_encoder.train(was_training[1])
        return torch.cat(losses).mean()

    # ----------------------------------------------------------------------------- hooks
    @override
    def setup(self, stage: str) -> None:
        """Hand the frozen encoders to the datamodule, which caches latents with them."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "use_encoders"):
            datamodule.use_encoders(self)

    @override
    def on_fit_start(self) -> None:
        """Precision fix-up, the EMA, the validation inputs, device-side noise tables."""
        cast_training_params([self.unet, self.text_encoder], dtype=torch.float32)
        self.start_ema()
        if self.hparams.channels_last:
            self.unet.to(memory_format=torch.channels_last)  # type: ignore[call-arg]  # diffusers' @wraps(Module.to) hides self
        self.prepare_validation_inputs()
        with self.trainer.precision_plugin.forward_context():
            # noise tables on the device, built in the training step's autocast state
            for dtype in {torch.float32, self.vae.dtype}:
                self.noise.tables(self.device, dtype)

    def prepare_validation_inputs(self) -> None:
        """Encode the datamodule's fixed validation examples once, on the training device."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "validation_examples"):
            return
        if self._val_inputs is None:
            with self.trainer.precision_plugin.forward_context():
                self.prepare_validation(*datamodule.validation_examples())

    @override
    def on_train_start(self) -> None:
        # After a resume, Lightning has loaded the checkpoint's LoRA tensors: keep them fp32.
        cast_training_params([self.unet, self.text_encoder], dtype=torch.float32)

    @override
    def on_train_end(self) -> None:
        if self._compile_cache is not None:
            self._compile_cache.save()  # graphs compiled later (a ragged last batch) too
        self.check_finite()

    @override
    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, which also works for a fused optimizer under ``bf16-mixed``.

        Lightning refuses to clip for an optimizer that unscales its own gradients (fused AdamW)
        under any mixed precision. That is only needed with a GradScaler (``16-mixed``): without
        one (``bf16-mixed``, ``32-true``) the gradients are not scaled and clipping them is exact.
        """
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if fused and gradient_clip_val and scaler is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if str(gradient_clip_algorithm or "norm").lower().endswith("value"):
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @override
    def configure_optimizers(self) -> Any:
        te = self.text_encoder.named_parameters() if self.trains_text_encoder else iter(())
        params = optimizer_groups(
            [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad],
            [(n, p) for n, p in te if p.requires_grad],
            getattr(self.optimizer_factory, "keywords", {}).get("lr"),
            self.hparams.text_encoder_lr,
            self.lora_lr,
        )
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {}
        factory = self.scheduler_factory
        target = getattr(factory, "func", factory)
        if "num_training_steps" in inspect.signature(target).parameters:
            kwargs["num_training_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = factory(optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trainable
        }
        checkpoint["rng_states"] = rng_state_tensors()
        checkpoint["lora_config"] = checkpoint_record(self.lora_config)
        self.save_ema_state(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_record(checkpoint.get("lora_config"), self.lora_config)
        if "rng_states" in checkpoint:
            restore_rng_state_tensors(checkpoint["rng_states"])
        self.load_ema_state(checkpoint)
