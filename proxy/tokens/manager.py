"""The token manager: the current token of one credential, and when to replace it.

Owns: the token cache (the current `Token`, the last generation issued, the
highest generation the upstream refused), the renewal decision carried out
(refresh-ahead, `renew` after a refresh status), and the refresh itself:
fetch from the grant, save, then publish. Wires the parts that own the rest:
the single flight with its bounded waiters (flight.py), the failure and
back-off state (failures.py), the right to refresh among peers
(coordination.py) and the store the state survives a restart in (store.py).
While the credential is in `login_required`, a request has the saved state
looked at again (at most once per second, through the same coordination
as a refresh) so that a `tokenproxy login` run meanwhile is taken up
without a restart; a healthy credential never does this.
Knows nothing of client requests or of which grant is used beyond its name.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..auth.grants import BadAnswer, Grant, TokenResponse
from ..auth.protocol import RequestShape
from ..core.errors import GrantError, LoginRequired, ShuttingDown, StoreUnavailable, TokenUnavailable
from ..core.renewal import Renewal, decide_renewal
from ..core.token import Token, expiry_of, fingerprint, lifetime_floor, lifetime_warning, make_token, sendable
from ..observe.log import CredentialLog, refresh_fields
from ..observe.metrics import NULL_METRICS, Recorder
from .change import Reconfigured, TokenChange, decide_change
from .coordination import Coordination, CoordinationUnavailable, InProcessCoordination, RefreshRight, RefreshRightLost
from .explain import renewal_reason, why_wait
from .failures import FailureState
from .flight import Outcome, SingleFlight
from .store import SavedState, Store

_logger = logging.getLogger("tokenproxy.tokens")

Clock = Callable[[], float]


@dataclass(frozen=True)
class RefreshPolicy:
    """The token manager's bounds and timings, from the config (which alone holds their defaults)."""

    refresh_before: float
    min_refresh_interval: float
    default_lifetime: float
    timeout: float
    backoff_initial: float
    backoff_max: float
    max_waiting: int
    wait_timeout: float


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
    obtained: bool  # a token was fetched, adopted or resumed still valid since the process started
    store_unavailable: bool = False  # the last refresh was refused for the shared store, and it is still down


