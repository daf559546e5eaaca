"""Prometheus metrics of the service, correct with any number of workers.

With several workers each process keeps its own counters, and a scrape
reaches only one of them; so `run` points ``PROMETHEUS_MULTIPROC_DIR`` at a
fresh directory before the workers start, every process writes its values
there, and ``/metrics`` aggregates them all (prometheus_client's
multiprocess mode). A single process without that variable uses an ordinary
in-memory registry.

Histograms are tallied in the process (`Tally`) and added to prometheus's
values in one go by `Metrics.flush`: at every scrape of this process, and
every `FLUSH_SECONDS` (`insertrec.serving.app` runs it), so another worker's
observations reach a scrape within that time. In multiprocess mode each
observation is two writes to a memory-mapped file under a lock, ~4 us; a
decision observes six, a sizeable share of the serving path's CPU. Counters
are counted at once: they are what a test or an operator compares right away.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = ["FLUSH_SECONDS", "MULTIPROC_ENV", "STAGES", "Metrics", "Stopwatch", "Tally"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_SECONDS = 1.0
STAGES = ("validation", "features", "scoring", "logging")
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_GROUP = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_STAGE = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Tally:
    """Observations of one histogram (or labelled child of one), kept here until `flush` adds them
    to it: the bucket an observation falls in is the one prometheus would pick (the first upper
    bound at or above it)."""

    __slots__ = ("_bounds", "_counts", "_histogram", "_sum")

    def __init__(self, histogram: Histogram):
        self._histogram = histogram
        self._bounds = histogram._upper_bounds
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def flush(self) -> None:
        if not any(self._counts):
            return
        self._histogram._sum.inc(self._sum)
        for bucket, count in zip(self._histogram._buckets, self._counts):
            if count:
                bucket.inc(count)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0


class Metrics:
    """The service's metrics; ``stage`` holds one histogram tally per request stage."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self._exposed = CollectorRegistry()
        if self.multiprocess:
            multiprocess.MultiProcessCollector(self._exposed)
        registry = None if self.multiprocess else self._exposed
        self.requests = Counter("insertrec_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=registry)
        self.latency = Histogram("insertrec_request_seconds", "HTTP request latency by route",
                                 ["route"], buckets=_LATENCY, registry=registry)
        stages = Histogram("insertrec_stage_seconds", "time per decision stage", ["stage"],
                           buckets=_STAGE, registry=registry)
        self._tallies: list[Tally] = []
        self.stage = {s: self._tally(stages.labels(s)) for s in STAGES}
        self.decisions = Counter("insertrec_decisions", "decisions by policy", ["policy"], registry=registry)
        self.fallbacks = Counter("insertrec_fallbacks", "decisions answered from the catalog's rules "
                                 "because the model failed or is missing", registry=registry)
        self.retries = Counter("insertrec_decision_retries", "decisions redone because stock, budget or "
                               "the customer's history changed before commit", ["reason"], registry=registry)
        self.commit_group = self._tally(Histogram("insertrec_commit_group_size", "decisions committed in one "
                                                  "transaction", buckets=_GROUP, registry=registry))
        self.decide_batch = self._tally(Histogram("insertrec_decide_batch_size", "orders decided together in "
                                                  "one micro-batch", buckets=_GROUP, registry=registry))
        self.model_loads = Counter("insertrec_model_loads", "model loads by result", ["result"],
                                   registry=registry)
        self.degraded = Gauge("insertrec_degraded", "1 while a worker serves without its model",
                              registry=registry, multiprocess_mode="livemax")
        self.spooled = Counter("insertrec_spooled_decisions", "decisions answered while the decision log was "
                               "unavailable, written to the local spool", registry=registry)
        self.spool_replayed = Counter("insertrec_spool_replayed", "spooled decisions replayed into the log "
                                      "(an order already logged counts, and stores nothing)", registry=registry)
        self.spool_depth = Gauge("insertrec_spool_depth", "spooled decisions not yet in the log",
                                 registry=registry, multiprocess_mode="livesum")
        self._request_children: dict[tuple[str, int], Any] = {}
        self._latency_children: dict[str, Tally] = {}
        self._decided_children: dict[str, Any] = {}

    def _tally(self, histogram: Histogram) -> Tally:
        tally = Tally(histogram)
        self._tallies.append(tally)
        return tally

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(route, str(status))
        child.inc()
        timer = self._latency_children.get(route)
        if timer is None:
            timer = self._latency_children[route] = self._tally(self.latency.labels(route))
        timer.observe(seconds)

    def decided(self, policy: str) -> None:
        """Count a decision of ``policy`` (the labelled child looked up once: ~2 us a decision)."""
        child = self._decided_children.get(policy)
        if child is None:
            child = self._decided_children[policy] = self.decisions.labels(policy)
        child.inc()

    def flush(self) -> None:
        """Add the tallied observations to the histograms (see the module docstring)."""
        for tally in self._tallies:
            tally.flush()

    def render(self) -> bytes:
        self.flush()
        return generate_latest(self._exposed)

    def close(self) -> None:
        """Flush, and drop this process's live-only gauges from the shared directory (graceful exit)."""
        self.flush()
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())


class Stopwatch:
    """Laps between checkpoints of one request, each into its stage histogram."""

    __slots__ = ("_metrics", "_t")

    def __init__(self, metrics: Metrics, start: float | None = None):
        self._metrics = metrics
        self._t = time.perf_counter() if start is None else start

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self._metrics.stage[stage].observe(now - self._t)
        self._t = now
