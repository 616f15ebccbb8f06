"""The token manager: the current token, one refresh at a time, bounded waiting.

Owns: the `Token` value, the decision of what to do with a refresh status
(a pure function of generations, age and the challenge), and the
`TokenManager` that carries it out: refresh-ahead, single-flight refresh,
at most `max_waiting` waiters, back-off after failures, persisting a new
token before anyone uses it. Knows nothing of client requests or of which
grant is used beyond its name.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt

from ..auth.grants import BadAnswer, Grant, TokenResponse
from ..core.errors import (
    FailureKind,
    GrantError,
    LoginRequired,
    ProxyError,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    TokenUnavailable,
)
from ..observe.log import fingerprint
from ..observe.metrics import Metrics
from .store import SavedState, Store

logger = logging.getLogger("tokenproxy.tokens")

# What an access token may consist of to be sent as `Bearer <token>`: visible ASCII (RFC 6750 §2.1 is stricter).
_SENDABLE = re.compile(r"[\x21-\x7e]+")

Clock = Callable[[], float]

# The least lifetime a token is scheduled by, whatever `min_refresh_interval` says (it may be 0):
# a token endpoint handing out tokens dead on arrival costs at most one call per floor.
MIN_LIFETIME_FLOOR = 1.0


@dataclass(frozen=True, slots=True)
class Token:
    """An access token and what is known of it. Immutable; a refresh makes a new one."""

    value: str
    expires_at: float  # wall-clock seconds
    obtained_at: float
    generation: int  # grows by one with every successful refresh
    usable_until: float  # expires_at less a small leeway: never sent after this
    refresh_at: float  # from here on a background refresh starts
    header: str  # "Bearer <value>", built once per generation
    fingerprint: str

    def usable_at(self, now: float) -> bool:
        """True while the token may still be sent upstream."""
        return now < self.usable_until

    def __repr__(self) -> str:
        return f"Token(generation={self.generation}, fingerprint={self.fingerprint})"


def make_token(
    value: str,
    expires_at: float,
    obtained_at: float,
    generation: int,
    refresh_before: float,
    floor: float = 0.0,
) -> Token:
    """Build a Token, choosing the send deadline and the refresh-ahead point.

    The leeway (at most 1 s or a tenth of the lifetime) keeps a token from
    arriving expired at an API that checks `exp` with no clock skew; the
    refresh-ahead point is never earlier than half the lifetime, so a short
    lifetime cannot cause back-to-back refreshes.

    A token whose lifetime is shorter than `floor` (already expired by this
    clock, a skewed clock, a nonsense `expires_in`) is sent, and not replaced
    by the clock, until `floor` seconds after it was obtained: a broken or
    skewed server costs one token call per `floor`, not one per request.
    `expires_at` stays what the answer said.
    """
    if expires_at - obtained_at < floor:
        usable_until = refresh_at = obtained_at + floor
    else:
        lifetime = max(0.0, expires_at - obtained_at)
        usable_until = expires_at - min(1.0, lifetime * 0.1)
        refresh_at = expires_at - min(refresh_before, lifetime * 0.5)
    return Token(
        value=value,
        expires_at=expires_at,
        obtained_at=obtained_at,
        generation=generation,
        usable_until=usable_until,
        refresh_at=refresh_at,
        header=f"Bearer {value}",
        fingerprint=fingerprint(value),
    )


def lifetime_floor(min_refresh_interval: float) -> float:
    """The least lifetime a new token is scheduled by: `min_refresh_interval`, and never under 1 s."""
    return max(min_refresh_interval, MIN_LIFETIME_FLOOR)


def expiry_of(response: TokenResponse, obtained_at: float, default_lifetime: float) -> float:
    """When the token expires: `expires_in`, else the JWT's `exp`, else the default lifetime.

    A zero, negative or missing `expires_in` says nothing (the JWT's `exp` or the
    default decides). An `exp` that is not a number is ignored; one that is a
    number but not a finite one (NaN, Infinity, 400 digits) makes the answer
    malformed: GrantError. An `exp` in the past is returned as it is (the
    caller warns and applies the floor).
    """
    if response.expires_in is not None and response.expires_in > 0:
        return obtained_at + response.expires_in
    try:
        claims = jwt.decode(response.access_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = None
    if isinstance(claims, dict):
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            try:
                seconds = float(exp)
            except OverflowError:
                seconds = math.inf
            if not math.isfinite(seconds):
                raise GrantError("the access token's exp claim is not a finite number")
            return seconds
    return obtained_at + default_lifetime


def lifetime_warning(expires_at: float, obtained_at: float, floor: float) -> str | None:
    """Why a new token's stated expiry is not the one it is scheduled by, or None when it is."""
    lifetime = expires_at - obtained_at
    if lifetime >= floor:
        return None
    if lifetime <= 0:
        return (
            f"the new token was already expired when it arrived ({abs(lifetime):.0f}s ago by this machine's clock): "
            f"the token server's clock or this one is wrong (clock skew); using it for {floor:g}s"
        )
    return (
        f"the new token lives {lifetime:.3g}s, less than {floor:g}s (min_refresh_interval, at least 1s); "
        f"if the token server's clock differs from this one (clock skew), fix it; using it for {floor:g}s"
    )


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