class TokenManager:
    """The current token for one credential, and the one refresh that replaces it.

    Safe to call from many requests at once; at most one refresh runs at a
    time (among peers too, under the coordination). All state is changed
    only on the event loop thread, so no lock is needed.
    """

    def __init__(
        self,
        grant: Grant,
        store: Store,
        policy: RefreshPolicy,
        *,
        refresh_token: str | None = None,
        credential: str = "",
        request: RequestShape = (),
        clock: Clock = time.time,
        metrics: Recorder = NULL_METRICS,
        coordination: Coordination | None = None,
    ) -> None:
        self._metrics = metrics
        self._log = CredentialLog(_logger)
        self._grant = grant
        self._store = store
        self._coordination = coordination if coordination is not None else InProcessCoordination(store)
        self._policy = policy
        self._clock = clock
        self._credential = credential
        self._request = request  # what the grant's token request carries (its shape, no secret)
        self._seed = fingerprint(refresh_token) if refresh_token else ""
        self._registered = ""  # the client a login registered, from the state file
        self._refresh_token = refresh_token or None
        self._token: Token | None = None
        self._generation = 0  # last generation issued; never goes back, even across a reload
        self._login = 0  # grows when a reload changes the credential: a refresh begun before is void
        self._reshaped = 0  # grows when a reload changes the token request: a token fetched before is not used
        # The highest generation the upstream refused with a refresh status; 0 = none.
        self._rejected = 0
        # True once a token was fetched, adopted or resumed still valid: the credential has worked.
        self._obtained = False
        # Set by refresh_now() for the refresh it starts: call the endpoint even when a peer saved a newer token.
        self._fetch_required = False
        # Set for the refresh started to look for a new login while login_required: it calls the endpoint only
        # if the saved state holds one.
        self._looking = False
        # How many tokens were adopted from a peer: tells a refresh that adopted from one that fetched.
        self._adoptions = 0
        # The last refresh was refused because the shared store is down (StoreUnavailable).
        self._store_refused = False
        self._flight = SingleFlight(self._refresh)
        self._failures = FailureState(policy.backoff_initial, policy.backoff_max, self._log)

    # -- start-up, reload and shut-down -----------------------------------------

    def name_in_logs(self, name: str) -> None:
        """Name the credential in this manager's log lines from now on (several credentials), or not (`""`)."""
        self._log.credential = name

    def resume(self) -> None:
        """Adopt the saved state if it belongs to this credential and login.

        A configured refresh token different from the one the saved chain
        started from means a new login: the configured one wins.
        """
        state = self._store.load()
        if state is None or not self._belongs(state):
            return
        self._take_chain(state)
        if not state.access_token and not state.refresh_token:
            self._log.info("the state file holds no tokens (logged out): run `tokenproxy login`")
            return
        if not state.access_token:
            # Saved from an answer that rotated the refresh token but gave no usable access token.
            self._log.info("resumed the refresh token from the state file; no access token yet")
            return
        self._token = self._token_of(state)
        self._obtained = self._token.usable_at(self._clock())
        left = state.expires_at - self._clock()
        self._log.info(
            "resumed token %s generation %d from state file, %s",
            self._token.fingerprint,
            state.generation,
            f"expires in {left:.0f}s" if left >= 0 else f"expired {-left:.0f}s ago (a new one is fetched when needed)",
        )

    def reconfigure(
        self,
        grant: Grant,
        policy: RefreshPolicy,
        *,
        refresh_token: str | None,
        credential: str,
        request: RequestShape,
        fetch_now: bool = False,
    ) -> Reconfigured:
        """Take a reloaded configuration; says whether the current token was kept, and if not, why (change.py).

        Another credential or login drops the current token and its refresh-token
        chain; another token request (scope, audience...) drops the token and
        keeps the chain. The next request (or at once, with `fetch_now`) waits
        for a new token: the dropped one is not sent again. Failures and
        back-off are forgotten. A refresh in flight finishes with the grant it
        started with; if what it asked for changed, its token is discarded (a
        rotated refresh token of the same chain is kept) and its waiters get
        503 token_unavailable.
        """
        seed = fingerprint(refresh_token) if refresh_token else ""
        outcome = decide_change(
            self._credential, self._seed, self._request, new_credential=credential, new_seed=seed, new_request=request
        )
        change = outcome.change
        self._grant = grant
        self._policy = policy
        self._request = request
        if change in (TokenChange.CREDENTIAL, TokenChange.LOGIN):
            self._login += 1
            self._credential = credential
            self._seed = seed
            self._refresh_token = refresh_token or None
            self._token = None
        elif change is TokenChange.REQUEST:
            self._reshaped += 1
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
        self._failures = FailureState(policy.backoff_initial, policy.backoff_max, self._log)
        if change is not TokenChange.KEPT and fetch_now and not self._flight.running and not self._flight.closed:
            self._flight.start()
        return outcome

    async def close(self) -> None:
        """Answer every waiter with `shutting_down` and stop a refresh in flight."""
        await self._flight.close(self._policy.timeout)
        closing = getattr(self._coordination, "aclose", None)  # a coordination with connections of its own
        if closing is not None:
            await closing()

    # -- the two calls requests make -------------------------------------------

    async def get(self) -> Token:
        """The token to send now; waits only when there is no usable token.

        Near expiry it starts a background refresh and still returns the
        current token (refresh-ahead: no request waits). A token the upstream
        has already refused is not handed out while its replacement is on the
        way: the request waits in the queue for it instead.
        """
        token = self.token_now()
        if token is not None:
            return token
        return await self._await_refresh()

    def token_now(self) -> Token | None:
        """The token `get()` would hand out without waiting, or None when a request would have to wait for one.

        For the forwarder's callback path, which cannot wait; starts the
        refresh-ahead as `get()` does.
        """
        now = self._clock()
        token = self._token
        if token is None or now >= token.usable_until:  # Token.usable_at, without a call
            return None
        if token.generation <= self._rejected and self._flight.running:
            return None
        if now >= token.refresh_at and not self._flight.running and self._may_refresh(now):
            if self._log.isEnabledFor(logging.DEBUG):
                self._log.debug(
                    "refresh starts grant=%s: token %s generation %d expires in %.0fs (token.refresh_before %gs)",
                    self._grant.name,
                    token.fingerprint,
                    token.generation,
                    token.expires_at - now,
                    self._policy.refresh_before,
                )
            self._flight.start()
        return token

    async def refresh_now(self) -> Token:
        """A token fetched from the token endpoint now, whatever the cache or a peer holds: proof the credential works.

        Meant for a manager that no request uses (the `check` command). The
        refresh is an ordinary one: under the coordination, presenting the
        newest refresh token (a peer's, if it rotated it meanwhile), saved
        before it is returned. Raises like `get()` when no token can be had.
        """
        self._fetch_required = True
        return await self._await_refresh()

    async def renew(self, seen: Token, challenge_error: str | None) -> Token | None:
        """A token to resend with after the upstream rejected `seen`, or None to pass the answer through.

        Raises QueueFull, QueueTimeout or ShuttingDown when the request cannot
        wait; a failed refresh gives None (the client gets the upstream's answer).
        """
        decision = decide_renewal(
            seen.generation, self._token, self._clock(), self._policy.min_refresh_interval, challenge_error
        )
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug(
                "%s", renewal_reason(decision, seen, self._token, challenge_error, self._policy.min_refresh_interval)
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
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug(
                "%s", renewal_reason(decision, seen, self._token, challenge_error, self._policy.min_refresh_interval)
            )
        if decision is not Renewal.REFRESH:
            return
        self._rejected = max(self._rejected, seen.generation)
        if not self._flight.running and self._may_refresh(now):
            self._flight.start()

    def status(self) -> ManagerStatus:
        """What the manager knows now, without any token value."""
        token = self._token
        failures = self._failures
        usable = token is not None and token.usable_at(self._clock())
        # Requests fail meanwhile only when the token held is expired or was refused by the upstream.
        blocked = not usable or (token is not None and token.generation <= self._rejected)
        return ManagerStatus(
            generation=token.generation if token else None,
            fingerprint=token.fingerprint if token else None,
            expires_at=token.expires_at if token else None,
            usable=usable,
            refreshing=self._flight.running,
            waiting=self._flight.waiting,
            backoff_until=failures.backoff_until,
            failures=failures.failures,
            last_error=failures.last_error.code if failures.last_error else None,
            dead=failures.final.code if failures.final else None,
            obtained=self._obtained,
            store_unavailable=(
                blocked and self._store_refused and getattr(self._coordination, "mode", "") == "unavailable"
            ),
        )

    @property
    def waiting(self) -> int:
        """How many requests wait for a token right now."""
        return self._flight.waiting

    @property
    def coordination(self) -> Coordination:
        """How this credential's refreshes are coordinated with peers (for /status)."""
        return self._coordination

    @property
    def grant_name(self) -> str:
        """The configured grant's name, for logs and metrics."""
        return self._grant.name

    # -- internals --------------------------------------------------------------

    def _may_refresh(self, now: float) -> bool:
        return self._failures.may_refresh(now) and not self._flight.closed

    async def _await_refresh(self) -> Token:
        flight = self._flight
        if flight.closed:
            raise ShuttingDown("tokenproxy is shutting down")
        failures = self._failures
        if failures.login_required:
            # No refresh starts under a final failure, so one running now is a look: wait for it with the rest.
            if not flight.running:
                if not failures.look_again(self._clock()):
                    failures.refuse(self._clock(), refreshing=False)
                self._looking = True
                flight.start()
        else:
            failures.refuse(self._clock(), refreshing=flight.running)
        if not flight.running and self._log.isEnabledFor(logging.DEBUG):
            self._log.debug(
                "refresh starts grant=%s: %s", self._grant.name, why_wait(self._token, self._rejected, self._clock())
            )
        policy = self._policy
        return await flight.join(max_waiting=policy.max_waiting, wait_timeout=policy.wait_timeout)

    def _belongs(self, state: SavedState) -> bool:
        """True when `state` was saved for this credential and login (the refresh token it started from)."""
        return state.credential == self._credential and (not self._seed or state.seed == self._seed)

    def _peer_moved_on(self, peer: SavedState) -> bool:
        """True when `peer` (saved for this credential) is ahead of what this process holds.

        Ahead: a higher generation, or the same generation with another refresh
        token (a save that only rotated it). A lower generation is a file this
        process got ahead of (its own save failed): what it holds is newer.
        """
        if peer.generation != self._generation:
            return peer.generation > self._generation
        return peer.refresh_token is not None and peer.refresh_token != self._refresh_token

    def _take_chain(self, state: SavedState) -> None:
        """Continue the refresh-token chain and the generations `state` (which belongs here) was saved with.

        Generations are global among the processes sharing the state: the next
        token's is one more than the highest seen, this process's or a peer's.
        A newer state with no token at all is a `tokenproxy logout`: the
        refresh token held here is dropped too, never presented again.
        """
        self._seed = state.seed
        self._registered = state.client_id  # kept through every save: the chain's tokens are that client's
        if state.refresh_token:
            self._refresh_token = state.refresh_token
        elif not state.access_token and state.generation > self._generation:
            self._refresh_token = None
        self._generation = max(self._generation, state.generation)

    def _logged_in_again(self, peer: SavedState | None) -> bool:
        """True when `peer` is a login saved since login_required: newer, this credential's, and holding a refresh
        token other than the one refused or an access token still usable that the upstream has not refused."""
        if peer is None or not self._belongs(peer) or not self._peer_moved_on(peer):
            return False
        if peer.refresh_token and peer.refresh_token != self._refresh_token:
            return True
        return (
            bool(peer.access_token)
            and peer.generation > self._rejected
            and (self._token_of(peer).usable_at(self._clock()))
        )

    def _token_of(self, state: SavedState) -> Token:
        return make_token(
            state.access_token,
            state.expires_at,
            state.obtained_at,
            state.generation,
            self._policy.refresh_before,
            lifetime_floor(self._policy.min_refresh_interval),
        )

    async def _refresh(self) -> Outcome:
        """The one refresh, under the right to refresh; its metrics. Returns the error instead of raising it.

        A look for a new login (while login_required) that finds none returns
        that failure again: the token endpoint is not called, nothing is counted.
        """
        timer = time.perf_counter()
        login, reshaped = self._login, self._reshaped
        looking, self._looking = self._looking, False
        adoptions = self._adoptions
        try:
            async with self._coordination.refresh_right(self._credential) as right:
                peer = await right.peer_state()
                if looking and (final := self._failures.final) is not None and self._failures.login_required:
                    if not self._logged_in_again(peer):
                        return final.again()
                    assert peer is not None
                    self._log.info(
                        "found a new login (generation %d) in the saved state: login_required is over", peer.generation
                    )
                    self._failures.logged_in()
                result = await self._fetch_and_publish(right, peer, login, reshaped, timer)
        except StoreUnavailable as exc:
            # The shared store is down and the grant rotates its refresh token: no refresh, no back-off.
            result = exc
        except CoordinationUnavailable as exc:
            if looking and (final := self._failures.final) is not None and self._failures.login_required:
                self._log.warning("could not look for a new login in the saved state (%s)", exc.reason)
                return final.again()
            result = self._failures.failed(
                GrantError(exc.reason),
                self._clock(),
                self._grant.name,
                rotated=False,
                duration=time.perf_counter() - timer,
            )
        self._store_refused = isinstance(result, StoreUnavailable)
        outcome = result.code if not isinstance(result, Token) else "ok" if self._adoptions == adoptions else "adopted"
        self._metrics.refresh_done(self._grant.name, outcome, time.perf_counter() - timer)
        return result

    async def _fetch_and_publish(
        self, right: RefreshRight, peer: SavedState | None, login: int, reshaped: int, timer: float
    ) -> Outcome:
        """Fetch a token (or adopt `peer`'s, the saved state read under `right`), save and publish it; `timer` is
        the refresh's perf_counter start."""
        fetch_required, self._fetch_required = self._fetch_required, False
        started = self._clock()
        if peer is not None and self._belongs(peer) and self._peer_moved_on(peer):
            # A peer refreshed (or only rotated the refresh token) while this process waited for the
            # right, spending the refresh token held here: continue from its state.
            newer = peer.generation > self._generation
            self._take_chain(peer)
            if newer and not peer.access_token and not peer.refresh_token:
                # `tokenproxy logout`: the token held here goes too; the grant says what is left (login_required).
                self._log.warning(
                    "the state file says the credential was logged out (tokenproxy logout); "
                    "requests get 503 login_required until `tokenproxy login`"
                )
                self._token = None
            if (
                newer
                and not fetch_required
                and peer.access_token
                and peer.generation > self._rejected  # never adopt a token the upstream refused
                and (adopted := self._token_of(peer)).usable_at(started)  # nor a stale one
            ):
                return self._adopt(adopted, time.perf_counter() - timer)
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
        except Exception as exc:  # noqa: BLE001 (logged, with its traceback at debug)
            self._log.error(
                "refresh failed unexpectedly (%s)", type(exc).__name__, exc_info=self._log.isEnabledFor(logging.DEBUG)
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
            except Exception as exc:  # noqa: BLE001 a defect in reading the answer must still be a logged, backed-off failure
                self._log.error(
                    "reading the token answer failed unexpectedly (%s)",
                    type(exc).__name__,
                    exc_info=self._log.isEnabledFor(logging.DEBUG),
                )
                error = GrantError(f"internal error reading the answer ({type(exc).__name__})")
        if rotated:
            # The endpoint has spent the refresh token presented: the rotated one is the
            # only one left, whatever else is wrong with the answer. Present it next.
            self._refresh_token = rotated
        if reshaped != self._reshaped:
            # A reload changed the token request while this refresh ran: its token answers the old
            # request and is not used; a rotated refresh token continues the same chain and is kept.
            if rotated:
                await self._save(right, self._state(self._token))
            return TokenUnavailable("the token request changed during the refresh; retry", retry_after=1)
        if token is None:
            if rotated:
                # Persisted with the current token (if any), so a restart presents it too.
                await self._save(right, self._state(self._token))
            failure = error or GrantError("no token in the answer")
            return self._failures.failed(
                failure, self._clock(), self._grant.name, rotated=bool(rotated), duration=time.perf_counter() - timer
            )
        return await self._publish(right, token, rotated=bool(rotated), timer=timer)

    def _token_from(self, response: TokenResponse, started: float) -> Token:
        """The next Token from a token answer, or GrantError when the answer cannot give one."""
        if not sendable(response.access_token):
            # A control character or a space would break (or inject into) the request head.
            raise GrantError("the access token has characters a header cannot carry")
        expires_at = expiry_of(response, started, self._policy.default_lifetime)
        floor = lifetime_floor(self._policy.min_refresh_interval)
        warning = lifetime_warning(expires_at, started, floor)
        if warning is not None:
            self._log.warning("refresh grant=%s: %s", self._grant.name, warning)
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
            client_id=self._registered,
        )

    async def _save(self, right: RefreshRight, state: SavedState) -> None:
        try:
            await right.save(state)
        except OSError as exc:
            self._log.error("could not write the state file (%s); the new token is kept in memory only", exc.strerror)
        except RefreshRightLost:
            self._log.error("lost the right to refresh before saving; the new token is kept in memory only")

    async def _publish(self, right: RefreshRight, token: Token, *, rotated: bool, timer: float) -> Token:
        # Saved before it is published, so a rotated refresh token survives a crash.
        await self._save(right, self._state(token))
        self._token = token
        self._generation = token.generation
        self._obtained = True
        self._failures.succeeded()
        self._metrics.token_source("own")
        duration = time.perf_counter() - timer
        expires_in = token.expires_at - self._clock()
        self._log.info(
            "refresh ok grant=%s token=%s generation=%d expires_in=%.0fs rotated=%s duration=%.1fms",
            self._grant.name,
            token.fingerprint,
            token.generation,
            expires_in,
            "yes" if rotated else "no",
            duration * 1000.0,
            extra=refresh_fields(
                self._grant.name,
                "ok",
                fingerprint=token.fingerprint,
                generation=token.generation,
                expires_in=expires_in,
                duration=duration,
                rotated=rotated,
            ),
        )
        return token

    def _adopt(self, token: Token, duration: float) -> Token:
        """Publish a token a peer fetched and saved: the endpoint is not called, nothing is saved again."""
        self._token = token
        self._obtained = True
        self._adoptions += 1
        self._failures.succeeded()
        self._metrics.token_source("adopted")
        expires_in = token.expires_at - self._clock()
        self._log.info(
            "adopted token %s generation %d that another process fetched, expires_in=%.0fs",
            token.fingerprint,
            token.generation,
            expires_in,
            extra=refresh_fields(
                self._grant.name,
                "adopted",
                fingerprint=token.fingerprint,
                generation=token.generation,
                expires_in=expires_in,
                duration=duration,
            ),
        )
        return token


def credential_id(*parts: str) -> str:
    """A fingerprint of what identifies a credential (token URL, client id, grant)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
