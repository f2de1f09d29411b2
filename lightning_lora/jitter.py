"""Random delays for retries that no training seed can synchronise.

Training seeds Python's global :mod:`random` (``L.seed_everything``) with the job's seed, so any
retry delay drawn from it is the same in every worker that ran a job with that seed: after a
shared outage they would all retry at the same instants. Every backoff in this package draws
from :data:`RNG`, an OS-entropy generator that seeding never touches.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["RNG", "full_jitter", "tenacity_wait"]

RNG = random.SystemRandom()


def full_jitter(attempt: int, base_s: float, max_s: float) -> float:
    """A delay uniform in ``[0, min(max_s, base_s * 2**attempt)]`` ("full jitter").

    Args:
        attempt: 0 for the first retry, 1 for the second...
        base_s: The first ceiling.
        max_s: The largest ceiling.
    """
    ceiling = min(max_s, base_s * 2 ** min(max(attempt, 0), 62))
    return RNG.uniform(0.0, max(0.0, ceiling))


def tenacity_wait(base_s: float, max_s: float) -> Any:
    """A tenacity ``wait`` callable with full jitter from :data:`RNG`.

    tenacity's own ``wait_random_exponential`` draws from the global :mod:`random`, which the
    training seeds; this one does not.
    """

    def wait(retry_state: Any) -> float:
        return full_jitter(retry_state.attempt_number - 1, base_s, max_s)

    return wait