@dataclass(frozen=True)
class RefreshPolicy:
    """The token manager's bounds and timings, from the config."""

    refresh_before: float = 30.0
    min_refresh_interval: float = 5.0
    default_lifetime: float = 300.0
    timeout: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_waiting: int = 1000
    wait_timeout: float = 30.0


@dataclass(frozen=True)
class ManagerStatus:
    """A read-only snapshot for health checks and people."""

    generation: int | None
    fingerprint: str | None
    expires_at: float | None
    usable: bool
    refreshing: bool
    waiting: int
    backoff_until: float
    failures: int
    last_error: str | None  # code of the last failure, if the last refresh failed
    dead: str | None  # code of a final failure (login_required, token_unavailable)


def _outcome(task: asyncio.Task[Token | ProxyError]) -> Token | ProxyError:
    """What a finished refresh gives its waiters (it returns errors rather than raising them)."""
    if task.cancelled():
        return ShuttingDown("tokenproxy is shutting down")
    error = task.exception()
    if error is not None:
        return TokenUnavailable(f"internal error ({type(error).__name__})")
    return task.result()


def _wake(waiters: set[asyncio.Future[Token | ProxyError]], outcome: Token | ProxyError) -> None:
    """Hand `outcome` to every waiter still waiting, in one pass."""
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(outcome)
    waiters.clear()


