"""What to do when the upstream refused a token, and how long to back off after failures.

Owns: the renewal decision and the back-off delay, as pure functions of
generations, ages and counts with the time passed in. Knows nothing of how a
decision is carried out.
"""

from __future__ import annotations

import enum

from .token import Token


class Renewal(enum.Enum):
    """What to do when the upstream rejected a token."""

    USE_CURRENT = "use_current"  # someone already refreshed: resend with the current token
    REFRESH = "refresh"  # join or start the one refresh
    GIVE_UP = "give_up"  # a new token would not help: pass the answer through


def decide_renewal(
    seen_generation: int,
    current: Token | None,
    now: float,
    min_refresh_interval: float,
    challenge_error: str | None,
) -> Renewal:
    """Decide what a refresh status for a token of `seen_generation` calls for.

    "Already refreshed?" is answered by generation, never by the clock.
    """
    if current is not None and current.generation > seen_generation:
        return Renewal.USE_CURRENT
    if challenge_error is not None and challenge_error != "invalid_token":
        return Renewal.GIVE_UP
    if current is not None and now - current.obtained_at < min_refresh_interval:
        return Renewal.GIVE_UP
    return Renewal.REFRESH


def backoff_delay(failures: int, initial: float, cap: float) -> float:
    """Seconds to wait after `failures` consecutive failed refreshes.

    The exponent is bounded, so days of failures give the cap rather than an
    OverflowError inside the refresh task.
    """
    return min(cap, initial * 2.0 ** min(max(0, failures - 1), 64))
