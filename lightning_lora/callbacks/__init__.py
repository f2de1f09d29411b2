"""Lightning callbacks: webhooks, VRAM logging, S3 checkpoints, throughput."""
