"""Clients that know nothing of Lightning: the backend's webhooks, S3, and what they share.

The contract's bodies and style ids, the HTTP client and its background sender, S3 with retries
and its naming rules, image types told by content, backoff with jitter, and secret redaction.
"""
