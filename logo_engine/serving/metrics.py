"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own.

Each :class:`Metrics` owns a ``CollectorRegistry``, so several servers in one process (tests,
benchmarks) do not share counters. It is also the batcher's
:class:`~logo_engine.serving.batcher.BatchObserver`.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from logo_engine.types import Generation, Selection

BASE_MODEL_LABEL = "(base)"  # adapter label of requests answered by the base model alone
CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """Requests, latency, tokens, batch sizes and selections per adapter."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "logo_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "logo_request_latency_seconds",
            "Request latency (to the end of a stream)",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "logo_time_to_first_token_seconds",
            "Time from request to the first text of a stream",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("logo_requests_in_flight", "Requests being served", registry=r)
        self.prompt_tokens = Counter("logo_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("logo_completion_tokens", "Tokens generated", registry=r)
        self.batch_size = Histogram(
            "logo_batch_size", "Rows per engine batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.joined = Counter(
            "logo_joined_rows",
            "Rows that joined a batch already decoding (continuous batching)",
            registry=r,
        )
        self.queue_wait = Histogram(
            "logo_queue_wait_seconds",
            "Time a request waited for its batch to start (or to join one)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.selections = Counter(
            "logo_adapter_selections",
            "Answers each adapter took part in",
            ["adapter"],
            registry=r,
        )
        self.adapter_weight = Counter(
            "logo_adapter_weight",
            "Sum of each adapter's mixture weight over answers",
            ["adapter"],
            registry=r,
        )
        self.pinned = Counter("logo_pinned_requests", "Answers with a pinned mixture", registry=r)
        self.cancelled = Counter(
            "logo_cancelled_rows", "Rows stopped because their client went away", registry=r
        )

    # ---------------------------------------------------------------- BatchObserver
    def batch_started(self, size: int, queue_wait_s: list[float]) -> None:
        self.batch_size.observe(size)
        for wait in queue_wait_s:
            self.queue_wait.observe(wait)

    def rows_joined(self, queue_wait_s: list[float]) -> None:
        self.joined.inc(len(queue_wait_s))
        for wait in queue_wait_s:
            self.queue_wait.observe(wait)

    def row_finished(self, generation: Generation) -> None:
        self.prompt_tokens.inc(generation.usage.prompt_tokens)
        self.completion_tokens.inc(generation.usage.completion_tokens)
        self.selected(generation.selection)

    def row_cancelled(self) -> None:
        self.cancelled.inc()

    # ------------------------------------------------------------------------ others
    def selected(self, selection: Selection) -> None:
        """Count one answer's selection."""
        if selection.pinned:
            self.pinned.inc()
        if not selection.adapters:
            self.selections.labels(BASE_MODEL_LABEL).inc()
        for name, weight in zip(selection.adapters, selection.weights, strict=True):
            self.selections.labels(name).inc()
            self.adapter_weight.labels(name).inc(weight)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 before its first), e.g. ``logo_batch_size_sum``."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
