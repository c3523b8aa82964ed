"""Every Prometheus metric, in one registry per app (DESIGN §9).

Names follow Prometheus conventions (https://prometheus.io/docs/practices/naming/): ``gateway_``
prefix, ``_total`` for counters, base units (``_seconds``, ``_bytes``), bounded labels (route
templates, never raw paths or ids; provider, backend, category, kind, state, target and outcome
names come from the configuration or from short fixed lists). ``promtool check metrics`` accepts
the output (tests/test_prometheus.py).

Values that live in the catalog (jobs by state, the oldest queued job, stored objects and bytes,
the last successful cleanup) are read from it at scrape time by :meth:`Metrics.refresh`.
:class:`MeteredStorage` counts and times every storage operation in the host, so storage plugins
need no metrics code of their own.

Several replicas (a PostgreSQL catalog): each replica is scraped as a target of its own, and the
``instance`` label Prometheus adds tells their series apart, so the metrics carry no replica label
of their own (Prometheus' convention: a target's identity is a target label). Totals across
replicas: ``sum without(instance) (rate(gateway_webhooks_total[5m]))``. The catalog-read gauges
(jobs, oldest queued job, stored media, last cleanup) are the shared catalog's, the same on every
replica: ``max without(instance)``, never a sum. ``gateway_replica_info{replica}`` names the
replica id a target writes into the jobs it leases (``jobs.owner``).

Serving workers (``[serving] workers``) are processes of their own: each counts its requests with
:class:`ServingMetrics` in prometheus-client's multiprocess mode (values in files of a directory
the daemon gives it), and the daemon's ``/metrics`` adds them up (:meth:`Metrics.add_serving_workers`)
as ``gateway_serving_requests_total`` and ``gateway_serving_request_duration_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.catalog import JOB_STATES, CatalogContract, CatalogStats
from gateway.media import CATEGORIES
from gateway.sdk.storage import (
    InvalidKey,
    LocalFiles,
    ObjectNotFound,
    ObjectStat,
    OpenedObject,
    PutResult,
    StorageBackend,
    StorageError,
)

log = logging.getLogger("gateway.metrics")

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: they double the output and nobody alerts on them

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_CLEANUP_BUCKETS = (0.1, 1, 10, 60, 300, 900, 1800, 3600, 7200)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

MEDIA_OUTCOMES = ("stored", "duplicate", "skipped", "refused", "retry", "failed")
"""``gateway_media_ingested_total`` outcomes: stored (a new object), duplicate (the attachment was
already stored: reused), skipped (the provider gave nothing to fetch), refused (too large or policy),
retry (this attempt failed; the job retries), failed (given up: forwarded with the original link)."""


MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""The environment variable that puts prometheus-client in multiprocess mode (read when it is
imported): the daemon sets it for its serving workers only."""


