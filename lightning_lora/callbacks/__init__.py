"""Lightning callbacks: validation, throughput, VRAM, progress webhooks, S3 checkpoints.

Each takes what it needs from its caller (a progress report, an S3 prefix); none imports a job,
the worker or the demo.
"""
