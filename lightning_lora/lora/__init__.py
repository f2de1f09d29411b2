"""LoRA networks: adapters for the UNet and the text encoder, and the files they export to.

PEFT injection and reset, diffusers and kohya formats with their metadata, byte-stable
safetensors headers.
"""
