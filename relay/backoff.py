"""Reconnection waits: exponential backoff with full jitter, and the `Retry-After` header.

Full jitter (a uniform draw between 0 and the exponential ceiling) spreads the reconnects of
many relays that lost the same upstream at the same moment, instead of having them all come
back in lock-step.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


class Backoff:
    """The n-th consecutive wait is uniform in [0, min(maximum, initial * 2**n)]."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng or random.Random()
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """How many waits were drawn since the last reset."""
        return self._attempt

    def ceiling(self) -> float:
        """The upper bound of the next wait."""
        # Stop doubling once past the maximum so the float never overflows.
        exponent = min(self._attempt, 64)
        return min(self._maximum, self._initial * 2.0**exponent)

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self.ceiling())
        self._attempt += 1
        return delay

    def reset(self) -> None:
        self._attempt = 0


# An upstream asking for a longer pause (a misconfigured proxy's `Retry-After: 86400`, a date years
# ahead) would otherwise leave the account without events for that long; five minutes is past any
# rate-limit window DialStack documents, and the relay asks again after it.
MAX_RETRY_AFTER_SECONDS = 300.0


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value (delay-seconds or an HTTP date), at most
    MAX_RETRY_AFTER_SECONDS; None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_SECONDS)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    wait = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(0.0, wait), MAX_RETRY_AFTER_SECONDS)
