"""/metrics: Prometheus text that parses back and counts what happened."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.http.admin import build_admin_app
from proxy.runtime.app import METRICS


async def scrape(client: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with client.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_requests_resends_and_refreshes(aiohttp_server, make_proxy, token_server, api, client) -> None:
    """After a request, an expiry and a resend, /metrics shows each, parsed back with prometheus_client."""
    proxy = await make_proxy()
    server = await aiohttp_server(
        build_admin_app(lambda: proxy.tokens, proxy.app[METRICS].render), host="127.0.0.1"
    )
    admin = str(server.make_url("")).rstrip("/")
    async with client.get(f"{proxy.url}/echo/one") as resp:
        assert resp.status == 200
    api.expire_all(token_server.issued_access)
    async with client.get(f"{proxy.url}/echo/two") as resp:
        assert resp.status == 200
    async with client.get(f"{proxy.url}/challenge/insufficient_scope") as resp:
        assert resp.status == 401

    samples = await scrape(client, admin)
    assert samples[("tokenproxy_requests_total", (("route", "default"), ("status_class", "2xx")))] == 2
    assert samples[("tokenproxy_requests_total", (("route", "default"), ("status_class", "4xx")))] == 1
    assert samples[("tokenproxy_resends_total", ())] == 1
    assert samples[("tokenproxy_rejections_passed_through_total", ())] == 1
    assert samples[("tokenproxy_refreshes_total", (("credential", "default"), ("grant", "refresh_token"), ("result", "ok")))] == 2
    assert samples[("tokenproxy_refresh_duration_seconds_count", ())] == 2
    assert samples[("tokenproxy_upstream_latency_seconds_count", ())] == 4
    assert samples[("tokenproxy_token_generation", (("credential", "default"),))] == 2
    assert samples[("tokenproxy_waiting_requests", (("credential", "default"),))] == 0
    assert 0 < samples[("tokenproxy_token_expires_in_seconds", (("credential", "default"),))] <= 300


async def test_metrics_count_failed_refresh_and_queue_rejection(aiohttp_server, make_proxy, token_server, client) -> None:
    """A failed refresh is counted by its code, and a full queue by its reason; no token value appears."""
    token_server.mode = "500"
    proxy = await make_proxy(queue={"max_waiting": 0}, token={"backoff_initial": 60.0, "backoff_max": 60.0})
    server = await aiohttp_server(
        build_admin_app(lambda: proxy.tokens, proxy.app[METRICS].render), host="127.0.0.1"
    )
    admin = str(server.make_url("")).rstrip("/")
    async with client.get(f"{proxy.url}/echo/x") as resp:
        assert resp.status == 503
        assert resp.headers["X-Tokenproxy-Error"] == "queue_full"
    token_server.mode = "500"
    proxy2 = await make_proxy(token={"backoff_initial": 60.0, "backoff_max": 60.0})
    server2 = await aiohttp_server(
        build_admin_app(lambda: proxy2.tokens, proxy2.app[METRICS].render), host="127.0.0.1"
    )
    async with client.get(f"{proxy2.url}/echo/x") as resp:
        assert resp.status == 503
    samples = await scrape(client, admin)
    assert samples[("tokenproxy_queue_rejections_total", (("reason", "queue_full"),))] == 1
    assert samples[("tokenproxy_requests_total", (("route", "default"), ("status_class", "5xx")))] == 1
    samples2 = await scrape(client, str(server2.make_url("")).rstrip("/"))
    assert samples2[("tokenproxy_refreshes_total", (("credential", "default"), ("grant", "refresh_token"), ("result", "token_unavailable")))] == 1
