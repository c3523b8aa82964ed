"""Every Prometheus metric, in one registry per app (DESIGN §9).

Names follow Prometheus conventions: ``gateway_`` prefix, ``_total`` for counters, base units
(``_seconds``, ``_bytes``), bounded labels (route templates, never raw paths or ids).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

from gateway.catalog import JOB_STATES, Catalog

disable_created_metrics()  # no *_created series: they double the output and nobody alerts on them

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The app's metrics. Attributes are prometheus-client metric objects."""

    def __init__(self, version: str = "0"):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Info("gateway_build", "Gateway version.", registry=r)
        self.build_info.info({"version": version})
        self.http_requests = Counter(
            "gateway_http_requests_total", "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"], registry=r)
        self.http_duration = Histogram(
            "gateway_http_request_duration_seconds", "Time to answer an HTTP request, by route template.",
            ["route", "method"], buckets=_DURATION_BUCKETS, registry=r)
        self.webhooks = Counter(
            "gateway_webhooks_received_total",
            "Webhook events received, by provider and outcome "
            "(accepted, duplicate, unauthorized, invalid, too_large, unavailable).",
            ["provider", "outcome"], registry=r)
        self.media_stored = Counter(
            "gateway_media_stored_total", "Media objects stored, by provider and category.",
            ["provider", "category"], registry=r)
        self.media_stored_bytes = Counter(
            "gateway_media_stored_bytes_total", "Bytes of media stored, by provider and category.",
            ["provider", "category"], registry=r)
        self.media_failures = Counter(
            "gateway_media_fetch_failures_total",
            "Media downloads that failed, by provider and reason.", ["provider", "reason"], registry=r)
        self.fetch_duration = Histogram(
            "gateway_media_fetch_duration_seconds",
            "Time to download one attachment and store it, by provider.",
            ["provider"], buckets=_DURATION_BUCKETS, registry=r)
        self.jobs = Gauge(
            "gateway_jobs", "Jobs in the durable queue, by kind and state.", ["kind", "state"], registry=r)
        self.jobs_processed = Counter(
            "gateway_jobs_processed_total", "Job attempts finished, by kind and outcome (done, retry, dead).",
            ["kind", "outcome"], registry=r)
        self.job_duration = Histogram(
            "gateway_job_duration_seconds", "Time one job attempt took, by kind.",
            ["kind"], buckets=_DURATION_BUCKETS, registry=r)
        self.deliveries = Counter(
            "gateway_deliveries_total", "Deliveries to bot targets, by target and outcome.",
            ["target", "outcome"], registry=r)

    async def refresh(self, catalog: Catalog, kinds: list[str]) -> None:
        """Read the queue's state from the catalog into the ``gateway_jobs`` gauge."""
        counts = await catalog.job_counts()
        for kind in sorted(set(kinds) | {k for k, _ in counts}):
            for state in JOB_STATES:
                self.jobs.labels(kind, state).set(counts.get((kind, state), 0))

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)
