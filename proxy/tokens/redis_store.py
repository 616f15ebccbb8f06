"""The Redis store: the token state and the right to refresh it, shared by replicas on many hosts.

Owns: the keys of a credential (`key_prefix + credential` holds its state,
`…:lease` the refresh lease, `…:saved` the channel a save is announced on),
the lease (`SET NX PX` with a random owner value, renewed by a task while the
refresh runs, released only by its owner), the compare-and-set save (only
the lease's owner may write, and never over a newer generation), waiting for
a peer's refresh (pub/sub, polling as the fallback), and what happens while
Redis is down: a grant that does not rotate a refresh token refreshes
locally; one that does answers `store_unavailable` rather than risk a reuse.
`token.state_file` stays this replica's local copy, written after Redis.

Knows nothing of grants (only whether the credential's refresh token
rotates), tokens' deadlines or requests. Touched only around a refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import asdict, dataclass, fields
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError
from redis.retry import Retry

from ..core.errors import StoreUnavailable
from ..observe.metrics import NULL_METRICS, Recorder
from .coordination import CoordinationUnavailable, RefreshRight, RefreshRightLost
from .store import SavedState, Store, UnsafeStateError

logger = logging.getLogger("tokenproxy.tokens")

# Every Redis call is bounded by this (connect, read, write): a Redis that hangs is a Redis that is down.
IO_TIMEOUT = 2.0
# After a failed call Redis is left alone this long: requests meanwhile get the fallback at once.
RETRY_DOWN = 1.0
# How often a replica waiting for a peer's refresh looks again when no notification came.
POLL_INTERVAL = 0.2
# A refresh is bounded by token.timeout; this only keeps the renewal loop finite.
_MAX_RENEWALS = 10_000

# Deletes the lease only when this replica still owns it, and wakes the replicas waiting for it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'released')
  return 1
end
return 0
"""
# Extends the lease only while this replica still owns it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Writes the state only for the lease's owner and never over a newer generation; -1 lease lost, -2 newer there.
_SAVE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return -1
end
local current = tonumber(redis.call('HGET', KEYS[1], 'generation') or '-1')
if current > tonumber(ARGV[2]) then
  return -2
