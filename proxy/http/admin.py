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


def readiness(status: ManagerStatus, now: float) -> tuple[bool, str, str]:
    """(ready, code, sentence) for a snapshot: ready while a token is held or can be obtained."""
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
    return True, "ok", "a token will be obtained on the next request"


def status_document(status: ManagerStatus, now: float, grant: str) -> dict[str, object]:
    """The facts /status shows: no token value, only its fingerprint."""
    ready, code, detail = readiness(status, now)
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


def build_admin_app(tokens: StatusSource, metrics_text: Callable[[], bytes] | None = None,
                    clock: Callable[[], float] = time.time) -> web.Application:
    """The admin Application: /healthz, /readyz, /status and (when given) /metrics."""
    app = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready, code, detail = readiness(tokens().status(), clock())
        headers = {} if ready else {ERROR_HEADER: code}
        return web.json_response(
            {"status": "ready" if ready else "not_ready", "reason": code, "detail": detail},
            status=200 if ready else 503,
            headers=headers,
        )

    async def status(request: web.Request) -> web.Response:
        manager = tokens()
        return web.json_response(status_document(manager.status(), clock(), manager.grant_name))

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
