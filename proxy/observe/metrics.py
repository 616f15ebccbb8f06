"""Counters and gauges for /metrics, in Prometheus text format (prometheus-client).

Owns: one set of metrics per running proxy (no module-level state) and the
metric names. Recording is a few integer additions on the event loop thread
(no locks: everything that records runs on that one thread); prometheus-client
renders them at scrape time through a collector, as it does the token
manager's gauges, which are read from a callback.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class TokenGauges:
    """What the token manager looks like right now."""

    waiting: int
    expires_in: float | None
    generation: int | None


class Histogram:
    """Observations counted into fixed buckets; cheap to record, rendered on scrape."""

    def __init__(self, buckets: Sequence[float] = _LATENCY_BUCKETS) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The Prometheus family: cumulative buckets, sum and count."""
        cumulative, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=self.total)


class Recorder(Protocol):
    """What the request path and the token manager record; `Metrics` and `NullMetrics` implement it."""

    def request_done(self, status: int) -> None:
        """Count one answered client request."""

    def upstream_answered(self, seconds: float) -> None:
        """Record the time to an upstream's response headers."""

    def resent(self) -> None:
        """Count one resend after a renewal."""

    def rejection_passed_through(self) -> None:
        """Count one 401 handed to the client unchanged."""

    def refresh_done(self, grant: str, result: str, seconds: float) -> None:
        """Count one refresh (`ok` or an error code) and its duration."""

    def queue_rejected(self, reason: str) -> None:
        """Count one request refused while (or instead of) waiting."""


class NullMetrics:
    """A recorder that keeps nothing: for parts built without a metrics registry (the `token` command, tests)."""

    def _ignore(self, *values: object) -> None:
        """Keep nothing."""

    request_done = upstream_answered = resent = rejection_passed_through = refresh_done = queue_rejected = _ignore


NULL_METRICS = NullMetrics()


class Metrics(Collector):
    """The proxy's metrics. Record from the event loop; read by scraping `render()`."""

    def __init__(self, token_gauges: Callable[[], TokenGauges | None] = lambda: None) -> None:
        self._token_gauges = token_gauges
        self._requests = [0] * len(_STATUS_CLASSES)
        self._upstream_latency = Histogram()
        self._resends = 0
        self._passed_through = 0
        self._refreshes: Counter[tuple[str, str]] = Counter()
        self._refresh_duration = Histogram()
        self._queue_rejections: Counter[str] = Counter()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        # The usual process_*, python_gc_* and python_info series of a Python exporter.
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def request_done(self, status: int) -> None:
        """Count one answered client request."""
        self._requests[min(max(status // 100, 1), 5) - 1] += 1

    def upstream_answered(self, seconds: float) -> None:
        """Record the time to an upstream's response headers."""
        self._upstream_latency.observe(seconds)

    def resent(self) -> None:
        """Count one resend after a renewal."""
        self._resends += 1

    def rejection_passed_through(self) -> None:
        """Count one 401 handed to the client unchanged."""
        self._passed_through += 1

    def refresh_done(self, grant: str, result: str, seconds: float) -> None:
        """Count one refresh (`ok` or an error code) and its duration."""
        self._refreshes[(grant, result)] += 1
        self._refresh_duration.observe(seconds)

    def queue_rejected(self, reason: str) -> None:
        """Count one request refused while (or instead of) waiting: queue_full, queue_timeout, shutting_down."""
        self._queue_rejections[reason] += 1

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        """Every metric, as prometheus-client families (called on scrape)."""
        requests = CounterMetricFamily(
            "tokenproxy_requests", "Client requests answered, by status class.", labels=["status_class"]
        )
        for name, value in zip(_STATUS_CLASSES, self._requests, strict=True):
            requests.add_metric([name], value)
        yield requests
        yield self._upstream_latency.family(
            "tokenproxy_upstream_latency_seconds", "Time from sending a request upstream to its response headers."
        )
        yield CounterMetricFamily("tokenproxy_resends", "Requests resent with a renewed token.", value=self._resends)
        yield CounterMetricFamily(
            "tokenproxy_rejections_passed_through",
            "Refresh-status answers (401) handed to the client unchanged.",
            value=self._passed_through,
        )
        refreshes = CounterMetricFamily(
            "tokenproxy_refreshes", "Token refreshes, by grant and result.", labels=["grant", "result"]
        )
        for (grant, result), value in sorted(self._refreshes.items()):
            refreshes.add_metric([grant, result], value)
        yield refreshes
        yield self._refresh_duration.family("tokenproxy_refresh_duration_seconds", "Time a token refresh took.")
        rejections = CounterMetricFamily(
            "tokenproxy_queue_rejections", "Requests refused while waiting for a token, by reason.", labels=["reason"]
        )
        for reason in ("queue_full", "queue_timeout", "shutting_down"):
            rejections.add_metric([reason], self._queue_rejections[reason])
        yield rejections
        gauges = self._token_gauges()
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
                "tokenproxy_token_generation",
                "Successful refreshes so far (the token's generation).",
                value=gauges.generation,
            )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
