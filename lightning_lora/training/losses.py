"""The diffusion loss: per-element loss types and per-timestep weightings.

``elementwise_loss`` gives the loss of every latent element (callers reduce it, e.g. after a mask);
``timestep_weights`` gives the per-sample weights of min-SNR-gamma and debiased estimation.
Huber and smooth-L1 follow kohya sd-scripts (``library/train_util.py``: ``conditional_loss``) with a
constant ``huber_c``; debiased estimation follows kohya's ``apply_debiased_estimation``; min-SNR
follows diffusers' ``train_text_to_image_lora.py``. They are written out here because neither
diffusers nor torch ships these weightings as functions (``torch.nn.functional.huber_loss`` is a
different parametrisation: quadratic then linear, not the pseudo-Huber of the papers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The loss types of ``module.loss``.
LOSS_TYPES = ("l2", "huber", "smooth_l1")

#: kohya clamps the SNR here for debiased estimation (SNR is infinite at timestep 0).
DEBIASED_MAX_SNR = 1000.0


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.1
) -> torch.Tensor:
    """The per-element loss in float32 (not reduced).

    Args:
        pred: The UNet's prediction.
        target: The target (noise or velocity).
        kind: ``l2`` (squared error, the diffusers recipe), ``huber`` (pseudo-Huber,
            ``2c(sqrt(d² + c²) - c)``) or ``smooth_l1`` (``2(sqrt(d² + c²) - c)``).
        huber_c: The Huber ``c`` (``huber``, ``smooth_l1``).

    Returns:
        A float32 tensor shaped like ``pred``.

    Raises:
        ValueError: An unknown ``kind`` or a non-positive ``huber_c``.
    """
    pred, target = pred.float(), target.float()
    if kind == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if kind not in LOSS_TYPES:
        raise ValueError(f"module.loss must be one of {', '.join(LOSS_TYPES)}, got {kind!r}")
    if huber_c <= 0:
        raise ValueError(f"module.huber_c must be > 0, got {huber_c}")
    pseudo = torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c
    return 2 * huber_c * pseudo if kind == "huber" else 2 * pseudo


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights ``min(snr, gamma) / snr`` (``/ (snr + 1)`` for v-prediction).

    Args:
        snr: ``(B,)`` signal-to-noise ratios of the sampled timesteps.
        gamma: The gamma.
        prediction_type: The scheduler's ``epsilon`` or ``v_prediction``.

    Returns:
        ``(B,)`` weights.
    """
    clamped = torch.clamp(snr, max=gamma)
    return clamped / (snr + 1) if prediction_type == "v_prediction" else clamped / snr


def debiased_weights(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased-estimation weights ``1 / sqrt(snr)`` (``1 / (snr + 1)`` for v-prediction).

    The SNR is clamped to 1000 first, as kohya does.

    Args:
        snr: ``(B,)`` signal-to-noise ratios of the sampled timesteps.
        prediction_type: The scheduler's ``epsilon`` or ``v_prediction``.

    Returns:
        ``(B,)`` weights.
    """
    snr = torch.clamp(snr, max=DEBIASED_MAX_SNR)
    return 1 / (snr + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(snr)


def timestep_weights(
    snr: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None = None,
    debiased_estimation: bool = False,
) -> torch.Tensor | None:
    """The per-sample weights of the configured weightings (they multiply when both are on).

    Args:
        snr: ``(B,)`` signal-to-noise ratios of the sampled timesteps.
        prediction_type: The scheduler's ``epsilon`` or ``v_prediction``.
        snr_gamma: Min-SNR gamma (off when ``None`` or 0).
        debiased_estimation: Apply debiased-estimation weighting.

    Returns:
        ``(B,)`` weights, or ``None`` when no weighting is on.
    """
    weights = None
    if snr_gamma:
        weights = min_snr_weights(snr, snr_gamma, prediction_type)
    if debiased_estimation:
        debiased = debiased_weights(snr, prediction_type)
        weights = debiased if weights is None else weights * debiased
    return weights


def combine_sample_losses(
    losses: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
    prior: tuple[bool, ...] | None = None,
    prior_loss_weight: float | None = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch loss from per-sample losses: image-set weights and the prior-preservation term.

    Each sample's loss is multiplied by its image set's ``loss_weight`` (``sample_weights``).
    With regularization images in the batch (``prior``), the loss is DreamBooth's
    ``loss_instance + prior_loss_weight * loss_prior``, each the mean over its own samples
    (a term without samples is absent); weight 0 gives the instance loss alone. Without
    ``prior``, it is the plain mean. The masks are built from Python bools, so nothing here
    waits for the device.

    Args:
        losses: ``(B,)`` per-sample losses.
        sample_weights: ``(B,)`` image-set weights, or ``None`` (all 1).
        prior: Which samples are regularization images, or ``None`` (no regularization set).
        prior_loss_weight: ``data.prior_loss_weight`` (``None``: 1).

    Returns:
        The loss, and the terms to log: ``loss_instance`` and ``loss_prior`` when ``prior`` is
        given and the batch has such samples.
    """
    if sample_weights is not None:
        losses = losses * sample_weights.to(losses.device, losses.dtype)
    if prior is None:
        return losses.mean(), {}
    is_prior = torch.tensor(prior, dtype=losses.dtype).to(losses.device, non_blocking=True)
    n_prior = sum(prior)
    terms: dict[str, torch.Tensor] = {}
    if n_prior < len(prior):
        terms["loss_instance"] = (losses * (1 - is_prior)).sum() / (len(prior) - n_prior)
    if n_prior:
        terms["loss_prior"] = (losses * is_prior).sum() / n_prior
    total = terms.get("loss_instance", losses.new_zeros(()))
    if "loss_prior" in terms:
        weight = 1.0 if prior_loss_weight is None else prior_loss_weight
        total = total + weight * terms["loss_prior"]
    return total, terms
