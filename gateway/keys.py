"""Every typed ``web.AppKey`` of the daemon's application (a leaf: anything may import it).

The types are imported for the type checker only, so this module imports nothing from the
gateway at run time and no import cycle can pass through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import socket

    import aiohttp
    import pluggy

    from gateway.catalog import CatalogContract
    from gateway.config import Settings
    from gateway.ingest import Ingestor
    from gateway.jobs import JobQueue
    from gateway.links import LinkSigner
    from gateway.metrics import HttpObserver, Metrics
    from gateway.outbound import Outbound
    from gateway.retention import Retention
    from gateway.safefetch import SafeFetcher
    from gateway.serving import ServingWorkers
    from gateway.sdk.provider import Provider
    from gateway.sdk.storage import StorageBackend
    from gateway.store import MediaStore
    from gateway.web.auth import ApiKeys
    from gateway.web.events import Notifier

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
PLUGINS: web.AppKey[pluggy.PluginManager] = web.AppKey("plugins")
CATALOG: web.AppKey[CatalogContract] = web.AppKey("catalog")
STORAGE: web.AppKey[StorageBackend] = web.AppKey("storage")
PROVIDERS: web.AppKey[dict[str, Provider]] = web.AppKey("providers")
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http")
QUEUE: web.AppKey[JobQueue] = web.AppKey("queue")
INGESTOR: web.AppKey[Ingestor] = web.AppKey("ingestor")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
#: What the error middleware counts each answered request into: the app's :class:`Metrics`, or a
#: serving worker's :class:`gateway.metrics.ServingMetrics`.
HTTP_METRICS: web.AppKey[HttpObserver] = web.AppKey("http_metrics")
LINKS: web.AppKey[LinkSigner] = web.AppKey("links")
API_KEYS: web.AppKey[ApiKeys] = web.AppKey("api_keys")
RETENTION: web.AppKey[Retention] = web.AppKey("retention")
MEDIA_STORE: web.AppKey[MediaStore] = web.AppKey("media_store")
FETCHER: web.AppKey[SafeFetcher] = web.AppKey("fetcher")
OUTBOUND: web.AppKey[Outbound] = web.AppKey("outbound")
NOTIFIER: web.AppKey[Notifier] = web.AppKey("notifier")
SERVING_SOCKET: web.AppKey[socket.socket] = web.AppKey("serving_socket")
"""The daemon's hold on the serving workers' address (:func:`gateway.serving.reserve`), bound by
``gateway serve`` (else by the app's startup)."""
SERVING: web.AppKey[ServingWorkers] = web.AppKey("serving")
"""The serving workers, while ``serving.workers`` > 0."""
