"""The token manager under a coordination: peers that share a state file, a right that cannot be had or is lost.

Here a stand-in implementation of the interface, as a file lock or a Redis
lease would be, shows what the manager does with what it says (the real file
lock, across processes, is in test_shared_state.py): a real token
server, a real state file, two managers standing for two processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.auth.grants.oauth import OAuthSettings
from proxy.auth.protocol import Grant, GrantContext
from proxy.auth.registry import GRANTS
from proxy.core.errors import TokenUnavailable
from proxy.tokens.coordination import Coordination, CoordinationUnavailable, RefreshRight, RefreshRightLost
from proxy.tokens.manager import RefreshPolicy, TokenManager
from proxy.tokens.store import FileStore, SavedState
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET, FakeTokenServer, until

POLICY = RefreshPolicy(
    refresh_before=30.0,
    min_refresh_interval=0.0,
    default_lifetime=300.0,
    timeout=10.0,
    backoff_initial=1.0,
    backoff_max=60.0,
    max_waiting=10,
    wait_timeout=10.0,
)


class SharedFile:
    """A coordination for peers in one test: one lock for the right, the shared state file read under it."""

    def __init__(self, store: FileStore) -> None:
        self.store = store
        self.lock = asyncio.Lock()
        self.lost = False  # when set, the right is lost before the save

    @contextlib.asynccontextmanager
    async def refresh_right(self, credential: str) -> AsyncIterator[RefreshRight]:
        """The one lock, held for the refresh."""
        async with self.lock:
            yield self

    async def peer_state(self) -> SavedState | None:
        """The state file as the last holder of the right left it."""
        return await asyncio.to_thread(self.store.load)

    async def save(self, state: SavedState) -> None:
        """Write the state file, unless the right was lost."""
        if self.lost:
            raise RefreshRightLost
        await asyncio.to_thread(self.store.save, state)


class Unavailable:
    """A coordination whose lock or lease store cannot be reached."""

    def refresh_right(self, credential: str) -> contextlib.AbstractAsyncContextManager[RefreshRight]:
        """Never granted."""
        raise CoordinationUnavailable("the lease store did not answer")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The grants' HTTP session."""
    async with aiohttp.ClientSession() as http:
        yield http


def grant(token_server: FakeTokenServer, session: aiohttp.ClientSession) -> Grant:
    """A refresh_token grant against the fake token server, built as the proxy builds it."""
    settings = OAuthSettings(
        token_url=f"{token_server.base_url}/oauth/token",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        client_auth="post",
    )
    return GRANTS["refresh_token"].build(settings, GrantContext(session, timeout=10.0, default_lifetime=300.0))


def manager(
    token_server: FakeTokenServer, session: aiohttp.ClientSession, store: FileStore, coordination: Coordination | None
) -> TokenManager:
    """A manager for the one shared credential, as one process would build it."""
    return TokenManager(
        grant(token_server, session),
        store,
        POLICY,
        refresh_token=token_server.current_refresh,
        credential="shared",
        coordination=coordination,
    )


@pytest.fixture
async def peers(
    token_server: FakeTokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> AsyncIterator[tuple[TokenManager, TokenManager]]:
    """Two managers standing for two processes that share one state file and one right to refresh."""
    store = FileStore(tmp_path / "state" / "tokens.json")
    shared = SharedFile(store)
    first = manager(token_server, session, store, shared)
    second = manager(token_server, session, store, shared)
    yield first, second
    await first.close()
    await second.close()


async def test_coordination_peer_token_is_adopted_without_a_token_call(
    token_server: FakeTokenServer, peers: tuple[TokenManager, TokenManager]
) -> None:
    """A process that finds a newer token saved by a peer under the right uses it: no second token call."""
    first, second = peers

    fetched = await first.get()
    adopted = await second.get()

    assert token_server.count == 1
    assert adopted.value == fetched.value and adopted.generation == fetched.generation == 1


async def test_coordination_peer_rotated_refresh_token_is_presented_never_the_spent_one(
    token_server: FakeTokenServer, peers: tuple[TokenManager, TokenManager]
) -> None:
    """After a peer rotated the refresh token, the next refresh presents the rotated one: no reuse is detected."""
    first, second = peers
    await first.get()
    seen = await second.get()

    renewed = await second.renew(seen, "invalid_token")

    assert renewed is not None and renewed.generation == 2
    assert token_server.count == 2 and not token_server.reuse_detected
    assert (await first.renew(seen, "invalid_token")) == renewed  # adopted from the file: still two calls
    assert token_server.count == 2


async def test_coordination_unavailable_fails_and_backs_off_without_a_token_call(
    token_server: FakeTokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """No right to refresh: the request gets token_unavailable naming why, and the manager backs off."""
    tokens = manager(token_server, session, FileStore(tmp_path / "tokens.json"), Unavailable())

    with pytest.raises(TokenUnavailable, match="the lease store did not answer"):
        await tokens.get()

    assert token_server.count == 0
    assert tokens.status().failures == 1 and tokens.status().backoff_until > 0
    await tokens.close()


async def test_coordination_right_lost_before_save_keeps_token_in_memory_only(
    token_server: FakeTokenServer, session: aiohttp.ClientSession, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lease lost before the save: the token is used, nothing is written, and the log says so."""
    store = FileStore(tmp_path / "state" / "tokens.json")
    shared = SharedFile(store)
    shared.lost = True
    tokens = manager(token_server, session, store, shared)

    token = await tokens.get()

    assert token.generation == 1 and store.load() is None
    assert "lost the right to refresh before saving; the new token is kept in memory only" in caplog.text
    await tokens.close()


async def test_flight_cancelled_waiter_leaves_the_refresh_to_the_others(
    token_server: FakeTokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A waiter whose request is cancelled frees its place; the shared refresh goes on and serves the rest."""
    tokens = manager(token_server, session, FileStore(tmp_path / "tokens.json"), None)
    token_server.gate = asyncio.Event()
    leaving = asyncio.create_task(tokens.get())
    staying = asyncio.create_task(tokens.get())
    await until(lambda: tokens.waiting == 2 and token_server.entered.is_set())

    leaving.cancel()
    await until(lambda: tokens.waiting == 1)
    token_server.gate.set()

    assert (await staying).generation == 1
    assert leaving.cancelled() and token_server.count == 1 and tokens.waiting == 0
    await tokens.close()


async def test_coordination_in_process_by_default_logs_at_info_only(
    token_server: FakeTokenServer, session: aiohttp.ClientSession, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With no coordination given, a refresh is saved to the store and logs no warning or error."""
    store = FileStore(tmp_path / "state" / "tokens.json")
    tokens = manager(token_server, session, store, None)

    token = await tokens.get()

    saved = store.load()
    assert saved is not None and saved.generation == token.generation == 1
    assert saved.refresh_token == token_server.current_refresh
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    await tokens.close()
