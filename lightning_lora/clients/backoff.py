"""Retry delays: one exponential backoff with jitter, from an RNG that no training seed touches.

Training seeds Python's global :mod:`random` (``L.seed_everything``) with the job's seed, so any
retry delay drawn from it is the same in every worker that ran a job with that seed: after a
shared outage they would all retry at the same instants. Every backoff in this package is
:func:`backoff_delay`, drawn from :data:`RNG`, an OS-entropy generator that seeding never touches:

* the webhook client's retries and S3's (tenacity, :func:`tenacity_wait`): factor 2, full jitter;
* the consumer's reconnects: factor 2, equal jitter (at least half the ceiling);
* the outbox's re-sends: factor 3, equal jitter (seconds, then minutes, then hours).
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["RNG", "backoff_delay", "tenacity_wait"]

RNG = random.SystemRandom()

_MAX_EXPONENT = 60


def backoff_delay(
    attempt: int, base_s: float, max_s: float, *, factor: float = 2.0, low: float = 0.0
) -> float:
    """A delay uniform in ``[low * c, c]``, ``c = min(max_s, base_s * factor**attempt)``.

    Args:
        attempt: 0 for the first retry, 1 for the second...
        base_s: The first ceiling.
        max_s: The largest ceiling.
        factor: Growth of the ceiling per attempt.
        low: The least share of the ceiling: 0 is "full jitter", 0.5 "equal jitter".
    """
    exponent = min(max(attempt, 0), _MAX_EXPONENT)
    ceiling = max(0.0, min(max_s, base_s * factor**exponent))
    return RNG.uniform(low * ceiling, ceiling)


def tenacity_wait(base_s: float, max_s: float) -> Any:
    """A tenacity ``wait`` callable: :func:`backoff_delay` with full jitter.

    tenacity's own ``wait_random_exponential`` draws from the global :mod:`random`, which the
    training seeds; this one does not.
    """

    def wait(retry_state: Any) -> float:
        return backoff_delay(retry_state.attempt_number - 1, base_s, max_s)

    return wait
