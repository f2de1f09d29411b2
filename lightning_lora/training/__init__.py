"""Training: ``train(cfg)``, the LightningModule, and what a training step is made of.

Losses, timestep sampling, optimizers, EMA, evaluation weights, RNG state, ``torch.compile``,
model loading, precision, provenance and inference helpers. Uses :mod:`lightning_lora.data` and
:mod:`lightning_lora.lora`; knows no callback, job or worker.
"""
