"""SIGHUP: which keys a reload puts into force, which need a restart, and applying a new config."""

from __future__ import annotations

from aiohttp import web

from ..config import Config, restart_only_changes
from .app import ENTRY, FORWARDER, TOKEN_SESSION, TOKENS, build_route
from .credentials import build_grant, build_policy, credential_of


def apply_reload(app: web.Application, old: Config, new: Config) -> list[str]:
    """Put a reloaded, valid config into force without dropping connections.

    Returns notes for the log: restart-only keys that changed (kept as they
    were) and whether the current token was kept.
    """
    notes = [f"{key} changed; it takes effect after a restart" for key in restart_only_changes(old, new)]
    tok = new.token
    kept = app[TOKENS].reconfigure(
        build_grant(tok, app[TOKEN_SESSION]),
        build_policy(new),
        refresh_token=tok.refresh_token or None,
        credential=credential_of(tok),
    )
    notes.append("current token kept" if kept else "credential changed: a new token will be fetched")
    route = build_route(new, app[TOKENS])
    app[FORWARDER].reconfigure(upstream=route.upstream, replay_memory=new.retry.replay_memory)
    app[ENTRY].route = route  # requests under way keep the route they started with
    return notes
