"""Prometheus metrics, served at GET /metrics.

A registry per app (not the global default) so that several apps in one process (tests) do not
collide. Routes are labelled by their template (`/v1/models/{name}/predict`), never by the raw
path, so label cardinality stays bounded whatever callers send.
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

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("heinfer_http_requests_total", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("heinfer_http_request_duration_seconds",
                                 "HTTP request latency by route", ["route", "method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.bytes_in = Counter("heinfer_body_bytes_received_total",
                                "request body bytes (keys, ciphertexts)", ["route"], registry=r)
        self.bytes_out = Counter("heinfer_body_bytes_sent_total",
                                 "response body bytes (ciphertexts)", ["route"], registry=r)
        self.queue_depth = Gauge("heinfer_queue_depth",
                                 "HE jobs submitted and not finished (running + waiting)",
                                 registry=r)
        self.queue_rejections = Counter("heinfer_queue_rejections_total",
                                        "requests refused with 503 because the queue was full",
                                        registry=r)
        self.workers = Gauge("heinfer_workers", "HE worker processes running", registry=r)
        self.worker_crashes = Counter("heinfer_worker_crashes_total",
                                      "worker processes that died (replaced at once), by what "
                                      "they were doing", ["during"], registry=r)
        self.key_cache = Counter("heinfer_key_cache_lookups_total",
                                 "session key loads in workers: from the cache or from disk",
                                 ["result"], registry=r)
        self.he_seconds = Histogram("heinfer_he_evaluation_seconds",
                                    "HE evaluation time inside a worker", ["model"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.sessions = Gauge("heinfer_sessions_active", "sessions with keys on disk",
                              registry=r)
        self.models = Gauge("heinfer_models", "models served", registry=r)
        self.quarantined = Counter("heinfer_quarantined_total",
                                   "files or directories without a row moved to quarantine/ "
                                   "at start", ["kind"], registry=r)
        self.limit_rejections = Counter("heinfer_limit_rejections_total",
                                        "requests refused by a rate, upload or disk limit",
                                        ["code"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
