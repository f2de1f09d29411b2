"""The UNet's text conditioning with CLIP skip (kohya's and AUTOMATIC1111's ``clip_skip``).

``clip_skip=1`` is the text encoder's last hidden state (its output, after the final layer
norm); ``clip_skip=2`` is the penultimate layer's hidden state passed through the same final layer
norm, and so on. diffusers' pipelines count one lower (their ``clip_skip=1`` is the penultimate
layer), and their clip-skip path reads ``text_encoder.text_model``, which transformers 5's
``CLIPTextModel`` no longer has: the samplers pass embeddings from :func:`prompt_embeddings`
instead.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTokenizer

__all__ = ["check_clip_skip", "prompt_embeddings", "text_hidden_states"]


def check_clip_skip(clip_skip: int, text_encoder: CLIPTextModel) -> int:
    """Validate ``model.clip_skip`` against the text encoder's depth.

    Args:
        clip_skip: 1 (last layer) up to the number of hidden layers.
        text_encoder: The CLIP text encoder.

    Returns:
        ``clip_skip`` as an int.

    Raises:
        ValueError: Out of range.
    """
    layers = int(text_encoder.config.num_hidden_layers)
    if not 1 <= int(clip_skip) <= layers:
        raise ValueError(
            f"model.clip_skip must be between 1 (last layer) and {layers} (the text encoder's "
            f"layers), got {clip_skip}"
        )
    return int(clip_skip)


def text_hidden_states(
    text_encoder: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int = 1
) -> torch.Tensor:
    """The cross-attention context of token ids, ``clip_skip`` layers from the end.

    Args:
        text_encoder: The CLIP text encoder.
        input_ids: ``(B, L)`` token ids.
        clip_skip: 1 = the last hidden state; N = the N-th last layer's hidden state through the
            final layer norm.

    Returns:
        ``(B, L, D)`` hidden states.
    """
    if clip_skip <= 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    # transformers < 5 nests the layers under text_model; 5 has them on the model itself
    prefix = "text_model." if hasattr(text_encoder, "text_model") else ""
    return text_encoder.get_submodule(f"{prefix}final_layer_norm")(hidden)


@torch.no_grad()
def prompt_embeddings(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompt: str, clip_skip: int
) -> torch.Tensor:
    """A pipeline's ``prompt_embeds`` for one prompt (as its ``encode_prompt``, with clip skip).

    Args:
        tokenizer: The CLIP tokenizer.
        text_encoder: The CLIP text encoder.
        prompt: The prompt (``""`` for the unconditional embedding).
        clip_skip: kohya's count (1 = the last layer).

    Returns:
        ``(1, L, D)`` embeddings in the text encoder's dtype.
    """
    ids = tokenizer(
        [prompt],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_hidden_states(text_encoder, ids, clip_skip).to(text_encoder.dtype)
