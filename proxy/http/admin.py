"""The admin listener: health, readiness, status and metrics for probes and people.

Owns: the admin Application's routes. Reads the token manager's state and
the metrics registry; never changes anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from ..tokens.manager import ManagerStatus, TokenManager
from .render import ERROR_HEADER

StatusSource = Callable[[], TokenManager]


def readiness(status: ManagerStatus, now: float, ready_before_token: bool = False) -> tuple[bool, str, str]:
    """(ready, code, sentence) for a snapshot: ready while a token is held or can be obtained.

    Before the first token has been obtained, "can be obtained" is a guess:
    not ready (`no_token_yet`) unless `ready_before_token` (lazy readiness)
    takes the guess.
    """
    if status.dead is not None:
        return False, status.dead, "the token cannot be renewed until the configuration changes"
    if status.usable:
        return True, "ok", "a valid token is held"
    if now < status.backoff_until:
        return (
            False,
            status.last_error or "token_unavailable",
            f"backing off after {status.failures} failed refresh(es); next attempt in "
            f"{status.backoff_until - now:.1f}s",
        )
    if not status.obtained and not ready_before_token:
        return (
            False,
            "no_token_yet",
            "no token has been obtained yet: one is fetched by the first request, or at start with "
            "server.fetch_on_start = true",
        )
    return True, "ok", "a token will be obtained on the next request"


def status_document(
    status: ManagerStatus, now: float, grant: str, ready_before_token: bool = False
) -> dict[str, object]:
    """The facts /status shows: no token value, only its fingerprint."""
    ready, code, detail = readiness(status, now, ready_before_token)
    return {
        "ready": ready,
        "reason": code,
        "detail": detail,
        "grant": grant,
        "token": {
            "fingerprint": status.fingerprint,
            "generation": status.generation,
            "expires_in": None if status.expires_at is None else round(status.expires_at - now, 3),
            "usable": status.usable,
        },
        "refreshing": status.refreshing,
        "waiting": status.waiting,
        "failures": status.failures,
        "backoff_remaining": max(0.0, round(status.backoff_until - now, 3)),
        "last_error": status.last_error,
    }


def _not_before_token() -> bool:
    return False


def build_admin_app(
    tokens: StatusSource,
    metrics_text: Callable[[], bytes] | None = None,
    clock: Callable[[], float] = time.time,
    ready_before_token: Callable[[], bool] = _not_before_token,
) -> web.Application:
    """The admin Application: /healthz, /readyz, /status and (when given) /metrics.

    `ready_before_token` reads `server.ready_before_token` as it is now (a reload may change it).
    """
    app = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready, code, detail = readiness(tokens().status(), clock(), ready_before_token())
        headers = {} if ready else {ERROR_HEADER: code}
        return web.json_response(
            {"status": "ready" if ready else "not_ready", "reason": code, "detail": detail},
            status=200 if ready else 503,
            headers=headers,
        )

    async def status(request: web.Request) -> web.Response:
        manager = tokens()
        document = status_document(manager.status(), clock(), manager.grant_name, ready_before_token())
        describe = getattr(manager.coordination, "describe", None)  # a shared store (Redis) says how it is
        if describe is not None:
            document["store"] = describe()
        return web.json_response(document)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    if metrics_text is not None:

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(
                body=metrics_text(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
            )

        app.router.add_get("/metrics", metrics)
    return app
