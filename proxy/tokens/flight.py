"""The one refresh under way for a credential, and the requests waiting for it.

Owns: the refresh task slot (at most one refresh runs), the waiters (each on
a future of its own, at most `max_waiting`, each for at most `wait_timeout`),
and waking every waiter with the refresh's outcome in one pass. Knows nothing
of what a refresh does, of tokens' deadlines or of failures and back-off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from ..core.errors import ProxyError, QueueFull, QueueTimeout, ShuttingDown, TokenUnavailable
from ..core.token import Token

# What a refresh gives its waiters: the new token, or the error each of them raises. A refresh
# returns its error rather than raising it, so a refresh-ahead nobody awaits leaves no unretrieved exception.
Outcome = Token | ProxyError
Refresh = Callable[[], Coroutine[Any, Any, Outcome]]


def _outcome(task: asyncio.Task[Outcome]) -> Outcome:
    """What a finished refresh gives its waiters, also when it was cancelled or raised."""
    if task.cancelled():
        return ShuttingDown("tokenproxy is shutting down")
    error = task.exception()
    if error is not None:
        return TokenUnavailable(f"internal error ({type(error).__name__})")
    return task.result()


def _wake(waiters: set[asyncio.Future[Outcome]], outcome: Outcome) -> None:
    """Hand `outcome` to every waiter still waiting, in one pass."""
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(outcome)
    waiters.clear()


class SingleFlight:
    """At most one refresh at a time, and a bounded queue of requests waiting for it.

    Safe to use from many requests at once on one event loop: the slot is read
    and set with no await in between, so no lock is needed. A waiter that is
    cancelled (its client left) frees its place and never cancels the refresh
    others wait for; only `close()` may cancel it, and only when it hangs.
    """

    def __init__(self, refresh: Refresh) -> None:
        self._refresh = refresh  # what one refresh does; built once, started at most once at a time
        # All guarded by running on the event loop thread only.
        self._task: asyncio.Task[Outcome] | None = None
        # The waiters of the refresh under way: its end wakes them in one pass (asyncio.wait
        # on one shared task would cost O(waiters) per waiter to unhook, O(n²) in a storm of 10 000).
        self._waiters: set[asyncio.Future[Outcome]] = set()
        self._waiting = 0
        self._closed = False

    @property
    def running(self) -> bool:
        """True while a refresh is under way."""
        return self._task is not None

    @property
    def waiting(self) -> int:
        """How many requests wait for the refresh right now."""
        return self._waiting

    @property
    def closed(self) -> bool:
        """True once `close()` was called: nobody may wait and no refresh may start."""
        return self._closed

    def start(self) -> None:
        """Start the refresh in the background; the caller has checked that none is running."""
        task = asyncio.get_running_loop().create_task(self._run(), name="tokenproxy-refresh")
        waiters: set[asyncio.Future[Outcome]] = set()
        task.add_done_callback(lambda done: _wake(waiters, _outcome(done)))
        self._task = task
        self._waiters = waiters

    async def _run(self) -> Outcome:
        try:
            return await self._refresh()
        finally:
            # Free the slot before the waiters wake, so a waiter that finds the outcome stale can start another.
            self._task = None

    async def join(self, *, max_waiting: int, wait_timeout: float) -> Token:
        """Wait for the refresh under way, starting one when none is; its token, or its error raised.

        Raises QueueFull when `max_waiting` requests already wait, QueueTimeout
        after `wait_timeout` seconds, ShuttingDown when `close()` is called
        meanwhile. Each waiter raises its own copy of the refresh's error.
        """
        if self._waiting >= max_waiting:
            raise QueueFull(f"{self._waiting} requests already wait for a token (queue.max_waiting)", retry_after=1)
        if self._task is None:
            self.start()
        waiters = self._waiters
        waiter: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        waiters.add(waiter)
        self._waiting += 1
        try:
            async with asyncio.timeout(wait_timeout):
                result = await waiter
        except TimeoutError:
            raise QueueTimeout(f"no token within {wait_timeout:g}s (queue.wait_timeout)", retry_after=1) from None
        finally:
            self._waiting -= 1
            waiters.discard(waiter)
        if isinstance(result, ProxyError):
            raise result.again()
        return result

    async def close(self, grace: float) -> None:
        """Answer every waiter with `shutting_down`; give a refresh in flight `grace` seconds, then cancel it.

        A refresh already talking to the endpoint is let finish so that it can
        save a rotated refresh token; it is cancelled only if it hangs.
        """
        self._closed = True
        _wake(self._waiters, ShuttingDown("tokenproxy is shutting down"))
        task = self._task
        if task is not None and not task.done():
            done, _ = await asyncio.wait((task,), timeout=grace)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
