"""A wall clock a test moves by hand (leases and the outbox compare times, never sleep on them)."""

from __future__ import annotations


class FakeClock:
    """Seconds since the epoch, advanced only by :meth:`advance`.

    Args:
        now: The starting time.
    """

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward; return the new time."""
        self.now += seconds
        return self.now
