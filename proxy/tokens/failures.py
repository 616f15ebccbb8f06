"""What failed refreshes leave behind: back-off, the last error, the final failure.

Owns: the count of consecutive failed refreshes, the back-off deadline that
makes requests fail fast meanwhile, the last error (for /status), and the
final failure (a rejected refresh token, a configuration no retry can fix)
after which no refresh is tried until a reload, and when a `login_required`
one may be looked at again (a person may have run `tokenproxy login`
since). Maps a `FailureKind` to the
error requests get: `TokenUnavailable` or `LoginRequired`. Knows nothing of
how a token is fetched or of the requests waiting for one.
"""

from __future__ import annotations

import math

from ..core.errors import FailureKind, GrantError, LoginRequired, ProxyError, TokenUnavailable
from ..core.renewal import backoff_delay
from ..observe.log import CredentialLog, refresh_fields

# While login_required, how often (seconds) a request may have the saved state looked at again for a new login.
LOOK_INTERVAL = 1.0


class FailureState:
    """The failure and back-off state of one credential under one configuration.

    A reload replaces it whole: failures are about the configuration that
    caused them. Changed only on the event loop thread, by the refresh that
    ended (`succeeded`, `failed`).
    """

    def __init__(self, backoff_initial: float, backoff_max: float, log: CredentialLog) -> None:
        self._log = log
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._failures = 0
        self._backoff_until = 0.0
        self._last_error: ProxyError | None = None
        self._final: ProxyError | None = None
        self._next_look = 0.0  # wall-clock time before which a login_required failure is not looked at again

    @property
    def failures(self) -> int:
        """Consecutive failed refreshes since the last good one."""
        return self._failures

    @property
    def backoff_until(self) -> float:
        """Wall-clock time before which no refresh is tried (0 when not backing off)."""
        return self._backoff_until

    @property
    def last_error(self) -> ProxyError | None:
        """The error of the last refresh, if it failed."""
        return self._last_error

    @property
    def final(self) -> ProxyError | None:
        """The failure no retry can fix (login_required, token_unavailable), if there was one."""
        return self._final

    @property
    def login_required(self) -> bool:
        """True when the final failure is `login_required`: only a new login (or a reload) can end it."""
        return isinstance(self._final, LoginRequired)

    def look_again(self, now: float) -> bool:
        """True when, at `now`, the saved state may be looked at for a new login: while login_required, at
        most once per LOOK_INTERVAL (counted from the failure, then from each look)."""
        if not self.login_required or now < self._next_look:
            return False
        self._next_look = now + LOOK_INTERVAL
        return True

    def logged_in(self) -> None:
        """A new login was found in the saved state: the login_required failure is over, and so is the rest."""
        self._final = None
        self.succeeded()

    def may_refresh(self, now: float) -> bool:
        """True when a refresh may start at `now`: no final failure and not backing off."""
        return self._final is None and now >= self._backoff_until

    def refuse(self, now: float, *, refreshing: bool) -> None:
        """Raise what a request that needs a new token gets at `now`, if it may not wait for one.

        A final failure refuses always; back-off refuses only while no refresh
        is under way (one that is, started before the failure state said no).
        """
        if self._final is not None:
            self._log.debug("no refresh: the last one failed for good (%s); reload the config", self._final.detail)
            raise self._final.again()
        if not refreshing and now < self._backoff_until:
            last = self._last_error.detail if self._last_error else "the last refresh failed"
            self._log.debug(
                "no refresh: backing off for %.1fs after %d failed refreshes (%s)",
                self._backoff_until - now,
                self._failures,
                last,
            )
            raise TokenUnavailable(
                f"{last}; next attempt in {self._backoff_until - now:.1f}s",
                retry_after=math.ceil(self._backoff_until - now),
            )

    def succeeded(self) -> None:
        """A refresh gave a token: back-off and the last error are forgotten."""
        self._failures = 0
        self._backoff_until = 0.0
        self._last_error = None

    def failed(self, exc: GrantError, now: float, grant: str, *, rotated: bool, duration: float) -> ProxyError:
        """Record a failed refresh and log it; the error its waiters get.

        A transient failure backs off exponentially (capped); any other kind
        is final until a reload. `duration` is how long the refresh took, for the log line.
        """
        error: ProxyError
        if exc.kind is not FailureKind.TRANSIENT:
            error = (
                LoginRequired(
                    f"the refresh token was rejected ({exc.oauth_error}); log in again"
                    if exc.oauth_error
                    else f"{exc.reason}; log in again"
                )
                if exc.kind is FailureKind.LOGIN_REQUIRED
                else TokenUnavailable(f"{exc.reason}; fix the configuration and restart")
            )
            self._final = error
            self._next_look = now + LOOK_INTERVAL
            self._log.error(
                "refresh failed for good grant=%s reason=%s",
                grant,
                exc.reason,
                extra=refresh_fields(grant, error.code, duration=duration, reason=exc.reason, rotated=rotated),
            )
        else:
            self._failures += 1
            delay = backoff_delay(self._failures, self._backoff_initial, self._backoff_max)
            self._backoff_until = now + delay
            error = TokenUnavailable(exc.reason, retry_after=math.ceil(delay))
            self._log.warning(
                "refresh failed grant=%s reason=%s failures=%d retry_in=%.1fs rotated=%s",
                grant,
                exc.reason,
                self._failures,
                delay,
                "yes (kept for the next refresh)" if rotated else "no",
                extra=refresh_fields(
                    grant,
                    error.code,
                    duration=duration,
                    reason=exc.reason,
                    failures=self._failures,
                    retry_in=delay,
                    rotated=rotated,
                ),
            )
        self._last_error = error
        return error