class TokenManager:
    """The current token for one credential, and the one refresh that replaces it.

    Safe to call from many requests at once; at most one refresh runs at a
    time. All state below is owned by this object and changed only on the
    event loop thread, so no lock is needed: the single-flight guard is the
    `_refresh_task` slot, read and set with no await in between.
    """

    def __init__(
        self,
        grant: Grant,
        store: Store,
        policy: RefreshPolicy,
        *,
        refresh_token: str | None = None,
        credential: str = "",
        clock: Clock = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._grant = grant
        self._store = store
        self._policy = policy
        self._clock = clock
        self._credential = credential
        self._seed = fingerprint(refresh_token) if refresh_token else ""
        self._refresh_token = refresh_token or None
        self._token: Token | None = None
        self._generation = 0  # last generation issued; never goes back, even across a reload
        self._login = 0  # grows when a reload changes the credential: a refresh begun before is void
        # The highest generation the upstream refused with a refresh status; 0 = none.
        self._rejected = 0
        self._refresh_task: asyncio.Task[Token | ProxyError] | None = None
        # The requests waiting for the refresh under way, each on a future of its own: the
        # refresh's end wakes them in one pass (asyncio.wait on one shared task would cost
        # O(waiters) per waiter to unhook, O(n²) in a storm of 10 000).
        self._refresh_waiters: set[asyncio.Future[Token | ProxyError]] = set()
        self._waiting = 0
        self._failures = 0
        self._backoff_until = 0.0
        self._last_error: ProxyError | None = None
        self._dead: ProxyError | None = None
        self._closing = False  # close() was called: no new waiting, no new refresh

    # -- start-up and shut-down -------------------------------------------------

    def resume(self) -> None:
        """Adopt the saved state if it belongs to this credential and login.

        A configured refresh token different from the one the saved chain
        started from means a new login: the configured one wins.
        """
        state = self._store.load()
        if state is None or state.credential != self._credential:
            return
        if self._seed and state.seed != self._seed:
            return
        self._seed = state.seed
        if state.refresh_token:
            self._refresh_token = state.refresh_token
        self._generation = state.generation
        if not state.access_token:
            # Saved from an answer that rotated the refresh token but gave no usable access token.
            logger.info("resumed the refresh token from the state file; no access token yet")
            return
        self._token = make_token(
            state.access_token,
            state.expires_at,
            state.obtained_at,
            state.generation,
            self._policy.refresh_before,
            lifetime_floor(self._policy.min_refresh_interval),
        )
        logger.info(
            "resumed token %s generation %d from state file, expires in %.0fs",
            self._token.fingerprint,
            state.generation,
            state.expires_at - self._clock(),
        )

    def reconfigure(self, grant: Grant, policy: RefreshPolicy, *, refresh_token: str | None, credential: str) -> bool:
        """Take a reloaded configuration; True when the current token still applies and is kept.

        A different credential (token URL, client, grant) or a newly configured
        refresh token (a new login) drops the current token; the next request
        fetches one. Final failures and back-off are forgotten either way: the
        configuration they were about has changed. A refresh already in flight
        finishes with the grant it started with; if the credential changed, its
        token is discarded and its waiters get 503 token_unavailable.
        """
        seed = fingerprint(refresh_token) if refresh_token else ""
        keep = credential == self._credential and (not seed or seed == self._seed)
        self._grant = grant
        self._policy = policy
        if not keep:
            self._login += 1
            self._credential = credential
            self._seed = seed
            self._refresh_token = refresh_token or None
            self._token = None
        elif self._token is not None:
            token = self._token
            self._token = make_token(
                token.value,
                token.expires_at,
                token.obtained_at,
                token.generation,
                policy.refresh_before,
                lifetime_floor(policy.min_refresh_interval),
            )
        self._dead = None
        self._failures = 0
        self._backoff_until = 0.0
        self._last_error = None
        return keep

    async def close(self) -> None:
        """Answer every waiter with `shutting_down` and stop a refresh in flight."""
        self._closing = True
        _wake(self._refresh_waiters, ShuttingDown("tokenproxy is shutting down"))
        task = self._refresh_task
        if task is not None and not task.done():
            # Let a refresh that is already talking to the endpoint finish and
            # persist a rotated refresh token; cancel it only if it hangs.
            done, _ = await asyncio.wait((task,), timeout=self._policy.timeout)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # -- the two calls requests make -------------------------------------------

    async def get(self) -> Token:
        """The token to send now; waits only when there is no usable token.

        Near expiry it starts a background refresh and still returns the
        current token (refresh-ahead: no request waits). A token the upstream
        has already refused is not handed out while its replacement is on the
        way: the request waits in the queue for it instead.
        """
        now = self._clock()
        token = self._token
        if token is not None and token.usable_at(now):
            if token.generation <= self._rejected and self._refresh_task is not None:
                return await self._await_refresh()
            if now >= token.refresh_at and self._refresh_task is None and self._may_refresh(now):
                self._start_refresh()
            return token
        return await self._await_refresh()

    async def renew(self, seen: Token, challenge_error: str | None) -> Token | None:
        """A token to resend with after the upstream rejected `seen`, or None to pass the answer through.

        Raises QueueFull, QueueTimeout or ShuttingDown when the request cannot
        wait; a failed refresh gives None (the client gets the upstream's answer).
        """
        decision = decide_renewal(
            seen.generation, self._token, self._clock(), self._policy.min_refresh_interval, challenge_error
        )
        if decision is Renewal.REFRESH:
            self._rejected = max(self._rejected, seen.generation)
        try:
            if decision is Renewal.USE_CURRENT:
                return await self.get()
            if decision is Renewal.REFRESH:
                return await self._await_refresh()
        except (TokenUnavailable, LoginRequired):
            return None
        return None

    def renew_later(self, seen: Token, challenge_error: str | None) -> None:
        """Start a refresh for a rejected token without waiting for it (the body could not be replayed)."""
        now = self._clock()
        decision = decide_renewal(seen.generation, self._token, now, self._policy.min_refresh_interval, challenge_error)
        if decision is not Renewal.REFRESH:
            return
        self._rejected = max(self._rejected, seen.generation)
        if self._refresh_task is None and self._may_refresh(now):
            self._start_refresh()

    def status(self) -> ManagerStatus:
        """What the manager knows now, without any token value."""
        token = self._token
        return ManagerStatus(
            generation=token.generation if token else None,
            fingerprint=token.fingerprint if token else None,
            expires_at=token.expires_at if token else None,
            usable=token is not None and token.usable_at(self._clock()),
            refreshing=self._refresh_task is not None,
            waiting=self._waiting,
            backoff_until=self._backoff_until,
            failures=self._failures,
            last_error=self._last_error.code if self._last_error else None,
            dead=self._dead.code if self._dead else None,
        )

    @property
    def waiting(self) -> int:
        """How many requests wait for a token right now."""
        return self._waiting

    @property
    def grant_name(self) -> str:
        """The configured grant's name, for logs and metrics."""
        return self._grant.name

    # -- internals --------------------------------------------------------------

    def _may_refresh(self, now: float) -> bool:
        return self._dead is None and now >= self._backoff_until and not self._closing

    async def _await_refresh(self) -> Token:
        if self._closing:
            raise ShuttingDown("tokenproxy is shutting down")
        if self._dead is not None:
            raise self._dead.again()
        task = self._refresh_task
        if task is None:
            now = self._clock()
            if now < self._backoff_until:
                last = self._last_error.detail if self._last_error else "the last refresh failed"
                raise TokenUnavailable(
                    f"{last}; next attempt in {self._backoff_until - now:.1f}s",
                    retry_after=math.ceil(self._backoff_until - now),
                )
        if self._waiting >= self._policy.max_waiting:
            raise QueueFull(
                f"{self._waiting} requests already wait for a token (queue.max_waiting)", retry_after=1
            )
        if task is None:
            self._start_refresh()
        waiters = self._refresh_waiters
        waiter: asyncio.Future[Token | ProxyError] = asyncio.get_running_loop().create_future()
        waiters.add(waiter)
        self._waiting += 1
        try:
            async with asyncio.timeout(self._policy.wait_timeout):
                result = await waiter
        except TimeoutError:
            raise QueueTimeout(
                f"no token within {self._policy.wait_timeout:g}s (queue.wait_timeout)", retry_after=1
            ) from None
        finally:
            self._waiting -= 1
            waiters.discard(waiter)
        if isinstance(result, ProxyError):
            raise result.again()
        return result

    def _start_refresh(self) -> asyncio.Task[Token | ProxyError]:
        task = asyncio.get_running_loop().create_task(self._refresh(), name="tokenproxy-refresh")
        waiters: set[asyncio.Future[Token | ProxyError]] = set()
        task.add_done_callback(lambda done: _wake(waiters, _outcome(done)))
        self._refresh_task = task
        self._refresh_waiters = waiters
        return task

    async def _refresh(self) -> Token | ProxyError:
        """The one refresh: fetch, persist, publish. Returns the error instead of raising it,
        so a refresh-ahead nobody awaits leaves no unretrieved exception."""
        timer = time.perf_counter()
        try:
            result = await self._fetch_and_publish()
        finally:
            self._refresh_task = None
        if self._metrics is not None:
            outcome = "ok" if isinstance(result, Token) else result.code
            self._metrics.refresh_done(self._grant.name, outcome, time.perf_counter() - timer)
        return result

    async def _fetch_and_publish(self) -> Token | ProxyError:
        started = self._clock()
        login = self._login
        response: TokenResponse | None = None
        error: GrantError | None = None
        rotated: str | None = None
        try:
            async with asyncio.timeout(self._policy.timeout):
                response = await self._grant.fetch(self._refresh_token)
        except TimeoutError:
            error = GrantError("token endpoint did not answer in time")
        except BadAnswer as exc:
            error, rotated = exc, exc.refresh_token
        except GrantError as exc:
            error = exc
        except Exception as exc:
            logger.error(
                "refresh failed unexpectedly (%s)", type(exc).__name__, exc_info=logger.isEnabledFor(logging.DEBUG)
            )
            error = GrantError(f"internal error ({type(exc).__name__})")
        if login != self._login:
            # A reload changed the credential while this refresh ran: its token (and a
            # rotated refresh token) belong to the old one and must not be used or saved.
            return TokenUnavailable("the configuration changed during the refresh; retry", retry_after=1)
        token: Token | None = None
        if response is not None:
            rotated = response.refresh_token
            try:
                token = self._token_from(response, started)
            except GrantError as exc:
                error = exc
            except Exception as exc:  # a defect in reading the answer must still be a logged, backed-off failure
                logger.error(
                    "reading the token answer failed unexpectedly (%s)",
                    type(exc).__name__,
                    exc_info=logger.isEnabledFor(logging.DEBUG),
                )
                error = GrantError(f"internal error reading the answer ({type(exc).__name__})")
        if rotated:
            # The endpoint has spent the refresh token presented: the rotated one is the
            # only one left, whatever else is wrong with the answer. Present it next.
            self._refresh_token = rotated
        if token is None:
            if rotated:
                # Persisted with the current token (if any), so a restart presents it too.
                await self._save(self._state(self._token))
            return self._failed(error or GrantError("no token in the answer"), started, rotated=bool(rotated))
        return await self._publish(token, rotated=bool(rotated))

    def _token_from(self, response: TokenResponse, started: float) -> Token:
        """The next Token from a token answer, or GrantError when the answer cannot give one."""
        if not _SENDABLE.fullmatch(response.access_token):
            # A control character or a space would break (or inject into) the request head.
            raise GrantError("the access token has characters a header cannot carry")
        expires_at = expiry_of(response, started, self._policy.default_lifetime)
        floor = lifetime_floor(self._policy.min_refresh_interval)
        warning = lifetime_warning(expires_at, started, floor)
        if warning is not None:
            logger.warning("refresh grant=%s: %s", self._grant.name, warning)
        return make_token(
            response.access_token, expires_at, started, self._generation + 1, self._policy.refresh_before, floor
        )

    def _state(self, token: Token | None) -> SavedState:
        """What the state file holds: the refresh token to present next, and `token` if there is one."""
        return SavedState(
            credential=self._credential,
            seed=self._seed,
            access_token=token.value if token else "",
            expires_at=token.expires_at if token else 0.0,
            obtained_at=token.obtained_at if token else 0.0,
            refresh_token=self._refresh_token,
            generation=token.generation if token else self._generation,
        )

    async def _save(self, state: SavedState) -> None:
        try:
            await asyncio.to_thread(self._store.save, state)
        except OSError as exc:
            logger.error("could not write the state file (%s); the new token is kept in memory only", exc.strerror)

    async def _publish(self, token: Token, *, rotated: bool) -> Token:
        # Persist before publishing, so a rotated refresh token survives a crash.
        await self._save(self._state(token))
        self._token = token
        self._generation = token.generation
        self._failures = 0
        self._backoff_until = 0.0
        self._last_error = None
        logger.info(
            "refresh ok grant=%s token=%s generation=%d expires_in=%.0fs rotated=%s",
            self._grant.name,
            token.fingerprint,
            token.generation,
            token.expires_at - self._clock(),
            "yes" if rotated else "no",
        )
        return token

    def _failed(self, exc: GrantError, started: float, *, rotated: bool = False) -> ProxyError:
        error: ProxyError
        if exc.kind is not FailureKind.TRANSIENT:
            error = (
                LoginRequired(f"the refresh token was rejected ({exc.oauth_error or exc.reason}); log in again")
                if exc.kind is FailureKind.LOGIN_REQUIRED
                else TokenUnavailable(f"{exc.reason}; fix the configuration and restart")
            )
            self._dead = error
            logger.error("refresh failed for good grant=%s reason=%s", self._grant.name, exc.reason)
        else:
            self._failures += 1
            delay = backoff_delay(self._failures, self._policy.backoff_initial, self._policy.backoff_max)
            self._backoff_until = self._clock() + delay
            error = TokenUnavailable(exc.reason, retry_after=math.ceil(delay))
            logger.warning(
                "refresh failed grant=%s reason=%s failures=%d retry_in=%.1fs rotated=%s",
                self._grant.name,
                exc.reason,
                self._failures,
                delay,
                "yes (kept for the next refresh)" if rotated else "no",
            )
        self._last_error = error
        return error


def credential_id(*parts: str) -> str:
    """A fingerprint of what identifies a credential (token URL, client id, grant)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
