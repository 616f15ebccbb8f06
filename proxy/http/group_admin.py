"""The admin listener of a group of workers: one /healthz, /readyz, /status and /metrics for all of them.

Owns: asking each serving worker's own admin app (on a unix socket in the
group's private runtime directory) for its status and metrics, with a short
timeout, all at once, and merging the answers: readiness by the group rule,
/status as one entry per worker, /metrics with a `worker` label on every
series. Knows nothing of processes: the supervisor hands it a view of its
workers; nothing here touches a worker's request path.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .render import ERROR_HEADER, json_errors

# How long one worker's admin app may take to answer before it counts as not answering.
FETCH_TIMEOUT = 2.0
WORKER_STATES = ("starting", "serving", "restarting", "stopped")


@dataclass(frozen=True)
class WorkerView:
    """One worker as its supervisor sees it now: for /status, and where to ask it for more."""

    index: int
    pid: int | None
    started: float | None  # when its current process started (Unix time)
    restarts: int
    state: str  # one of WORKER_STATES; only a serving worker accepts connections
    admin_socket: str  # the path of its admin app's unix socket


async def fetch_worker(socket_path: str, path: str, timeout: float = FETCH_TIMEOUT) -> bytes | None:
    """GET `path` from a worker's admin socket: the body of a 200 or 503, or None when it did not answer in time."""
    try:
        connector = aiohttp.UnixConnector(path=socket_path)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(f"http://worker{path}") as response,
        ):
            return await response.read() if response.status in (200, 503) else None
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


def group_readiness(entries: Sequence[tuple[WorkerView, dict[str, Any] | None]]) -> tuple[bool, str, str]:
    """(ready, code, sentence): the group can serve when one worker listens and every listening worker is ready.

    A worker that is starting or restarting takes no connections (it is not in the port's
    group yet), so it does not count; one that listens but does not answer its status does.
    """
    serving = [(view, document) for view, document in entries if view.state == "serving"]
    if not serving:
        return False, "no_worker_serving", "no worker is listening: they are starting or restarting"
    for view, document in serving:
        if document is None:
            return False, "worker_unreachable", f"worker {view.index} (pid {view.pid}) did not answer in time"
        if not document.get("ready"):
            return False, str(document.get("reason")), f"worker {view.index}: {document.get('detail')}"
    return True, "ok", f"{len(serving)} of {len(entries)} workers listening, every one ready"


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="seconds")


class _Families(Collector):
    """Families already built (merged from the workers), handed to prometheus-client for rendering."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        """The families as they are."""
        return iter(self._families)


def merge_metrics(texts: Sequence[tuple[int, str]], views: Sequence[WorkerView]) -> bytes:
    """One exposition for the group: each worker's series with a `worker` label, and the group's own."""
    families: dict[str, Metric] = {}
    for index, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            merged.samples.extend(
                sample._replace(labels={**sample.labels, "worker": str(index)}) for sample in family.samples
            )
    states = GaugeMetricFamily("tokenproxy_workers", "Worker processes of this group, by state.", labels=["state"])
    for state in WORKER_STATES:
        states.add_metric([state], sum(1 for view in views if view.state == state))
    restarts = CounterMetricFamily(
        "tokenproxy_worker_restarts", "Times a worker was started again after it ended.", labels=["worker"]
    )
    for view in views:
        restarts.add_metric([str(view.index)], view.restarts)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), states, restarts]))
    return generate_latest(registry)


def build_group_admin_app(workers: Callable[[], Sequence[WorkerView]]) -> web.Application:
    """The group's admin Application: /healthz, /readyz, /status and /metrics, merged from every worker."""
    app = web.Application(middlewares=[json_errors])

    async def ask_all(path: str) -> list[tuple[WorkerView, bytes | None]]:
        views = list(workers())
        bodies = await asyncio.gather(
            *(fetch_worker(view.admin_socket, path) if view.state == "serving" else _nothing() for view in views)
        )
        return list(zip(views, bodies, strict=True))

    async def statuses() -> list[tuple[WorkerView, dict[str, Any] | None]]:
        return [(view, _json(body)) for view, body in await ask_all("/status")]

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready, code, detail = group_readiness(await statuses())
        return web.json_response(
            {"status": "ready" if ready else "not_ready", "reason": code, "detail": detail},
            status=200 if ready else 503,
            headers={} if ready else {ERROR_HEADER: code},
        )

    async def status(request: web.Request) -> web.Response:
        entries = await statuses()
        ready, code, detail = group_readiness(entries)
        return web.json_response(
            {
                "ready": ready,
                "reason": code,
                "detail": detail,
                "workers": [
                    {
                        "worker": view.index,
                        "pid": view.pid,
                        "started": _iso(view.started),
                        "restarts": view.restarts,
                        "state": view.state,
                        "status": document,
                    }
                    for view, document in entries
                ],
            }
        )

    async def metrics(request: web.Request) -> web.Response:
        answers = await ask_all("/metrics")
        texts = [(view.index, body.decode()) for view, body in answers if body is not None]
        return web.Response(
            body=merge_metrics(texts, [view for view, _ in answers]),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app


async def _nothing() -> None:
    return None


def _json(body: bytes | None) -> dict[str, Any] | None:
    if body is None:
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None
