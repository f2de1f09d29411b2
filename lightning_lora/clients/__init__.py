"""Network clients that know nothing of Lightning: the backend webhooks and S3."""
