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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Bounded label values of the shared store's metrics (anything else is counted as the last one of each).
LEASE_EVENTS = ("acquired", "waited", "lost")
STORE_ERROR_KINDS = ("connection", "timeout", "auth", "tls", "other")
STORE_MODES = ("shared", "local", "unavailable")
TOKEN_SOURCES = ("own", "adopted")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The place of a status's class among _STATUS_CLASSES, by status // 100 (a status has three digits at most).
_CLASS_INDEX = (0, 0, 1, 2, 3, 4, 4, 4, 4, 4)


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

    def unrouted(self) -> None:
        """Count one request refused because no route takes it."""

    def refresh_done(self, grant: str, result: str, seconds: float) -> None:
        """Count one refresh (`ok` or an error code) and its duration."""

    def queue_rejected(self, reason: str) -> None:
        """Count one request refused while (or instead of) waiting."""

    def lease_event(self, event: str) -> None:
        """Count one refresh lease `acquired`, `waited` for (a peer held it) or `lost` before the save."""

    def store_error(self, kind: str) -> None:
        """Count one failed call to the shared store, by kind (connection, timeout, auth, other)."""

    def store_mode(self, mode: str) -> None:
        """Say how refreshes are coordinated now: `shared` (Redis), `local` (Redis down) or `unavailable`."""

    def token_source(self, source: str) -> None:
        """Count one new token: fetched by this replica (`own`) or `adopted` from a peer."""


class NullMetrics:
    """A recorder that keeps nothing: for parts built without a metrics registry (the `token` command, tests)."""

    def _ignore(self, *values: object) -> None:
        """Keep nothing."""

    request_done = upstream_answered = resent = rejection_passed_through = unrouted = refresh_done = _ignore
    queue_rejected = _ignore
    lease_event = store_error = store_mode = token_source = _ignore


NULL_METRICS = NullMetrics()