class HttpObserver(Protocol):
    """What the error middleware counts an answered request into (:data:`gateway.keys.HTTP_METRICS`)."""

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration in seconds."""


class RequestSeries:
    """Counts answered requests into ``requests`` (a counter labelled route, method, status) and
    their durations in seconds into ``duration`` (a histogram labelled route, method), looking the
    labelled series up once per route, method and status (a bounded set: route templates, known
    methods)."""

    def __init__(self, requests: Counter, duration: Histogram):
        self.requests = requests
        self.duration = duration
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one request answered with ``status`` after ``seconds``."""
        key = (route, method, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (self.requests.labels(route, method, str(status)),
                                          self.duration.labels(route, method))
        series[0].inc()
        series[1].observe(seconds)


def http_method(method: str) -> str:
    """``method`` if it is a standard one, else ``OTHER`` (clients choose methods: keep labels bounded)."""
    return method if method in HTTP_METHODS else "OTHER"


class Metrics:
    """The app's metrics. Attributes are prometheus-client metric objects; the README's Metrics
    table lists each one with its labels and meaning."""

    def __init__(self, version: str = "0"):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_* (start time, CPU, memory, fds), python_info, python_gc_*: what every exporter has
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        self.build_info = Info("gateway_build", "Gateway version (the value is always 1).", registry=r)
        self.build_info.info({"version": version})
        self.replica_info = Info(
            "gateway_replica", "This replica's id in the catalog's job leases (empty: an exclusive catalog, "
            "one daemon), and the catalog kind (the value is always 1).", registry=r)

        # -- HTTP and webhooks
        self.http_requests = Counter(
            "gateway_http_requests_total", "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"], registry=r)
        self.http_duration = Histogram(
            "gateway_http_request_duration_seconds", "Time to answer an HTTP request, by route template.",
            ["route", "method"], buckets=_DURATION_BUCKETS, registry=r)
        self._http = RequestSeries(self.http_requests, self.http_duration)
        self._webhook_series: dict[tuple[str, str], Counter] = {}  # see webhook_outcome
        #: the catalog read of the scrape in flight, and its catalog (:meth:`refresh`)
        self._stats: tuple[CatalogContract, asyncio.Future[CatalogStats]] | None = None
        self.webhooks = Counter(
            "gateway_webhooks_received_total",
            "Webhook events received, by provider and outcome "
            "(accepted, duplicate, unauthorized, invalid, too_large, unavailable, held_back).",
            ["provider", "outcome"], registry=r)

        # -- inbound media
        self.media_ingested = Counter(
            "gateway_media_ingested_total",
            "Media attachments handled by ingest jobs, by provider, category and outcome "
            "(stored, duplicate, skipped, refused, retry, failed).",
            ["provider", "category", "outcome"], registry=r)
        self.media_ingested_bytes = Counter(
            "gateway_media_ingested_bytes_total", "Bytes of media stored, by provider and category.",
            ["provider", "category"], registry=r)
        self.media_ingest_duration = Histogram(
            "gateway_media_ingest_duration_seconds",
            "Time to download one attachment and store it (or fail to), by provider, category and outcome.",
            ["provider", "category", "outcome"], buckets=_DURATION_BUCKETS, registry=r)
        self.media_failures = Counter(
            "gateway_media_fetch_failures_total",
            "Media downloads that failed, by provider and reason.", ["provider", "reason"], registry=r)

        # -- storage
        self.storage_operations = Counter(
            "gateway_storage_operations_total",
            "Storage backend operations, by backend, operation (put, open, stat, delete, list, url, check) "
            "and outcome (ok, not_found, invalid_key, error, aborted, cancelled).",
            ["backend", "operation", "outcome"], registry=r)
        self.storage_duration = Histogram(
            "gateway_storage_operation_duration_seconds",
            "Time of one storage operation, by backend and operation (put: the whole streamed upload; "
            "open: until the first byte can be read; list: the whole listing).",
            ["backend", "operation"], buckets=_DURATION_BUCKETS, registry=r)
        self.stored_objects = Gauge(
            "gateway_stored_objects", "Objects in storage according to the catalog, by backend and category.",
            ["backend", "category"], registry=r)
        self.stored_bytes = Gauge(
            "gateway_stored_bytes", "Bytes in storage according to the catalog, by backend and category.",
            ["backend", "category"], registry=r)
        self.missing_objects = Gauge(
            "gateway_media_missing_objects",
            "Catalog rows whose object a cleanup did not find in storage, by backend.", ["backend"], registry=r)
        self.storage_free_bytes = Gauge(
            "gateway_storage_free_bytes",
            "Free bytes where the backend writes, read at scrape time (only backends that can tell: "
            "local). Below the backend's min_free_bytes, puts are deferred and /readyz is 503.",
            ["backend"], registry=r)

        # -- the job queue and deliveries
        self.jobs = Gauge(
            "gateway_jobs", "Jobs in the durable queue, by kind and state.", ["kind", "state"], registry=r)
        self.jobs_oldest_queued = Gauge(
            "gateway_jobs_oldest_queued_age_seconds",
            "Age of the oldest queued job (since it was created, retries included), by kind; 0 when none.",
            ["kind"], registry=r)
        self.media_backlog_oldest = Gauge(
            "gateway_media_backlog_oldest_seconds",
            "Age of the waiting media (queued ingest job) closest to its provider's deadline, "
            "seconds since its webhook; 0 when none waits.", registry=r)
        self.media_backlog_deadline_used = Gauge(
            "gateway_media_backlog_deadline_ratio",
            "How much of its provider's deadline the waiting media closest to it has used "
            "(0..1; at 1 the provider may have deleted it); 0 when none waits.", registry=r)
        self.media_store_estimate = Gauge(
            "gateway_media_store_estimate_seconds",
            "Estimated seconds to store the waiting media (waiting ingest jobs / recent store rate of the "
            "saturated fetch lane); 0 while no rate is known. Updated every second.", registry=r)
        self.media_admission_holding = Gauge(
            "gateway_media_admission_holding",
            "1 while a provider's media webhooks are held back (503 + Retry-After) because the estimate "
            "is over [queue] admission_fraction of its media deadline, until it is back under half of that.",
            ["provider"], registry=r)
        self.catalog_commits = Counter(
            "gateway_catalog_commits_total",
            "Group commits of the catalog: each is one transaction.", registry=r)
        self.catalog_durable_commits = Counter(
            "gateway_catalog_durable_commits_total",
            "Those of the group commits that waited for the disk (an fsync); the others carried only "
            "writes a crash may lose (job claims, a delivery's completion, a media row whose job's "
            "completion follows).", registry=r)
        self.catalog_batch_size = Histogram(
            "gateway_catalog_batch_size",
            "Writes (webhooks, job claims and completions) that shared one group commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.jobs_processed = Counter(
            "gateway_jobs_processed_total", "Job attempts finished, by kind and outcome (done, retry, dead).",
            ["kind", "outcome"], registry=r)
        self.job_duration = Histogram(
            "gateway_job_duration_seconds", "Time one job attempt took, by kind.",
            ["kind"], buckets=_DURATION_BUCKETS, registry=r)
        self.deliveries = Counter(
            "gateway_deliveries_total",
            "Deliveries to bot targets, by target and outcome (delivered, error, http_4xx, http_5xx).",
            ["target", "outcome"], registry=r)

        # -- outbound
        self.outbound_sends = Counter(
            "gateway_outbound_sends_total",
            "Outbound media messages sent through a provider, by provider, media type and outcome "
            "(sent, refused, unreachable, error).", ["provider", "type", "outcome"], registry=r)
        self.relay_fallbacks = Counter(
            "gateway_relay_fallbacks_total",
            "Relayed sends forwarded with the original media because storing it failed, by provider.",
            ["provider"], registry=r)

        # -- retention cleanup
        self.cleanup_runs = Counter(
            "gateway_cleanup_runs_total",
            "Cleanup runs in this process, by trigger (schedule, api) and outcome (ok, dry_run, error, busy).",
            ["trigger", "outcome"], registry=r)
        self.cleanup_deleted = Counter(
            "gateway_cleanup_deleted_objects_total",
            "Objects deleted by cleanup runs, by backend and reason (age, expires_at, orphan).",
            ["backend", "reason"], registry=r)
        self.cleanup_deleted_bytes = Counter(
            "gateway_cleanup_deleted_bytes_total",
            "Bytes deleted by cleanup runs, by backend and reason (age, expires_at, orphan).",
            ["backend", "reason"], registry=r)
        self.cleanup_failures = Counter(
            "gateway_cleanup_delete_failures_total",
            "Objects a cleanup could not delete (kept for the next run), by backend.", ["backend"], registry=r)
        self.cleanup_aborted_uploads = Counter(
            "gateway_cleanup_aborted_uploads_total",
            "Incomplete (multipart) uploads left by a crash or an outage, aborted by cleanup runs, "
            "by backend.", ["backend"], registry=r)
        self.cleanup_pruned = Counter(
            "gateway_cleanup_pruned_rows_total", "Catalog rows pruned by cleanup runs, by table (events, jobs).",
            ["table"], registry=r)
        self.cleanup_duration = Histogram(
            "gateway_cleanup_duration_seconds", "Time of one cleanup run (dry runs included).",
            buckets=_CLEANUP_BUCKETS, registry=r)
        self.cleanup_in_progress = Gauge(
            "gateway_cleanup_in_progress", "1 while this process runs a cleanup, else 0.", registry=r)
        self.cleanup_last_success = Gauge(
            "gateway_cleanup_last_success_timestamp_seconds",
            "When the last successful cleanup run (not a dry run; any process) finished, Unix time; 0: never.",
            registry=r)

    # -- helpers for the call sites ----------------------------------------------------------
    def media_outcome(self, provider: str, category: str, outcome: str, *, seconds: float | None = None,
                      size: int | None = None) -> None:
        """Count one attachment's ``outcome`` (one of :data:`MEDIA_OUTCOMES`); ``seconds`` (the
        download-and-store time) goes to the histogram, ``size`` (bytes stored) to the byte counter."""
        self.media_ingested.labels(provider, category, outcome).inc()
        if seconds is not None:
            self.media_ingest_duration.labels(provider, category, outcome).observe(seconds)
        if size is not None:
            self.media_ingested_bytes.labels(provider, category).inc(size)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request (``gateway_http_requests_total``) and its duration in
        seconds (``gateway_http_request_duration_seconds``)."""
        self._http.observe(route, method, status, seconds)

    def webhook_outcome(self, provider: str, outcome: str, count: int = 1) -> None:
        """Count ``count`` webhook events of ``provider`` with ``outcome``
        (``gateway_webhooks_received_total``), the labelled series looked up once per pair."""
        series = self._webhook_series.get((provider, outcome))
        if series is None:
            series = self._webhook_series[(provider, outcome)] = self.webhooks.labels(provider, outcome)
        series.inc(count)

    def add_serving_workers(self, path: str) -> None:
        """Export the serving workers' metrics too: the sum over every worker, those that exited
        included, of what each wrote to the directory ``path`` (:class:`ServingMetrics`)."""
        self.registry.register(ServingWorkersCollector(path))

    def observe_commit(self, writes: int, durable: bool = True) -> None:
        """Count one group commit carrying ``writes`` writes, ``durable`` if it waited for the
        disk (called on the catalog thread)."""
        self.catalog_commits.inc()
        if durable:
            self.catalog_durable_commits.inc()
        self.catalog_batch_size.observe(writes)

    async def refresh(self, catalog: CatalogContract, kinds: list[str], now: float | None = None) -> None:
        """Read the catalog's state into the gauges (jobs by kind and state, the oldest queued job,
        stored objects and bytes, missing objects, the last successful cleanup).

        All reads happen first, then every gauge is set without yielding to the event loop, so a
        concurrent scrape never sees half-updated values. Groups that vanished from the catalog
        disappear from the output. Scrapes that overlap share one catalog read (it counts every
        job and media row, seconds on a large catalog): a second Prometheus, or a scrape retried
        after its timeout, waits for the read in flight rather than starting another.
        """
        if self._stats is None or self._stats[0] is not catalog or self._stats[1].done():
            self._stats = (catalog, asyncio.ensure_future(catalog.stats()))
            self._stats[1].add_done_callback(_retrieve)  # a scrape that gave up leaves no unread error
        stats = await asyncio.shield(self._stats[1])
        now = now if now is not None else time.time()
        all_kinds = sorted(set(kinds) | {k for k, _ in stats.jobs})
        for kind in all_kinds:
            for state in JOB_STATES:
                self.jobs.labels(kind, state).set(stats.jobs.get((kind, state), 0))
            oldest = stats.oldest_queued.get(kind)
            self.jobs_oldest_queued.labels(kind).set(max(0.0, now - oldest) if oldest is not None else 0)
        self.stored_objects.clear()
        self.stored_bytes.clear()
        self.missing_objects.clear()
        backends = {backend for backend, *_ in stats.media}
        for backend in backends:
            for category in CATEGORIES:  # every category, so that rate() and absent() behave
                self.stored_objects.labels(backend, category).set(0)
                self.stored_bytes.labels(backend, category).set(0)
            self.missing_objects.labels(backend).set(0)
        for backend, category, state, count, size in stats.media:
            if state == "stored":
                self.stored_objects.labels(backend, category).inc(count)
                self.stored_bytes.labels(backend, category).inc(size)
            elif state == "missing":
                self.missing_objects.labels(backend).inc(count)
        self.cleanup_last_success.set(stats.last_cleanup or 0)

    async def refresh_storage(self, storage: StorageBackend) -> None:
        """Set ``gateway_storage_free_bytes`` from the backend's optional ``free_bytes()``
        (see :class:`gateway.sdk.storage.StorageBackend`); absent when the backend has none or the
        query fails."""
        free_bytes = getattr(storage, "free_bytes", None)
        if free_bytes is None:
            return
        try:
            free = await free_bytes()
        except StorageError:
            self.storage_free_bytes.clear()
            return
        self.storage_free_bytes.labels(storage.name).set(free)

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)


def count_as_worker_slot(slot: int) -> None:
    """Make this process's multiprocess-mode metrics (:class:`ServingMetrics`) keep their values in
    the files of serving worker slot ``slot`` (``counter_slot<N>.db``, ``histogram_slot<N>.db``)
    instead of files named by its pid. Call it before the first metric is created. The daemon
    starts a slot's next worker only after the last one exited, so a slot has one process at a time
    (prometheus-client's rule for the identifier), and the next worker continues from the counts
    its predecessor left: the directory holds two files per slot however often workers restart,
    where files by pid piled up and each scrape read them all (2.1 ms with two workers, 37 ms
    after 200 restarts, on the daemon's event loop)."""
    values.ValueClass = values.MultiProcessValue(lambda: f"slot{slot}")  # type: ignore[no-untyped-call]


class ServingMetrics:
    """A serving worker's request counts (``gateway serve-media``): ``gateway_serving_requests_total``
    by route template, method and status, and ``gateway_serving_request_duration_seconds`` by route
    template and method (seconds). The daemon starts each worker with :data:`MULTIPROCESS_DIR_ENV`
    set, so prometheus-client keeps the values in files of that directory (one per worker slot and
    type, :func:`count_as_worker_slot`); the worker exports nothing itself, the daemon's
    ``/metrics`` sums the files (:meth:`Metrics.add_serving_workers`): a worker that exits keeps
    its counts in the sum, and the next worker of its slot counts on from them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # never rendered: the daemon reads the files
        self.requests = Counter(
            "gateway_serving_requests_total",
            "Requests the serving workers answered, by route template, method and status.",
            ["route", "method", "status"], registry=self.registry)
        self.duration = Histogram(
            "gateway_serving_request_duration_seconds", "Time the serving workers took to answer a request.",
            ["route", "method"], buckets=_DURATION_BUCKETS, registry=self.registry)
        self._series = RequestSeries(self.requests, self.duration)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration (seconds)."""
        self._series.observe(route, method, status, seconds)


class ServingWorkersCollector:
    """The serving workers' series for the daemon's registry: prometheus-client's
    :meth:`MultiProcessCollector.merge <prometheus_client.multiprocess.MultiProcessCollector.merge>`
    over the ``*.db`` files of the directory ``path`` (one per worker slot and metric type, see
    :func:`count_as_worker_slot`), with two conditions that must not fail the whole scrape:

    - a file of size 0 is a worker's that has opened it and not yet sized it (prometheus-client
      creates it at the worker's first request, then truncates it to its initial size). It holds no
      value yet and is left out; prometheus-client's own collector would raise ``struct.error``
      there, and ``/metrics`` answered 500 while a new worker took its first request;
    - a file that cannot be read (a truncated or foreign file) is left out with one WARNING naming
      it, repeated only if it is read again after it was readable.

    The directory gone (the daemon stopping) yields nothing."""

    def __init__(self, path: str):
        self.path = path
        self._unreadable: set[str] = set()  # already warned about

    def describe(self) -> list[Metric]:
        """Nothing: the names are only known from the files (the registry checks no collisions)."""
        return []

    def _files(self) -> list[str]:
        try:
            with os.scandir(self.path) as entries:
                return sorted(e.path for e in entries if e.name.endswith(".db") and e.stat().st_size > 0)
        except FileNotFoundError:
            return []

    def collect(self) -> Iterable[Metric]:
        """The merged series, as :class:`prometheus_client.metrics_core.Metric` objects."""
        files = self._files()
        try:
            merged: Iterable[Metric] = MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
            self._unreadable.clear()
        except (OSError, struct.error, ValueError, RuntimeError):
            readable = []  # find the culprits: each file alone
            for path in files:
                try:
                    MultiProcessCollector.merge([path])  # type: ignore[no-untyped-call]
                except FileNotFoundError:
                    continue
                except (OSError, struct.error, ValueError, RuntimeError) as exc:
                    if path not in self._unreadable:
                        self._unreadable.add(path)
                        log.warning("serving workers' metrics: cannot read %s (%s: %s); its counts are left out "
                                    "of /metrics", path, type(exc).__name__, exc)
                    continue
                self._unreadable.discard(path)
                readable.append(path)
            merged = MultiProcessCollector.merge(readable)  # type: ignore[no-untyped-call]
        return merged


class MeteredStorage:
    """A :class:`gateway.sdk.storage.StorageBackend` that forwards to ``backend`` and records every
    operation in ``gateway_storage_operations_total`` and ``gateway_storage_operation_duration_seconds``.

    Outcomes: ``ok``; ``not_found`` (:class:`ObjectNotFound`, or ``delete`` of an absent key);
    ``invalid_key``; ``error`` (any other :class:`StorageError`); ``aborted`` (the source stream
    of a ``put`` failed, e.g. a download error or the size limit: the backend stored nothing);
    ``cancelled``. Exceptions propagate unchanged. Other attributes are the backend's own.
    """

    def __init__(self, backend: StorageBackend, metrics: Metrics):
        self.backend = backend
        self.name = backend.name
        self._metrics = metrics
        self._local_path = backend.local_path if isinstance(backend, LocalFiles) else None

    def __getattr__(self, name: str) -> Any:  # only for names this class does not define
        if name == "backend":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.backend, name)

    @contextmanager
    def _observe(self, operation: str) -> Iterator[dict[str, str]]:
        started = time.monotonic()
        result = {"outcome": "ok"}
        try:
            yield result
        except ObjectNotFound:
            result["outcome"] = "not_found"
            raise
        except InvalidKey:
            result["outcome"] = "invalid_key"
            raise
        except StorageError:
            result["outcome"] = "error"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            result["outcome"] = "cancelled"
            raise
        except Exception:
            result["outcome"] = "aborted" if operation == "put" else "error"
            raise
        finally:
            m = self._metrics
            m.storage_operations.labels(self.name, operation, result["outcome"]).inc()
            m.storage_duration.labels(self.name, operation).observe(time.monotonic() - started)

    async def start(self) -> None:
        """Start the backend (not counted: it is not an object operation)."""
        await self.backend.start()

    async def close(self) -> None:
        """Close the backend."""
        await self.backend.close()

    async def put(self, key: str, stream: AsyncIterator[bytes], content_type: str, metadata: dict[str, str],
                  category: str | None = None) -> PutResult:
        """See :meth:`gateway.sdk.storage.StorageBackend.put`."""
        with self._observe("put"):
            return await self.backend.put(key, stream, content_type, metadata, category=category)

    async def open(self, key: str, start: int | None = None, end: int | None = None,
                   bucket: str | None = None) -> OpenedObject:
        """See :meth:`gateway.sdk.storage.StorageBackend.open`."""
        with self._observe("open"):
            return await self.backend.open(key, start, end, bucket=bucket)

    async def stat(self, key: str, bucket: str | None = None) -> ObjectStat:
        """See :meth:`gateway.sdk.storage.StorageBackend.stat`."""
        with self._observe("stat"):
            return await self.backend.stat(key, bucket=bucket)

    async def delete(self, key: str, bucket: str | None = None) -> bool:
        """See :meth:`gateway.sdk.storage.StorageBackend.delete`; an absent key counts as ``not_found``."""
        with self._observe("delete") as result:
            existed = await self.backend.delete(key, bucket=bucket)
            if not existed:
                result["outcome"] = "not_found"
            return existed

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectStat]:
        """See :meth:`gateway.sdk.storage.StorageBackend.list`; counted once, when the listing ends."""
        with self._observe("list"):
            async for item in self.backend.list(prefix):
                yield item

    async def url(self, key: str, expires: int, filename: str | None = None, bucket: str | None = None,
                  content_type: str | None = None) -> str | None:
        """See :meth:`gateway.sdk.storage.StorageBackend.url`."""
        with self._observe("url"):
            return await self.backend.url(key, expires, filename=filename, bucket=bucket,
                                          content_type=content_type)

    async def check(self) -> None:
        """See :meth:`gateway.sdk.storage.StorageBackend.check`."""
        with self._observe("check"):
            await self.backend.check()

    def local_path(self, key: str, bucket: str | None = None) -> str | None:
        """See :meth:`gateway.sdk.storage.LocalFiles.local_path`; ``None`` for a backend without
        local files. Not counted: it does no I/O (the web layer's sendfile reads the file)."""
        return self._local_path(key, bucket) if self._local_path is not None else None


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark the outcome of ``future`` as read (its waiters, if any, got it already)."""
    if not future.cancelled():
        future.exception()
