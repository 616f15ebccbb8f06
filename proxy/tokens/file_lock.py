"""The right to refresh among the processes of one host: an OS lock on a file beside the state file.

Owns: taking and releasing `flock` on `<state_file>.lock` around one
refresh (re-read the state, refresh if still needed, write the state), the
bound on waiting for it, and moving a corrupt state file aside at start-up.
Every process that names the same state file (`tokenproxy run`, `check`,
`token`, a proxy's workers) locks the same file, so only one of them
refreshes at a time and each sees what the one before it saved. A process
killed while holding the lock loses it with its open files: the OS releases
it. Knows nothing of grants, tokens, or which saved state is the newer one
(the token manager decides that from what `peer_state` returns).

`flock` (BSD locks) rather than `fcntl`/`lockf` record locks: a record lock
belongs to the process, so a second lock in the same process would succeed
and closing any descriptor of the file would drop it; a BSD lock belongs to
one open file description, which is what one refresh holds. The waiting is
done by polling with LOCK_NB on the event loop, never by a blocking call in
a thread: a waiter that is cancelled then simply stops asking and can never
end up holding a lock nobody releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from .coordination import CoordinationUnavailable, RefreshRight, StoreRight
from .store import FileStore, SavedState, UnsafeStateError

logger = logging.getLogger("tokenproxy.tokens")

T = TypeVar("T")

# Added to the token endpoint's timeout to bound the wait for a peer's refresh: the peer also reads
# and writes the state file (fsync) while it holds the lock.
LOCK_MARGIN = 5.0
# Polling the lock: first pause and the most it grows to (a refresh takes tens to hundreds of ms).
_FIRST_PAUSE = 0.005
_MAX_PAUSE = 0.05


class _LockedRight:
    """The lock held for one refresh: the state file read and written under it, in worker threads."""

    def __init__(self, store: FileStore) -> None:
        self._store = store
        # The last file operation's thread: the lock is released only once it has finished, even when the
        # refresh was cancelled meanwhile (a half-done save or move-aside must not run unlocked).
        self.pending: asyncio.Future[Any] | None = None

    async def _in_thread(self, call: Callable[[], T]) -> T:
        """Run the blocking `call` in a thread; cancelling the caller does not stop it (nor release the lock early)."""
        pending = asyncio.ensure_future(asyncio.to_thread(call))
        self.pending = pending
        return await asyncio.shield(pending)

    async def peer_state(self) -> SavedState | None:
        """The state file as the last holder of the lock left it; a corrupt one is moved aside (None).

        A file another user could have written is not read (None); the save
        then replaces it.
        """
        try:
            return await self._in_thread(self._store.load_locked)
        except UnsafeStateError:
            return None

    async def save(self, state: SavedState) -> None:
        """Write the state file before returning."""
        await self._in_thread(lambda: self._store.save(state))


def _unlock(fd: int) -> None:
    """Release the lock and close its descriptor (LOCK_UN first: a forked child may share the description)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _release_after(pending: asyncio.Future[Any], fd: int) -> None:
    """Release the lock when `pending` ends: a file operation still running when the refresh was cancelled."""

    def done(future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: the refresh that started it is gone
        _unlock(fd)

    pending.add_done_callback(done)


class FileLockCoordination:
    """Coordination among processes on one host that share a state file: an OS lock on `<state_file>.lock`.

    Waiting for a peer's refresh never blocks the event loop and lasts at
    most `wait` seconds (the token endpoint's timeout plus a margin), after
    which CoordinationUnavailable: the refresh backs off like a failed token
    call. When the state directory itself cannot be used (missing and not
    creatable, or open to other users) nothing can be shared there: the
    refresh goes on unlocked and its save fails and is logged, as before.
    """

    def __init__(self, store: FileStore, wait: float) -> None:
        self._store = store
        self._wait = wait

    @contextlib.asynccontextmanager
    async def refresh_right(self, credential: str) -> AsyncIterator[RefreshRight]:
        """Hold the state file's lock for the body; released on leaving it, also on cancellation."""
        try:
            dir_fd = self._store.open_directory(create=True)
        except OSError as exc:
            dir_fd, unusable = -1, exc.strerror
        if dir_fd < 0:
            # Nothing can be read or written there, so nothing is shared: the lock would guard nothing.
            logger.debug("state directory not usable (%s): refreshing without the state file lock", unusable)
            yield StoreRight(self._store)
            return
        try:
            fd = self._store.open_lock(dir_fd)
        except OSError as exc:
            # The path goes to the log only: the reason reaches clients in the 503's detail.
            logger.warning("cannot open the state lock file: %s", exc.strerror or type(exc).__name__)
            raise CoordinationUnavailable("cannot open the state lock file") from None
        finally:
            os.close(dir_fd)
        try:
            await self._acquire(fd)
        except BaseException:
            os.close(fd)
            raise
        right = _LockedRight(self._store)
        try:
            yield right
        finally:
            if right.pending is not None and not right.pending.done():
                _release_after(right.pending, fd)
            else:
                _unlock(fd)

    async def _acquire(self, fd: int) -> None:
        """Take the lock on `fd`, polling without blocking; CoordinationUnavailable after `wait` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        pause = _FIRST_PAUSE
        while True:  # bounded by the deadline
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise CoordinationUnavailable(f"cannot lock the state lock file ({exc.strerror})") from None
            remaining = deadline - loop.time()
            if remaining <= 0:
                logger.warning(
                    "another process held the state file lock %s for more than %gs", self._store.lock_path, self._wait
                )
                raise CoordinationUnavailable(f"another process held the state file lock for more than {self._wait:g}s")
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, _MAX_PAUSE)

    def set_aside_corrupt(self) -> None:
        """At start-up, before the state is read: move a corrupt state file aside if the lock is free at once.

        When a peer holds the lock it is refreshing, and its re-read under the
        lock moves the file aside. Blocking, but never waits.
        """
        try:
            dir_fd = self._store.open_directory()
        except OSError:
            return
        try:
            fd = self._store.open_lock(dir_fd)
        except OSError:
            return
        finally:
            os.close(dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return
        try:
            with contextlib.suppress(OSError):
                self._store.load_locked()
        finally:
            _unlock(fd)
