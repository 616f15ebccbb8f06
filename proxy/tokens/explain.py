"""The words of the token manager's debug lines: why a refresh starts, or why it does not.

Owns: turning the renewal decision and the token cache's state into a
sentence a person reads at `log.level = "debug"`, naming tokens only by
fingerprint and generation. Pure functions; knows nothing of logging set-up,
requests or grants.
"""

from __future__ import annotations

from ..core.renewal import Renewal
from ..core.token import Token


def why_wait(token: Token | None, rejected: int, now: float) -> str:
    """Why a request must wait for a new token: none yet, the upstream refused it, or it expired."""
    if token is None:
        return "no token yet"
    if token.generation <= rejected:
        return f"the upstream rejected token {token.fingerprint} generation {token.generation}"
    return f"token {token.fingerprint} generation {token.generation} expired {now - token.expires_at:.0f}s ago"


def renewal_reason(
    decision: Renewal, seen: Token, current: Token | None, challenge_error: str | None, min_refresh_interval: float
) -> str:
    """What a refresh status for a request sent with `seen` leads to (`decision`), and why."""
    rejected = f"the upstream rejected token {seen.fingerprint} generation {seen.generation}"
    error = f"error={challenge_error}" if challenge_error else "no error given"
    if decision is Renewal.USE_CURRENT and current is not None:
        why = f"already renewed: generation {current.generation} ({current.fingerprint}) is used instead"
    elif decision is Renewal.REFRESH:
        why = "refreshing"
    elif challenge_error is not None and challenge_error != "invalid_token":
        why = "not refreshing: a new token would not answer this challenge; the answer is passed on"
    else:
        why = (
            f"not refreshing: the token is younger than token.min_refresh_interval ({min_refresh_interval:g}s); "
            "the answer is passed on"
        )
    return f"{rejected} ({error}): {why}"