end
redis.call('HSET', KEYS[1], 'generation', ARGV[2], 'state', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
"""

_STORE_ERRORS = (RedisError, OSError)
_KIND_WORDS = {
    "connection": "could not be reached",
    "timeout": "did not answer in time",
    "auth": "refused the credentials",
    "tls": "presented a TLS certificate that is not trusted (store.ca_file names the CA to trust)",
    "other": "answered with an error",
}


@dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis and how long a lease and a wait last ([store] and [queue].wait_timeout)."""

    url: str
    key_prefix: str
    lease_ttl: float
    wait_timeout: float
    rotating: bool  # the credential's grant rotates a refresh token: no refresh without Redis
    ca_file: str = ""


def redis_host(url: str) -> str:
    """`host:port` of a Redis URL, for messages: never the user or password."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}"


def error_kind(exc: BaseException) -> str:
    """What kind of store failure `exc` is: connection, timeout, auth, tls or other (the metric's bounded label)."""
    if _untrusted_certificate(exc):
        return "tls"
    if isinstance(exc, AuthenticationError | AuthorizationError) or (
        isinstance(exc, ResponseError) and str(exc).startswith(("WRONGPASS", "NOAUTH", "NOPERM", "AUTH"))
    ):
        return "auth"
    if isinstance(exc, redis.exceptions.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, redis.exceptions.ConnectionError | OSError):
        return "connection"
    return "other"


def _untrusted_certificate(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is a failed check of the server's certificate: redis-py wraps it, and
    keeps only its words in some versions."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _client_options(settings: RedisSettings, *, asynchronous: bool) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": IO_TIMEOUT,
        "socket_connect_timeout": IO_TIMEOUT,
        # Fail at once: the caller decides what a down Redis means; retries would only stretch the wait.
        "retry": AsyncRetry(NoBackoff(), 0) if asynchronous else Retry(NoBackoff(), 0),
    }
    if settings.ca_file:
        options["ssl_ca_certs"] = settings.ca_file
    return options


def check_redis(settings: RedisSettings) -> None:
    """Ping Redis once at start-up (blocking, bounded by IO_TIMEOUT); StoreUnavailable naming the host if it fails."""
    client = redis.Redis.from_url(settings.url, **_client_options(settings, asynchronous=False))
    try:
        client.ping()
    except _STORE_ERRORS as exc:
        raise StoreUnavailable(
            f"the token store Redis at {redis_host(settings.url)} {_KIND_WORDS[error_kind(exc)]}"
            + ("" if error_kind(exc) == "tls" else " (store.url)")
        ) from None
    finally:
        client.close()


def _decode(raw: bytes | str | None, credential: str) -> SavedState | None:
    """The SavedState a Redis hash field holds, or None when there is none or it is not one of ours."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        state = SavedState(**{f.name: data[f.name] for f in fields(SavedState) if f.name in data})
    except (ValueError, TypeError, KeyError):
        logger.warning(
            "store: the state in Redis for credential %s is unreadable; it is replaced at the next save", credential
        )
        return None
    return state if state.credential == credential else None


class RedisCoordination:
    """Coordination through Redis: one refresh per credential among every replica that shares it.

    Safe to use from many refreshes at once on one event loop (the manager's
    single flight makes it one per credential in a process). Its mode and the
    newest state it holds are changed only on the event loop thread.
    """

    def __init__(self, settings: RedisSettings, local: Store, metrics: Recorder = NULL_METRICS) -> None:
        self._settings = settings
        self._local = local  # this replica's copy: written after Redis, read while Redis is down
        self._metrics = metrics
        self._host = redis_host(settings.url)
        self._redis = redis.asyncio.Redis.from_url(settings.url, **_client_options(settings, asynchronous=True))
        self._scripts = {
            name: self._redis.register_script(text)
            for name, text in (("release", _RELEASE), ("renew", _RENEW), ("save", _SAVE))
        }
        self._mode = "shared"  # shared (Redis), local (down, refreshing alone) or unavailable (down, refusing)
        self._retry_at = 0.0  # monotonic time before which a down Redis is not tried again
        self._held: dict[str, SavedState] = {}  # the newest state this replica holds, per credential
        # Its own work beside the refreshes: freeing a lease a failed call may have taken, watching for Redis's return.
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        with contextlib.suppress(UnsafeStateError):
            state = local.load()
            if state is not None:
                self._held[state.credential] = state
        metrics.store_mode(self._mode)

    @property
    def mode(self) -> str:
        """`shared` while Redis works; `local` or `unavailable` while it is down (by whether the grant rotates)."""
        return self._mode

    def describe(self) -> dict[str, object]:
        """What /status shows of the store: backend, host (never the URL: it may hold a password) and mode."""
        return {"backend": "redis", "host": self._host, "mode": self._mode}

    async def aclose(self) -> None:
        """Close the connections to Redis; safe to call more than once."""
        if not self._closed:
            self._closed = True
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._redis.aclose()

    @contextlib.asynccontextmanager
    async def refresh_right(self, credential: str) -> AsyncIterator[RefreshRight]:
        """The lease on `credential` (waiting for a peer's refresh, within queue.wait_timeout), or the fallback.

        Raises StoreUnavailable when Redis is down and the grant rotates its
        refresh token; CoordinationUnavailable when a peer holds the lease
        past the wait. Leaving the block releases the lease (owner only).
        """
        right = await self._take(credential)
        try:
            yield right
        finally:
            await right.release()

    # -- internals --------------------------------------------------------------

    async def _take(self, credential: str) -> _LeaseRight | _LocalRight:
        if time.monotonic() < self._retry_at:
            return self._fallback(credential)
        owner = secrets.token_hex(16)
        try:
            acquired = await self._acquire(credential, owner)
        except _STORE_ERRORS as exc:
            self.failed(exc)
            if error_kind(exc) == "timeout":  # the SET may have been sent (a refused connection sent nothing)
                self._free_later(credential, owner)
            return self._fallback(credential)
        except asyncio.CancelledError:
            # Cancelled while asking (shut-down): the SET may have landed; free the lease if it is ours.
            with contextlib.suppress(*_STORE_ERRORS, TimeoutError):
                async with asyncio.timeout(IO_TIMEOUT):
                    await self._scripts["release"](
                        keys=[self.key(credential, "lease")], args=[owner, self.key(credential, "saved")]
                    )
            raise
        if not acquired:
            raise CoordinationUnavailable(
                f"another replica held the refresh lease in Redis at {self._host} longer than queue.wait_timeout"
            )
        self._recovered()
        return _LeaseRight(self, credential, owner)

    async def _acquire(self, credential: str, owner: str) -> bool:
        """Take the lease, waiting for a holder's save or release (notified, else polled) until the wait ends."""
        lease, channel = self.key(credential, "lease"), self.key(credential, "saved")
        ttl = int(self._settings.lease_ttl * 1000)
        if await self._redis.set(lease, owner, nx=True, px=ttl):
            self._metrics.lease_event("acquired")
            return True
        self._metrics.lease_event("waited")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.wait_timeout
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(channel)
            for _ in range(math.ceil(self._settings.wait_timeout / POLL_INTERVAL) + 1):
                # Tried again after subscribing too: a release between the first SET and the subscription is not missed.
                if await self._redis.set(lease, owner, nx=True, px=ttl):
                    self._metrics.lease_event("acquired")
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(POLL_INTERVAL, remaining))
        finally:
            with contextlib.suppress(*_STORE_ERRORS):
                await pubsub.aclose()
        return False

    def _free_later(self, credential: str, owner: str) -> None:
        """Free the lease `owner` may hold after a failed call: a SET that timed out can still land when a stalled
        Redis wakes up, and would then make every replica wait out its ttl."""
        self._start(self._free(credential, owner))

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task of this coordination (aclose cancels it)."""
        if self._closed:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self) -> None:
        """While Redis is down, ping it every RETRY_DOWN: when it answers, refreshes are shared again, and /readyz
        says so, also when no request comes to try (a replica out of rotation gets none)."""
        while self._mode != "shared":
            await asyncio.sleep(RETRY_DOWN)
            try:
                async with asyncio.timeout(IO_TIMEOUT):
                    await self._redis.ping()
            except (*_STORE_ERRORS, TimeoutError):
                continue
            self._retry_at = 0.0
            self._recovered()

    async def _free(self, credential: str, owner: str) -> None:
        """Release `owner`'s lease once Redis answers, trying every RETRY_DOWN for twice the ttl (the SET may land
        late, and a lease lives no longer than its ttl from then)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self._settings.lease_ttl
        keys, args = [self.key(credential, "lease")], [owner, self.key(credential, "saved")]
        while loop.time() < deadline:
            with contextlib.suppress(*_STORE_ERRORS, TimeoutError):
                async with asyncio.timeout(IO_TIMEOUT):
                    if await self._scripts["release"](keys=keys, args=args):
                        logger.info("store: freed the refresh lease a timed-out call had taken in Redis")
                        return
            await asyncio.sleep(RETRY_DOWN)

    def _fallback(self, credential: str) -> _LocalRight:
        if self._settings.rotating:
            raise StoreUnavailable(
                f"the token store Redis at {self._host} is unavailable; refreshing without it could present "
                "a rotated refresh token twice",
                retry_after=math.ceil(RETRY_DOWN),
            )
        return _LocalRight(self, credential)

    def failed(self, exc: BaseException) -> None:
        """Count a failed Redis call, leave Redis alone for RETRY_DOWN, and say so once when the mode changes."""
        kind = error_kind(exc)
        self._metrics.store_error(kind)
        self._retry_at = time.monotonic() + RETRY_DOWN
        mode = "unavailable" if self._settings.rotating else "local"
        if self._mode == mode:
            return
        if self._mode == "shared":
            self._start(self._watch())
        self._mode = mode
        self._metrics.store_mode(mode)
        if self._settings.rotating:
            logger.warning(
                "store: Redis at %s %s; requests that need a new token get 503 store_unavailable until it is back "
                "(the grant rotates its refresh token: refreshing alone could reuse it)",
                self._host,
                _KIND_WORDS[kind],
            )
        else:
            logger.warning(
                "store: Redis at %s %s; refreshing locally, without the other replicas, until it is back",
                self._host,
                _KIND_WORDS[kind],
            )

    def _recovered(self) -> None:
        if self._mode != "shared":
            self._mode = "shared"
            self._metrics.store_mode(self._mode)
            logger.warning("store: Redis at %s is back; refreshes are shared again", self._host)

    def key(self, credential: str, suffix: str = "") -> str:
        """The Redis key of `credential`'s state, or of its lease or channel with `suffix`."""
        base = self._settings.key_prefix + credential
        return f"{base}:{suffix}" if suffix else base

    async def shared_state(self, credential: str) -> SavedState | None:
        """What Redis holds for `credential` now, read without the lease (for a look, not a refresh).

        StoreUnavailable naming the host when Redis does not answer.
        """
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                return _decode(await self._redis.hget(self.key(credential), "state"), credential)
        except (*_STORE_ERRORS, TimeoutError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else error_kind(exc)
            raise StoreUnavailable(f"the token store Redis at {self._host} {_KIND_WORDS[kind]}") from None

    def held(self, credential: str) -> SavedState | None:
        """The newest state of `credential` this replica holds (what it saved, adopted or resumed)."""
        return self._held.get(credential)

    def hold(self, state: SavedState) -> None:
        """Remember `state` as the newest this replica holds, unless it holds a newer one."""
        current = self._held.get(state.credential)
        if current is None or state.generation >= current.generation:
            self._held[state.credential] = state

    async def save_local(self, state: SavedState) -> None:
        """Write this replica's copy (the state file) in a worker thread."""
        self.hold(state)
        await asyncio.to_thread(self._local.save, state)

    async def load_local(self) -> SavedState | None:
        """This replica's copy (the state file), or None when there is none or it is not safe to use."""
        try:
            return await asyncio.to_thread(self._local.load)
        except UnsafeStateError:
            return None

    @property
    def redis(self) -> redis.asyncio.Redis:
        """The client (for the rights this coordination grants)."""
        return self._redis

    def script(self, name: str) -> Any:
        """A registered Lua script: release, renew or save."""
        return self._scripts[name]

    @property
    def settings(self) -> RedisSettings:
        """What this coordination was built with."""
        return self._settings

    @property
    def metrics(self) -> Recorder:
        """Where lease and store events are counted."""
        return self._metrics


class _LeaseRight:
    """The lease on one credential in Redis, renewed by a task until it is released."""

    def __init__(self, owner_of: RedisCoordination, credential: str, owner: str) -> None:
        self._coordination = owner_of
        self._credential = credential
        self._owner = owner
        self._state_key = owner_of.key(credential)
        self._lease_key = owner_of.key(credential, "lease")
        self._channel = owner_of.key(credential, "saved")
        self._lost = False  # set by the renewal task when the lease is no longer ours
        self._renewal = asyncio.create_task(self._renew())

    async def _renew(self) -> None:
        settings = self._coordination.settings
        ttl = int(settings.lease_ttl * 1000)
        for _ in range(_MAX_RENEWALS):
            await asyncio.sleep(settings.lease_ttl / 3)
            try:
                async with asyncio.timeout(IO_TIMEOUT):
                    kept = await self._coordination.script("renew")(keys=[self._lease_key], args=[self._owner, ttl])
            except (*_STORE_ERRORS, TimeoutError) as exc:
                # The lease may still be ours: the save's compare-and-set decides.
                self._coordination.metrics.store_error(error_kind(exc))
                continue
            if not kept:
                self._lost = True
                self._coordination.metrics.lease_event("lost")
                logger.warning("store: the refresh lease in Redis expired before the refresh ended")
                return

    async def peer_state(self) -> SavedState | None:
        """The state in Redis; first seeds Redis with a newer one this replica holds (Redis came back empty)."""
        coordination = self._coordination
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                shared = _decode(await coordination.redis.hget(self._state_key, "state"), self._credential)
        except (*_STORE_ERRORS, TimeoutError) as exc:
            coordination.failed(exc)
            if coordination.settings.rotating:
                raise StoreUnavailable(
                    f"the token store Redis at {redis_host(coordination.settings.url)} stopped answering", retry_after=1
                ) from None
            return await coordination.load_local()
        held = coordination.held(self._credential)
        if held is not None and (shared is None or held.generation > shared.generation):
            with contextlib.suppress(RefreshRightLost):
                await self._write(held)
                logger.info(
                    "store: seeded Redis with generation %d, the newest state this replica holds", held.generation
                )
            return held
        if shared is not None:
            coordination.hold(shared)
        return shared

    async def save(self, state: SavedState) -> None:
        """Compare-and-set in Redis (lease ours, no newer generation there), then this replica's state file.

        Raises RefreshRightLost, writing nothing, when the lease was lost or a
        newer generation is in Redis. When Redis fails here the token endpoint
        has already answered: the state is kept in this replica and its state
        file, and seeds Redis when it is back.
        """
        if self._lost:
            raise RefreshRightLost()
        coordination = self._coordination
        try:
            await self._write(state)
        except (*_STORE_ERRORS, TimeoutError) as exc:
            coordination.failed(exc)
        await coordination.save_local(state)

    async def _write(self, state: SavedState) -> None:
        payload = json.dumps(asdict(state))
        async with asyncio.timeout(IO_TIMEOUT):
            result = await self._coordination.script("save")(
                keys=[self._state_key, self._lease_key], args=[self._owner, state.generation, payload, self._channel]
            )
        if result == -1:
            self._coordination.metrics.lease_event("lost")
            raise RefreshRightLost()
        if result == -2:
            raise RefreshRightLost()

    async def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours; a failure leaves it to expire."""
        self._renewal.cancel()
        await asyncio.wait([self._renewal])  # never raises: a cancellation of the caller still propagates
        coordination = self._coordination
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                await coordination.script("release")(keys=[self._lease_key], args=[self._owner, self._channel])
        except (*_STORE_ERRORS, TimeoutError) as exc:
            coordination.metrics.store_error(error_kind(exc))


class _LocalRight:
    """The right to refresh while Redis is down, for a grant without a rotating refresh token: this replica alone."""

    def __init__(self, coordination: RedisCoordination, credential: str) -> None:
        self._coordination = coordination
        self._credential = credential

    async def peer_state(self) -> SavedState | None:
        """This replica's state file: no peer's state can be read while Redis is down."""
        return await self._coordination.load_local()

    async def save(self, state: SavedState) -> None:
        """This replica's state file; Redis gets the state when it is back (the next refresh seeds it)."""
        await self._coordination.save_local(state)

    async def release(self) -> None:
        """Nothing is held."""
