"""SIGHUP: which keys a reload puts into force, which need a restart, and applying a new config."""

from __future__ import annotations

import logging
from typing import NamedTuple

from aiohttp import web

from ..config import Config, restart_only_changes
from ..tokens.change import Reconfigured, TokenChange
from .app import ENTRY, FORWARDER, TOKEN_SESSION, TOKENS, build_route
from .credentials import build_grant, build_policy, credential_of, request_of


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
