"""SIGHUP: which keys a reload puts into force, which need a restart, and applying a new config."""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

from aiohttp import web

from ..auth.discovery import DiscoveryError
from ..config import Config, restart_only_changes
from ..tokens.change import Reconfigured, TokenChange
from .app import ENTRY, FORWARDER, TOKEN_SESSION, TOKENS, build_route
from .credentials import build_grant, build_policy, credential_of, request_of, with_discovery, with_registered_client

logger = logging.getLogger("tokenproxy")


class Note(NamedTuple):
    """One line for the log about a reload, and the level it is logged at."""

    level: int
    text: str


def apply_reload(app: web.Application, in_force: Config, new: Config) -> list[Note]:
    """Put a reloaded, valid config into force without dropping connections.

    `in_force` is the config the listeners, pools and store were started
    with: restart-only keys are compared with it (not with the previous
    reload's config), so a key changed and changed back again is no change.
    Returns notes for the log: restart-only keys that differ (a warning:
    they stay as they were) and what happened to the current token.
    """
    notes = [
        Note(logging.WARNING, f"{key} changed; it takes effect after a restart")
        for key in restart_only_changes(in_force, new)
    ]
    tok = new.token
    outcome = app[TOKENS].reconfigure(
        build_grant(tok, app[TOKEN_SESSION]),
        build_policy(new),
        refresh_token=tok.refresh_token or None,
        credential=credential_of(tok),
        request=request_of(tok),
        fetch_now=new.server.fetch_on_start or tok.grant == "static",
    )
    notes.append(Note(logging.INFO, token_note(outcome)))
    route = build_route(new, app[TOKENS])
    app[FORWARDER].reconfigure(upstream=route.upstream, replay_memory=new.retry.replay_memory)
    app[ENTRY].route = route  # requests under way keep the route they started with
    return notes


def token_note(outcome: Reconfigured) -> str:
    """What the log says a reload did to the current token, naming the keys (never their values) that changed."""
    keys = f" ({', '.join(outcome.keys)})" if outcome.keys else ""
    if outcome.change is TokenChange.KEPT:
        return "current token kept"
    if outcome.change is TokenChange.REQUEST:
        return f"token request changed{keys}: a new token will be fetched"
    if outcome.change is TokenChange.LOGIN:
        return f"login changed{keys}: a new token will be fetched"
    return f"credential changed{keys}: a new token will be fetched"


class Reloader:
    """Puts reloaded configs into force in the order they were read.

    One with `token.issuer` is put in force once its metadata is fetched
    again (in a task: SIGHUP's handler must not wait on the network); a
    reload read after it wins over it, and a discovery that fails leaves the
    config in force. Owned by the serving loop; `close()` cancels what is
    under way.
    """

    def __init__(self, app: web.Application, started: Config) -> None:
        self._app = app
        self._started = started
        self._latest = 0  # the number of the last reload read; only it may be put in force
        self._tasks: set[asyncio.Task[None]] = set()

    def put(self, new: Config) -> None:
        """Put `new` in force now, or once its issuer's metadata is fetched."""
        self._latest += 1
        if not new.token.issuer:
            self._apply(with_registered_client(new))
            return
        task = asyncio.get_running_loop().create_task(self._discover(new, self._latest))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _discover(self, new: Config, number: int) -> None:
        try:
            resolved, _ = await with_discovery(new, self._app[TOKEN_SESSION])
        except DiscoveryError as error:
            logger.error("config reload rejected, the old config stays in force: discovery: %s", error)
            return
        if number == self._latest:
            self._apply(resolved)

    def _apply(self, new: Config) -> None:
        for note in apply_reload(self._app, self._started, new):
            logger.log(note.level, "config reloaded: %s", note.text)

    async def close(self) -> None:
        """Cancel the discoveries under way and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
