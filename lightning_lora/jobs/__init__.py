"""A reported training: the job's runner, its one terminal report, and the bucket layout.

:func:`~lightning_lora.jobs.runner.run_reported_training` trains, uploads and reports a job;
usable without the queue (a notebook with a webhook URL and a bucket).
"""
