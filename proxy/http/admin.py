"""The admin listener: health, readiness, status and metrics for probes and people.

Owns: the admin Application's routes. Reads the token manager's state and
the metrics registry; never changes anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from aiohttp import web

from ..core.errors import NoRoute
from ..tokens.manager import ManagerStatus, TokenManager
from .render import ERROR_HEADER, error_response, json_errors

StatusSource = Callable[[], TokenManager]
# The routes and credentials in force: route name -> credential name, credential name -> its token manager.
RoutesSource = Callable[[], tuple[Mapping[str, str], Mapping[str, TokenManager]]]


def readiness(status: ManagerStatus, now: float, ready_before_token: bool = False) -> tuple[bool, str, str]:
    """(ready, code, sentence) for a snapshot: ready while a token is held or can be obtained.

    Before the first token has been obtained, "can be obtained" is a guess:
    not ready (`no_token_yet`) unless `ready_before_token` (lazy readiness)
    takes the guess.
    """
    if status.dead is not None:
        return False, status.dead, "the token cannot be renewed until the configuration changes"
    if status.store_unavailable:
        return (
            False,
            "store_unavailable",
            "the shared token store (Redis) is unavailable and the grant rotates its refresh token: no new token "
            "until it is back",
        )
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


def overall_readiness(
    managers: Mapping[str, TokenManager], now: float, ready_before_token: bool = False
) -> tuple[bool, str, str]:
    """(ready, code, sentence) for several credentials: ready when every one is; else the first that is not,
    named in the sentence when there are several."""
    if len(managers) == 1:
        return readiness(next(iter(managers.values())).status(), now, ready_before_token)
    for name, manager in managers.items():
        ready, code, detail = readiness(manager.status(), now, ready_before_token)
        if not ready:
            return False, code, f"credential {name}: {detail}" if len(managers) > 1 else detail
    return True, "ok", "a valid token is held, or can be obtained, for every credential"


def build_admin_app(
    tokens: StatusSource,
    metrics_text: Callable[[], bytes] | None = None,
    clock: Callable[[], float] = time.time,
    ready_before_token: Callable[[], bool] = _not_before_token,
    routes: RoutesSource | None = None,
) -> web.Application:
    """The admin Application: /healthz, /readyz (`?route=NAME`: one route's), /status and (when given) /metrics.

    `ready_before_token` reads `server.ready_before_token` as it is now (a reload may change it);
    `routes` gives the routes and credentials in force (without it, `tokens()` is the one credential).
    """
    app = web.Application(middlewares=[json_errors])

    def in_force() -> tuple[Mapping[str, str], Mapping[str, TokenManager]]:
        return routes() if routes is not None else ({"default": "default"}, {"default": tokens()})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        route_credentials, managers = in_force()
        name = request.query.get("route")
        if name is not None:
            if name not in route_credentials:
                return error_response(NoRoute("no route has this name"))
            managers = {route_credentials[name]: managers[route_credentials[name]]}
        if routes is None:
            ready, code, detail = readiness(tokens().status(), clock(), ready_before_token())
        else:
            ready, code, detail = overall_readiness(managers, clock(), ready_before_token())
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
        if routes is not None:
            route_credentials, managers = routes()
            now = clock()
            document["routes"] = [{"name": name, "credential": cred} for name, cred in route_credentials.items()]
            document["credentials"] = {
                name: status_document(each.status(), now, each.grant_name, ready_before_token())
                for name, each in managers.items()
            }
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
