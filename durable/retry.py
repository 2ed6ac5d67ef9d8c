"""Retry policy: how long to wait before the next attempt (pure functions)."""

from __future__ import annotations

import random as _random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``base * factor ** (attempt - 1)``, capped.

    ``jitter`` is the fraction of the delay drawn at random (0.1 = up to ±10%), so a
    burst of failures does not come back as a burst of retries.
    """

    base: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1
    max_attempts: int | None = None
    """Tries in all of a step run with this policy (``ctx.step(..., retry=...)``; default
    3). A task's or workflow's attempts are its decorator's ``max_attempts`` instead."""

    def __post_init__(self) -> None:
        if self.max_attempts is not None and (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or not 1 <= self.max_attempts <= 1000
        ):
            raise ValueError(
                f"RetryPolicy.max_attempts must be a whole number from 1 to 1000, "
                f"got {self.max_attempts!r}"
            )
        if self.base < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must be >= 0")
        if self.factor < 1:
            raise ValueError("RetryPolicy.factor must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("RetryPolicy.jitter must be between 0 and 1")

    def delay(self, attempt: int, rand: _random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        try:
            raw = min(self.max_delay, self.base * self.factor ** max(0, attempt - 1))
        except OverflowError:  # attempt 1100 of a generous max_attempts: long past the cap
            raw = self.max_delay if self.base > 0 else 0.0
        if self.jitter == 0 or raw == 0:
            return raw
        r = (rand or _random).uniform(-self.jitter, self.jitter)
        return max(0.0, raw * (1 + r))


DEFAULT_POLICY = RetryPolicy()


@dataclass(frozen=True)
class Outcome:
    """What to do with a failed attempt: retry after ``delay`` seconds, or fail for good."""

    retry: bool
    delay: float = 0.0


def after_failure(
    attempt: int,
    max_attempts: int,
    policy: RetryPolicy,
    *,
    retryable: bool = True,
    requested_delay: float | None = None,
    rand: _random.Random | None = None,
) -> Outcome:
    """Decide the fate of failed attempt ``attempt`` of ``max_attempts``."""
    if not retryable or attempt >= max_attempts:
        return Outcome(retry=False)
    if requested_delay is not None:
        return Outcome(retry=True, delay=max(0.0, requested_delay))
    return Outcome(retry=True, delay=policy.delay(attempt, rand))
