"""The app factory shared by production and tests: ``create_app(settings) -> web.Application``.

Every resource (catalog, HTTP client session, storage backend, providers, job workers) is opened
and closed in a ``cleanup_ctx``, reached through the typed ``web.AppKey`` constants of
:mod:`gateway.keys`; the routes come from the table in :mod:`gateway.web.routes`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
import pluggy
from aiohttp import web

from gateway.catalog import catalog_from_settings
from gateway.config import ConfigError, Settings, check_plugin_sections
from gateway.delivery import Deliverer
from gateway.ingest import Ingestor
from gateway.jobs import JobQueue
from gateway.keys import (
    API_KEYS,
    CATALOG,
    FETCHER,
    HTTP,
    HTTP_METRICS,
    INGESTOR,
    LINKS,
    MEDIA_STORE,
    METRICS,
    NOTIFIER,
    OUTBOUND,
    PLUGINS,
    PROVIDERS,
    QUEUE,
    RETENTION,
    SERVING,
    SERVING_SOCKET,
    SETTINGS,
    STORAGE,
)
from gateway.links import LinkSigner
from gateway.metrics import MeteredStorage, Metrics, ServingMetrics
from gateway.outbound import Outbound
from gateway.plugins import await_me_maybe, make_manager, offered, section_models
from gateway.retention import Retention
from gateway.safefetch import SafeFetcher
from gateway.sdk.download import DownloadPolicy
from gateway.sdk.provider import Provider, ProviderContext
from gateway.sdk.storage import StorageBackend
from gateway.store import MediaStore
from gateway.version import gateway_version
from gateway.web import console
from gateway.web.auth import ApiKeys
from gateway.web.errors import error_middleware
from gateway.web.events import Notifier
from gateway.web.files import file_view
from gateway.web.routes import add_routes

log = logging.getLogger("gateway.app")


def select_providers(settings: Settings, pm: pluggy.PluginManager) -> dict[str, Provider]:
    """Providers offered by the ``register_providers`` hook, by name.

    Raises :class:`ConfigError` for a plugin's bad settings or two providers with one name.
    """
    providers: dict[str, Provider] = offered(pm, "register_providers", settings, "providers")
    return providers


def check_sections(settings: Settings, pm: pluggy.PluginManager) -> None:
    """Refuse plugin sections no plugin owns and bad keys in those present (see
    :func:`gateway.config.check_plugin_sections`). Raises :class:`ConfigError`."""
    check_plugin_sections(settings, section_models(pm))


def select_storage(settings: Settings, pm: pluggy.PluginManager) -> StorageBackend:
    """The backend named by ``storage.backend``. Raises :class:`ConfigError` if none offers it,
    or if two plugins offer one name (naming both)."""
    backends: dict[str, StorageBackend] = offered(pm, "register_storage", settings, "storage")
    name = settings.storage.backend
    if name not in backends:
        raise ConfigError(f"storage.backend: no installed storage plugin offers {name!r} "
                          "(`gateway plugins` lists what loaded)")
    return backends[name]


def create_app(settings: Settings, pm: pluggy.PluginManager | None = None) -> web.Application:
    """Build the daemon's application. Raises :class:`ConfigError` or
    :class:`gateway.plugins.PluginLoadError` before anything is opened."""
    settings.require_env()  # the daemon uses every setting: no "${NAME}" may stay unexpanded
    pm = pm if pm is not None else make_manager()
    check_sections(settings, pm)
    providers = select_providers(settings, pm)
    storage = select_storage(settings, pm)
    metrics = Metrics(gateway_version())
    app = web.Application(
        client_max_size=settings.server.max_webhook_bytes,
        middlewares=[error_middleware],
    )
    app[SETTINGS] = settings
    app[PLUGINS] = pm
    app[PROVIDERS] = providers
    app[STORAGE] = storage = MeteredStorage(storage, metrics)  # every operation counted and timed
    app[METRICS] = metrics
    app[HTTP_METRICS] = metrics
    app[CATALOG] = catalog_from_settings(settings, exclusive=True)  # SQLite: one daemon per catalog
    metrics.replica_info.info({"replica": app[CATALOG].replica or "", "catalog": app[CATALOG].kind})
    app[CATALOG].on_commit = metrics.observe_commit
    app[CATALOG].default_media_lifetime = settings.queue.media_deadline
    app[CATALOG].media_lifetimes = dict(settings.queue.media_deadlines)
    app[LINKS] = LinkSigner.from_settings(settings)
    app[API_KEYS] = ApiKeys(settings.api)
    app[MEDIA_STORE] = MediaStore(settings, app[CATALOG], app[STORAGE], pm)
    app[RETENTION] = Retention(settings, app[CATALOG], storage, metrics, pm=pm, rows=app[MEDIA_STORE].rows)
    app[FETCHER] = SafeFetcher(settings.fetch)
    app[OUTBOUND] = Outbound(app[CATALOG], storage, app[LINKS], metrics, app[MEDIA_STORE], app[FETCHER])
    app[NOTIFIER] = Notifier(lambda record: file_view(app, record), app[CATALOG])
    pm.register(app[NOTIFIER], name=f"gateway-notifier-{id(app)}")
    add_routes(app)
    console.setup(app)
    for provider in providers.values():
        for route in provider.routes():
            app.router.add_route(route.method, route.path, route.handler)
    pm.hook.register_routes(app=app)
    app.cleanup_ctx.extend([_catalog_ctx, _http_ctx, _fetcher_ctx, _storage_ctx, _providers_ctx,
                            _queue_ctx, _retention_ctx, _plugins_ctx])
    if settings.serving.workers:
        app.cleanup_ctx.append(_serving_ctx)
        app.on_shutdown.append(_serving_shutdown)
    return app


async def _catalog_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[CATALOG].open()
    await app[NOTIFIER].start()  # /events notices from every replica, through the catalog
    yield
    await app[NOTIFIER].stop()
    await app[CATALOG].close()


async def _http_ctx(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(
        auto_decompress=False,  # stored bytes are the bytes the provider sent
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=app[SETTINGS].media.fetch_connect_timeout),
    )
    app[HTTP] = session
    yield
    await session.close()


async def _fetcher_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[FETCHER].start()
    yield
    await app[FETCHER].close()


async def _storage_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[STORAGE].start()
    yield
    app[MEDIA_STORE].files.close()
    await app[STORAGE].close()


async def _providers_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    ctx = ProviderContext(
        http=app[HTTP], max_bytes=s.media.max_bytes,
        fetch_timeout=aiohttp.ClientTimeout(total=s.media.fetch_timeout,
                                            sock_connect=s.media.fetch_connect_timeout),
        outbound=app[OUTBOUND],
        download=DownloadPolicy(idle_timeout=s.media.fetch_idle_timeout,
                                connect_timeout=s.media.fetch_connect_timeout,
                                base_timeout=s.media.fetch_timeout, min_rate=s.media.fetch_min_rate,
                                max_bytes=s.media.max_bytes, max_resumes=s.media.fetch_resumes,
                                thread_min_bytes=s.media.fetch_thread_min_bytes),
    )
    for provider in app[PROVIDERS].values():
        await provider.start(ctx)
    yield
    for provider in app[PROVIDERS].values():
        await provider.close()


async def _queue_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    deliver = Deliverer(s, app[CATALOG], app[HTTP], app[METRICS], app[PLUGINS])
    ingest = Ingestor(s, app[CATALOG], app[MEDIA_STORE], app[PROVIDERS], app[LINKS], app[METRICS],
                      forwards=deliver.forwards)
    queue = JobQueue(app[CATALOG], s.queue, app[METRICS], {"ingest": ingest, "deliver": deliver})
    app[QUEUE] = queue
    app[INGESTOR] = ingest
    await queue.start()
    names = ", ".join(app[PROVIDERS].keys()) or "none"
    log.info("gateway ready: %d fetch + %d deliver worker(s), storage %s, providers %s",
             s.queue.fetch_workers, s.queue.workers, app[STORAGE].name, names)
    yield
    await queue.stop(s.server.shutdown_grace)


async def _retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """The cleanup schedule (APScheduler); stopped, and a run in progress cancelled, before the
    queue, storage and catalog close."""
    app[RETENTION].start_scheduler()
    yield
    await app[RETENTION].stop()


async def _plugins_ctx(app: web.Application) -> AsyncIterator[None]:
    for result in app[PLUGINS].hook.startup(app=app):
        await await_me_maybe(result)
    yield
    for result in app[PLUGINS].hook.shutdown(app=app):
        await await_me_maybe(result)
    if app[PLUGINS].is_registered(app[NOTIFIER]):  # the manager may outlive this app
        app[PLUGINS].unregister(app[NOTIFIER])


async def _serving_ctx(app: web.Application) -> AsyncIterator[None]:
    """The serving workers (``[serving]``), started once the catalog is open and migrated (they
    open it read-only) and stopped first on shutdown, on the address ``gateway serve`` reserved."""
    from gateway.serving import ServingWorkers, reserve

    sock = app[SERVING_SOCKET] if SERVING_SOCKET in app else reserve(app[SETTINGS])
    workers = app[SERVING] = ServingWorkers(app[SETTINGS], sock)
    app[METRICS].add_serving_workers(workers.metrics_dir)
    await workers.start()
    yield
    await workers.stop()


async def _serving_shutdown(app: web.Application) -> None:
    """SIGTERM to the serving workers as the daemon's graceful shutdown begins, so that they finish
    their requests while the daemon finishes its own (:func:`_serving_ctx` then waits for them)."""
    if SERVING in app:
        await app[SERVING].terminate()


def create_serving_app(settings: Settings, pm: pluggy.PluginManager) -> web.Application:
    """A serving worker's application: the ``media`` routes of the route table and the error
    middleware; the storage backend ``storage.backend`` names and the catalog read-only, opened
    and closed in its ``cleanup_ctx``. Raises :class:`gateway.config.ConfigError` (no such
    backend)."""
    storage = select_storage(settings, pm)
    catalog = catalog_from_settings(settings, read_only=True)
    app = web.Application(middlewares=[error_middleware])
    app[SETTINGS] = settings
    app[STORAGE] = storage
    app[CATALOG] = catalog
    app[HTTP_METRICS] = ServingMetrics()  # the daemon's /metrics sums the workers' counts
    app[LINKS] = LinkSigner.from_settings(settings)
    app[MEDIA_STORE] = MediaStore(settings, catalog, storage, pm)  # for its rows: it changes nothing here
    add_routes(app, tag="media")

    async def resources(app: web.Application) -> AsyncIterator[None]:
        await catalog.open()
        try:
            await storage.start()
            try:
                yield
            finally:
                app[MEDIA_STORE].files.close()
                await storage.close()
        finally:
            await catalog.close()

    app.cleanup_ctx.append(resources)
    return app
