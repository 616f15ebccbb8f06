"""Who may refresh a credential's token, among every process that shares it.

Owns: the coordination interface a refresh runs under, and its in-process
implementation (the file lock is in file_lock.py). Within one process the single flight (flight.py) already
makes a refresh the only one; a coordination extends that to peers (other
processes, other replicas) that share the token through a state file or
Redis, around the refresh only: the hot path never touches it.

A refresh under coordination goes:

1. acquire the right to refresh the credential (`Coordination.refresh_right`);
2. read what peers left (`RefreshRight.peer_state`): a peer may have
   refreshed while this process waited for the right, and may have rotated
   the refresh token this process holds, spending it. A newer token is
   adopted instead of calling the endpoint; a newer refresh token is
   presented instead of the spent one;
3. call the token endpoint, and save what it gave (`RefreshRight.save`)
   before the new access token is used, so a rotated refresh token is never
   lost and never presented twice;
4. release the right (leaving the `async with`, also on cancellation).

Knows nothing of grants, tokens' deadlines or requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from .store import SavedState, Store, UnsafeStateError


class CoordinationUnavailable(Exception):
    """The right to refresh could not be had (its lock or lease store is down, or busy past its timeout).

    The refresh fails like a token endpoint that did not answer: it backs
    off and is tried again. `reason` names what failed, never a secret.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RefreshRightLost(Exception):
    """The right to refresh ended (a lease expired, a lock was broken) before the state was saved.

    Nothing was written: a peer may hold the right now and its state wins.
    """


class RefreshRight(Protocol):
    """The right to refresh one credential, held for one refresh.

    While it is held no peer refreshes the credential; a lease may still
    end early (`save` says so). A refresh reads and writes the shared state
    only through it, so an implementation can fence what it writes.
    """

    async def peer_state(self) -> SavedState | None:
        """The credential's saved state as it is now, or None when no peer can have changed it.

        Called once the right is held, before the token endpoint is called.
        Raises CoordinationUnavailable when the shared state cannot be read.
        """

    async def save(self, state: SavedState) -> None:
        """Persist `state` durably while the right is still held, before returning.

        Raises RefreshRightLost, writing nothing, when the right has ended;
        OSError when the store could not write it.
        """


class Coordination(Protocol):
    """Grants the right to refresh a credential, one holder at a time among every process sharing it.

    One object serves every credential of a store; a credential is named by
    its identity (a hash, never a secret), which keys its lock or lease.
    """

    def refresh_right(self, credential: str) -> AbstractAsyncContextManager[RefreshRight]:
        """Hold the right to refresh `credential` for the body of an `async with`.

        Waits for a peer that holds it, for at most the implementation's own
        bound; raises CoordinationUnavailable when it cannot be had. Leaving
        the block releases it, also when the refresh is cancelled.
        """


class StoreRight:
    """A right to refresh that locks nothing: reads and writes the store as it is (one process, or no shared state)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def peer_state(self) -> SavedState | None:
        """The store as it is now: `tokenproxy check` may have refreshed meanwhile and rotated the refresh token.

        None when there is nothing saved, or when the store could have been
        written by another user (its save then fails and says so).
        """
        try:
            return await asyncio.to_thread(self._store.load)
        except UnsafeStateError:
            return None

    async def save(self, state: SavedState) -> None:
        """Write `state` to the store in a worker thread (the store blocks)."""
        await asyncio.to_thread(self._store.save, state)


class InProcessCoordination:
    """Coordination for a process that shares its token with no other: no state file (`state_file = ""`).

    The right is granted at once and never lost: within the process the
    single flight is all it takes. The store is still read before each
    refresh, so the manager's rules are the same as under a lock; nothing
    locks it against another process. With a state file, the processes that
    share it take turns under its lock instead (file_lock.py).
    """

    def __init__(self, store: Store) -> None:
        self._right = StoreRight(store)

    @contextlib.asynccontextmanager
    async def refresh_right(self, credential: str) -> AsyncIterator[RefreshRight]:
        """The right to refresh, at once: within this process the single flight already serialises refreshes."""
        yield self._right
