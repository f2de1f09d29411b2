"""The RabbitMQ queue runner: messages, settings, the consumer, the ledger and outbox, the CLI.

It turns a delivery into a reported training (:mod:`lightning_lora.jobs`) and knows nothing of
how a UNet is trained.
"""
