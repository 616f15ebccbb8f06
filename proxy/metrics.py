"""Counters and gauges for /metrics, in Prometheus text format (prometheus-client).

Owns: one registry per running proxy (no module-level state), the metric
names, and cheap recording calls for the hot path (label children bound
once). Gauges that describe the token manager are read at scrape time from
a callback, so nothing is updated per request for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class TokenGauges:
    """What the token manager looks like right now."""

    waiting: int
    expires_in: float | None
    generation: int | None


class _TokenCollector(Collector):
    def __init__(self, source: Callable[[], TokenGauges | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauges = self._source()
        if gauges is None:
            return
        yield GaugeMetricFamily(
            "tokenproxy_waiting_requests", "Requests waiting for a token right now.", value=gauges.waiting
        )
        if gauges.expires_in is not None:
            yield GaugeMetricFamily(
                "tokenproxy_token_expires_in_seconds",
                "Seconds until the current access token expires.",
                value=gauges.expires_in,
            )
        if gauges.generation is not None:
            yield GaugeMetricFamily(
                "tokenproxy_token_generation", "Successful refreshes so far (the token's generation).",
                value=gauges.generation,
            )


class Metrics:
    """The proxy's metrics. Recording is safe from any request; reading is a scrape."""

    def __init__(self, token_gauges: Callable[[], TokenGauges | None] = lambda: None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        requests = Counter(
            "tokenproxy_requests", "Client requests answered, by status class.", ["status_class"],
            registry=self.registry,
        )
        self._requests = {cls: requests.labels(cls) for cls in _STATUS_CLASSES}
        self._upstream_latency = Histogram(
            "tokenproxy_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._resends = Counter(
            "tokenproxy_resends", "Requests resent with a renewed token.", registry=self.registry
        )
        self._passed_through = Counter(
            "tokenproxy_rejections_passed_through",
            "Refresh-status answers (401) handed to the client unchanged.",
            registry=self.registry,
        )
        self._refreshes = Counter(
            "tokenproxy_refreshes", "Token refreshes, by grant and result.", ["grant", "result"],
            registry=self.registry,
        )
        self._refresh_duration = Histogram(
            "tokenproxy_refresh_duration_seconds", "Time a token refresh took.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self._queue_rejections = Counter(
            "tokenproxy_queue_rejections", "Requests refused while waiting for a token, by reason.", ["reason"],
            registry=self.registry,
        )
        self.registry.register(_TokenCollector(token_gauges))

    def request_done(self, status: int) -> None:
        """Count one answered client request."""
        self._requests[_STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]].inc()

    def upstream_answered(self, seconds: float) -> None:
        """Record the time to an upstream's response headers."""
        self._upstream_latency.observe(seconds)

    def resent(self) -> None:
        """Count one resend after a renewal."""
        self._resends.inc()

    def rejection_passed_through(self) -> None:
        """Count one 401 handed to the client unchanged."""
        self._passed_through.inc()

    def refresh_done(self, grant: str, result: str, seconds: float) -> None:
        """Count one refresh (`ok` or an error code) and its duration."""
        self._refreshes.labels(grant, result).inc()
        self._refresh_duration.observe(seconds)

    def queue_rejected(self, reason: str) -> None:
        """Count one request refused while (or instead of) waiting: queue_full, queue_timeout, shutting_down."""
        self._queue_rejections.labels(reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
