"""SIGHUP: which keys a reload puts into force, which need a restart, and applying a new config."""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

from aiohttp import web

from ..auth.discovery import DiscoveryError
from ..config import Config, restart_only_changes
from ..config.schema import values_of
from ..core.errors import ProxyError
from .app import ENTRY, FORWARDER, METRICS, ROUTING
from .credentials import has_issuer, registered_clients, resolve_credentials
from .routing import token_note

__all__ = ["Note", "Reloader", "apply_reload", "route_restart_changes", "token_note"]

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
        for key in restart_only_changes(in_force, new) + route_restart_changes(in_force, new)
    ]
    routing = app[ROUTING]
    notes += [Note(logging.INFO, text) for text in routing.reconfigure_credentials(new)]
    router = routing.build_routes(new, app[METRICS].for_route)
    app[FORWARDER].reconfigure(upstream=router.routes[0].upstream, replay_memory=new.retry.replay_memory)
    app[ENTRY].router = router  # requests under way keep the route they started with
    return notes


def route_restart_changes(in_force: Config, new: Config) -> list[str]:
    """The restart-only keys of a route (by name, one in both configs) whose values differ, as `route[N].key`."""
    started = {route.name: route for route in in_force.routes}
    changed = []
    for index, route in enumerate(new.routes):
        old = started.get(route.name)
        if old is None:
            continue
        after = {key: value for key, _, value in values_of(route)}
        changed += [
            f"route[{index}].{key}"
            for key, f, before in values_of(old)
            if f.metadata.get("restart") and after.get(key) != before
        ]
    return changed


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
        if not has_issuer(new):
            self._apply(registered_clients(new))
            return
        task = asyncio.get_running_loop().create_task(self._discover(new, self._latest))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _discover(self, new: Config, number: int) -> None:
        try:
            resolved = await resolve_credentials(new, self._app[ROUTING].session_for)
        except DiscoveryError as error:
            logger.error("config reload rejected, the old config stays in force: discovery: %s", error)
            return
        if number == self._latest:
            self._apply(resolved)

    def _apply(self, new: Config) -> None:
        try:
            notes = apply_reload(self._app, self._started, new)
        except (OSError, ProxyError) as error:
            # A new credential's state file refused (UnsafeStateError) or its Redis not answering: the
            # routes in force stay; credentials already reconfigured keep their new settings.
            logger.error("config reload rejected, the routes in force stay: %s", error)
            return
        for note in notes:
            logger.log(note.level, "config reloaded: %s", note.text)

    async def close(self) -> None:
        """Cancel the discoveries under way and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