class _Labelled:
    """A recorder for one route or one credential: what it records carries that name as a label.

    Built once per route (or credential) when the config is put in force, so
    the labels are bounded by the config; everything else goes to `metrics`.
    """

    def __init__(self, metrics: Metrics, route: str = "", credential: str = "") -> None:
        self._metrics = metrics
        if route:
            self._requests = metrics.requests_of(route)
        else:  # a credential's recorder makes no request series of its own (no route "default" beside the routes)
            self.request_done = metrics.request_done  # type: ignore[method-assign]
        self._credential = credential
        self.upstream_answered = metrics.upstream_answered
        self.resent = metrics.resent
        self.rejection_passed_through = metrics.rejection_passed_through
        self.unrouted = metrics.unrouted
        self.queue_rejected = metrics.queue_rejected
        self.lease_event = metrics.lease_event
        self.store_error = metrics.store_error
        self.store_mode = metrics.store_mode
        self.token_source = metrics.token_source

    def request_done(self, status: int) -> None:
        """Count one answered client request of this route."""
        self._requests[_CLASS_INDEX[status // 100] if 0 <= status < 1000 else 4] += 1

    def refresh_done(self, grant: str, result: str, seconds: float) -> None:
        """Count one refresh of this credential (`ok` or an error code) and its duration."""
        self._metrics.credential_refresh_done(self._credential, grant, result, seconds)


class Metrics(Collector):
    """The proxy's metrics. Record from the event loop; read by scraping `render()`.

    Requests carry a `route` label and token metrics a `credential` label:
    record through `for_route(name)` and `for_credential(name)`, whose names
    come from the config only. `credential_gauges` gives each credential's
    token gauges by name.
    """

    def __init__(
        self,
        token_gauges: Callable[[], TokenGauges | None] = lambda: None,
        credential_gauges: Callable[[], Mapping[str, TokenGauges]] | None = None,
    ) -> None:
        self._token_gauges = token_gauges
        self._credential_gauges = credential_gauges
        self._requests: dict[str, list[int]] = {}  # by route name: a count per status class
        self._upstream_latency = Histogram()
        # Record the time to an upstream's response headers (once per request: no method in between).
        self.upstream_answered: Callable[[float], None] = self._upstream_latency.observe
        self._resends = 0
        self._unrouted = 0
        self._passed_through = 0
        self._refreshes: Counter[tuple[str, str]] = Counter()
        self._credential_refreshes: Counter[tuple[str, str, str]] = Counter()
        self._refresh_duration = Histogram()
        self._queue_rejections: Counter[str] = Counter()
        self._lease_events: Counter[str] = Counter()
        self._store_errors: Counter[str] = Counter()
        self._store_mode: str | None = None  # None: no shared store configured
        self._token_sources: Counter[str] = Counter()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        # The usual process_*, python_gc_* and python_info series of a Python exporter.
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def request_done(self, status: int) -> None:
        """Count one answered client request (of the route `default`)."""
        counts = self.requests_of("default")
        counts[_CLASS_INDEX[status // 100] if 0 <= status < 1000 else 4] += 1

    def requests_of(self, route: str) -> list[int]:
        """The request counts (one per status class) of a route, made when first asked for."""
        return self._requests.setdefault(route, [0] * len(_STATUS_CLASSES))

    def for_route(self, route: str) -> _Labelled:
        """The recorder of one configured route: its requests are counted with `route="NAME"`."""
        return _Labelled(self, route=route)

    def for_credential(self, credential: str) -> _Labelled:
        """The recorder of one configured credential: its refreshes are counted with `credential="NAME"`."""
        return _Labelled(self, credential=credential)

    def credential_refresh_done(self, credential: str, grant: str, result: str, seconds: float) -> None:
        """Count one refresh of a credential (`ok` or an error code) and its duration."""
        self._credential_refreshes[(credential, grant, result)] += 1
        self._refresh_duration.observe(seconds)

    def resent(self) -> None:
        """Count one resend after a renewal."""
        self._resends += 1

    def rejection_passed_through(self) -> None:
        """Count one 401 handed to the client unchanged."""
        self._passed_through += 1

    def unrouted(self) -> None:
        """Count one request refused because no route takes it (404 no_route, or a tunnel's request naming
        another host)."""
        self._unrouted += 1

    def refresh_done(self, grant: str, result: str, seconds: float) -> None:
        """Count one refresh (`ok` or an error code) and its duration."""
        self._refreshes[(grant, result)] += 1
        self._refresh_duration.observe(seconds)

    def queue_rejected(self, reason: str) -> None:
        """Count one request refused while (or instead of) waiting: queue_full, queue_timeout, shutting_down."""
        self._queue_rejections[reason] += 1

    def lease_event(self, event: str) -> None:
        """Count one refresh lease `acquired`, `waited` for (a peer held it) or `lost` before the save."""
        self._lease_events[event if event in LEASE_EVENTS else LEASE_EVENTS[-1]] += 1

    def store_error(self, kind: str) -> None:
        """Count one failed call to the shared store, by kind (connection, timeout, auth, other)."""
        self._store_errors[kind if kind in STORE_ERROR_KINDS else STORE_ERROR_KINDS[-1]] += 1

    def store_mode(self, mode: str) -> None:
        """Say how refreshes are coordinated now: `shared` (Redis), `local` (Redis down) or `unavailable`."""
        self._store_mode = mode if mode in STORE_MODES else STORE_MODES[-1]

    def token_source(self, source: str) -> None:
        """Count one new token: fetched by this replica (`own`) or `adopted` from a peer."""
        self._token_sources[source if source in TOKEN_SOURCES else TOKEN_SOURCES[0]] += 1

    def _store_families(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """The shared store's metrics: only once a store said how it coordinates (backend = "redis")."""
        if self._store_mode is None:
            return
        mode = GaugeMetricFamily(
            "tokenproxy_store_mode", "How refreshes are coordinated now (1 for the current mode).", labels=["mode"]
        )
        for name in STORE_MODES:
            mode.add_metric([name], 1 if name == self._store_mode else 0)
        yield mode
        leases = CounterMetricFamily(
            "tokenproxy_store_leases", "Refresh leases acquired, waited for, or lost before the save.", labels=["event"]
        )
        for event in LEASE_EVENTS:
            leases.add_metric([event], self._lease_events[event])
        yield leases
        errors = CounterMetricFamily(
            "tokenproxy_store_errors", "Failed calls to the shared store, by kind.", labels=["kind"]
        )
        for kind in STORE_ERROR_KINDS:
            errors.add_metric([kind], self._store_errors[kind])
        yield errors
        sources = CounterMetricFamily(
            "tokenproxy_store_tokens", "New tokens: fetched by this replica or adopted from another.", labels=["source"]
        )
        for source in TOKEN_SOURCES:
            sources.add_metric([source], self._token_sources[source])
        yield sources

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        """Every metric, as prometheus-client families (called on scrape)."""
        requests = CounterMetricFamily(
            "tokenproxy_requests",
            "Client requests answered, by route and status class.",
            labels=["route", "status_class"],
        )
        for route, counts in self._requests.items():
            for name, value in zip(_STATUS_CLASSES, counts, strict=True):
                requests.add_metric([route, name], value)
        yield requests
        yield self._upstream_latency.family(
            "tokenproxy_upstream_latency_seconds", "Time from sending a request upstream to its response headers."
        )
        yield CounterMetricFamily(
            "tokenproxy_unrouted_requests", "Requests refused because no route takes them.", value=self._unrouted
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
        if self._credential_refreshes:
            refreshes = CounterMetricFamily(
                "tokenproxy_refreshes",
                "Token refreshes, by credential, grant and result.",
                labels=["credential", "grant", "result"],
            )
            for (credential, grant, result), value in sorted(self._credential_refreshes.items()):
                refreshes.add_metric([credential, grant, result], value)
        yield refreshes
        yield self._refresh_duration.family("tokenproxy_refresh_duration_seconds", "Time a token refresh took.")
        rejections = CounterMetricFamily(
            "tokenproxy_queue_rejections", "Requests refused while waiting for a token, by reason.", labels=["reason"]
        )
        for reason in ("queue_full", "queue_timeout", "shutting_down"):
            rejections.add_metric([reason], self._queue_rejections[reason])
        yield rejections
        yield from self._store_families()
        if self._credential_gauges is not None:
            yield from self._credential_families(self._credential_gauges())
            return
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

    def _credential_families(self, gauges: Mapping[str, TokenGauges]) -> Iterator[GaugeMetricFamily]:
        """Each credential's token gauges, labelled with its name."""
        waiting = GaugeMetricFamily(
            "tokenproxy_waiting_requests", "Requests waiting for a token right now.", labels=["credential"]
        )
        expires = GaugeMetricFamily(
            "tokenproxy_token_expires_in_seconds",
            "Seconds until the current access token expires.",
            labels=["credential"],
        )
        generation = GaugeMetricFamily(
            "tokenproxy_token_generation",
            "Successful refreshes so far (the token's generation).",
            labels=["credential"],
        )
        for name, gauge in gauges.items():
            waiting.add_metric([name], gauge.waiting)
            if gauge.expires_in is not None:
                expires.add_metric([name], gauge.expires_in)
            if gauge.generation is not None:
                generation.add_metric([name], gauge.generation)
        yield waiting
        yield expires
        yield generation

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
