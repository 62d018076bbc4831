"""What ``GET /metrics`` exposes (Prometheus text format, prometheus-client), one registry per app.

    ddpm_serve_requests_total{route, status}     every answer, 4xx and 5xx included
    ddpm_serve_request_seconds{route}            latency histogram, first byte in to last byte out
    ddpm_serve_batch_rows{model}                 rows per merged reverse loop (the batch-size histogram)
    ddpm_serve_queue_samples{model}              samples waiting for a loop (the queue depth)
    ddpm_serve_samples_total{model}              samples computed (warm-up excluded)
    ddpm_serve_samples_per_second{model}         samples computed over the last WINDOW_S seconds / WINDOW_S
    ddpm_serve_in_flight                         requests being answered now

A registry of its own per app, not the process-global one: two apps in one process (tests, a user's own
server) do not collide, and a scrape shows this server's figures only.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["Metrics", "CONTENT_TYPE", "WINDOW_S"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
WINDOW_S = 10.0
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The server's counters; ``track_model`` adds a model's queue gauge and throughput."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ddpm_serve_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "ddpm_serve_request_seconds", "Request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "ddpm_serve_batch_rows",
            "Rows per merged reverse loop",
            ["model"],
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.queue = Gauge("ddpm_serve_queue_samples", "Samples waiting for a loop", ["model"], registry=r)
        self.samples = Counter("ddpm_serve_samples", "Samples computed", ["model"], registry=r)
        self.rate = Gauge(
            "ddpm_serve_samples_per_second", f"Samples per second over the last {WINDOW_S:g} s", ["model"],
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("ddpm_serve_in_flight", "Requests being answered", registry=r)
        self._lock = threading.Lock()
        self._recent: dict[str, collections.deque[tuple[float, int]]] = {}

    def track_model(self, name: str, queue_depth: Callable[[], float]) -> Callable[[int, float], None]:
        """Register a model; returns its ``on_batch(rows, seconds)`` observer for the batcher."""
        self.queue.labels(model=name).set_function(queue_depth)
        recent: collections.deque[tuple[float, int]] = collections.deque()
        self._recent[name] = recent
        self.rate.labels(model=name).set_function(lambda: self._rate(recent))
        self.samples.labels(model=name)  # shown as 0 before the first loop
        rows_hist, samples = self.batch_rows.labels(model=name), self.samples.labels(model=name)

        def on_batch(rows: int, seconds: float) -> None:
            rows_hist.observe(rows)
            samples.inc(rows)
            with self._lock:
                recent.append((time.monotonic(), rows))
                self._trim(recent)

        return on_batch

    def _trim(self, recent: collections.deque[tuple[float, int]]) -> None:
        cutoff = time.monotonic() - WINDOW_S
        while recent and recent[0][0] < cutoff:
            recent.popleft()

    def _rate(self, recent: collections.deque[tuple[float, int]]) -> float:
        with self._lock:
            self._trim(recent)
            return sum(n for _, n in recent) / WINDOW_S

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
