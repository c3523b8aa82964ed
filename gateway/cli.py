"""The command line: ``gateway serve | check-config | cleanup | migrate | plugins`` (also
``python -m gateway``; ``serve-media``, hidden, is a serving worker the daemon starts).

Exit status 2: the configuration is invalid (one line on stderr per problem, naming the setting);
for ``serve``, also a catalog another daemon holds (the line names its PID) or an address in use.
Exit status 1: a plugin failed to load (the line names the plugin); for ``cleanup``, also a run
that stopped early or could not delete some objects.
Exit status 3: ``cleanup`` found another cleanup running.
For ``migrate``: 2 also when a daemon runs on the SQLite catalog, 1 when the target cannot be
opened or is not empty.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from concurrent.futures import ThreadPoolExecutor
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from gateway.config import ConfigError, Settings, load_settings
from gateway.plugins import PluginLoadError, describe, make_manager

if TYPE_CHECKING:
    from gateway.retention import CleanupItem, CleanupReport
    from gateway.sdk.storage import StorageBackend

T = TypeVar("T")

CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    envvar="GATEWAY_CONFIG", show_envvar=True,
    help="Path to gateway.toml (default: ./gateway.toml).",
)


def _config_error(exc: ConfigError) -> None:
    """Print every problem, one line each, and exit 2."""
    for line in str(exc).splitlines():
        click.echo(f"gateway: config error: {line}", err=True)
    sys.exit(2)


def _settings(config_path: Path | None, uses: tuple[str, ...] | None = None) -> Settings:
    try:
        return load_settings(config_path, uses=uses)
    except ConfigError as exc:
        _config_error(exc)
        raise  # not reached


def _or_exit(build: Callable[[], T]) -> T:
    """Run ``build``; a config error exits 2, a plugin that fails to load exits 1 (one line each)."""
    try:
        return build()
    except ConfigError as exc:
        _config_error(exc)
        raise  # not reached
    except PluginLoadError as exc:
        click.echo(f"gateway: {exc}", err=True)
        sys.exit(1)


@click.group()
@click.version_option(package_name="chat-media-gateway")
def main() -> None:
    """Chat-media gateway: stores WhatsApp media durably and forwards messages to bots."""


@main.command()
@CONFIG_OPTION
def serve(config_path: Path | None) -> None:
    """Start the daemon. SIGTERM or Ctrl-C stops it gracefully.

    Order: settings, the catalog's exclusive lock, the listening socket, then (in the app's
    startup) the catalog, the requeue of jobs a crash left running, and the workers; so a daemon
    that cannot run touches nothing. A catalog in use by another daemon, or an address in use,
    is one line on stderr and exit status 2.
    """
    from aiohttp import web

    from gateway.app import create_app
    from gateway.catalog import CatalogLocked
    from gateway.keys import CATALOG
    from gateway.logs import setup_logging

    settings = _settings(config_path)
    setup_logging(settings.log)
    app = _or_exit(lambda: create_app(settings))
    try:
        app[CATALOG].lock()
    except CatalogLocked as exc:
        click.echo(f"gateway: {exc}", err=True)
        sys.exit(2)
    host, port = settings.server.host, settings.server.port
    sock = _listen(f"{host}:{port}", lambda: socket.create_server((host, port)))
    if settings.serving.workers:
        from gateway.keys import SERVING_SOCKET
        from gateway.serving import reserve

        app[SERVING_SOCKET] = _listen(f"{settings.serving_host}:{settings.serving.port}",
                                      lambda: reserve(settings))
    log = logging.getLogger("gateway")
    log.info("listening on http://%s:%d (public URL %s)", host, sock.getsockname()[1],
             settings.server.base_url)
    # The catalog thread releases the GIL for every SQLite statement and its fsync; at the default
    # 5 ms switch interval, getting it back behind a busy event loop costs more than the fsync.
    sys.setswitchinterval(0.0005)
    app.on_startup.append(_settle_garbage_collector)  # after every resource's startup
    # Blocking file work (writes, fsync, libmagic, thumbnails) runs in the loop's default executor:
    # enough threads for every download of the fetch lane to wait on its fsync at once, since the
    # file system batches concurrent fsyncs into one journal commit.
    loop = asyncio.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=settings.queue.fetch_workers + 8,
                                                 thread_name_prefix="gateway-io"))
    web.run_app(app, sock=sock, print=None, shutdown_timeout=settings.server.shutdown_grace,
                handle_signals=True, loop=loop)


async def _settle_garbage_collector(app: Any) -> None:
    """Once the process has started: move every object alive now (modules, settings, plugins,
    routes: over 80,000) out of the garbage collector's reach (``gc.freeze``), so that a full
    collection no longer walks them (30 ms here before). Measured on the webhook path (B1): the
    event loop's CPU per webhook fell by about 8%. (Collecting the young generation less often as
    well, every 10,000 allocations, made the p99 of webhooks at 500/s worse: 29 ms against 20.)"""
    gc.collect()
    gc.freeze()


def _listen(address: str, bind: Callable[[], socket.socket]) -> socket.socket:
    """``bind()``; an address in use (or another ``OSError``) is one line on stderr and exit 2."""
    try:
        return bind()
    except OSError as exc:
        click.echo(f"gateway: cannot listen on {address}: {os.strerror(exc.errno) if exc.errno else exc}",
                   err=True)
        sys.exit(2)


@main.command("serve-media", hidden=True)
@CONFIG_OPTION
@click.option("--alive-fd", type=int, required=True, help="A pipe's read end: exit at its end of file.")
@click.option("--slot", type=int, default=None, help="The worker's slot: its metrics files are the slot's.")
def serve_media(config_path: Path | None, alive_fd: int, slot: int | None) -> None:
    """A serving worker (started by the daemon with ``[serving] workers``, see
    :mod:`gateway.serving`): serve ``/media`` and ``/public`` on the serving address."""
    from gateway.catalog import CatalogError
    from gateway.logs import setup_logging
    from gateway.app import create_serving_app
    from gateway.metrics import count_as_worker_slot
    from gateway.serving import listen, run_worker

    if slot is not None:
        count_as_worker_slot(slot)
    settings = _settings(config_path)
    setup_logging(settings.log)
    pm = _or_exit(make_manager)
    app = _or_exit(lambda: create_serving_app(settings, pm))
    app.on_startup.append(_settle_garbage_collector)
    sock = _listen(f"{settings.serving_host}:{settings.serving.port}", lambda: listen(settings))
    try:
        asyncio.run(run_worker(app, sock, alive_fd, settings.server.shutdown_grace))
    except CatalogError as exc:  # e.g. a schema this gateway does not know: the daemon says more
        click.echo(f"gateway: serving worker: {exc}", err=True)
        sys.exit(1)


@main.command("check-config")
@CONFIG_OPTION
def check_config(config_path: Path | None) -> None:
    """Validate the configuration (including the plugins' sections) and exit."""
    from gateway.app import check_sections, select_providers, select_storage

    settings = _settings(config_path)
    pm = _or_exit(make_manager)
    _or_exit(lambda: check_sections(settings, pm))
    providers = _or_exit(lambda: select_providers(settings, pm))
    storage = _or_exit(lambda: select_storage(settings, pm))
    click.echo(f"ok: storage {storage.name}, providers {', '.join(providers) or 'none'}, "
               f"{len(settings.targets)} target(s), catalog {settings.catalog.describe()}")


def _size(n: int) -> str:
    """``n`` bytes, also in binary units: ``1536 bytes (1.5 KiB)``."""
    value, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} bytes" + (f" ({value:.1f} {unit})" if unit != "bytes" else "")


class _CleanupDisplay:
    """Progress for ``gateway cleanup``: a progress bar on stderr when it is a terminal (phases
    whose size is known), and one line per object on stdout with ``--verbose``."""

    def __init__(self, bar: bool, verbose: bool, dry_run: bool):
        self.bar_enabled, self.verbose, self.dry_run = bar, verbose, dry_run
        self._bar: Any = None  # click's progress bar while a phase with a known total runs

    def phase(self, name: str, total: int | None) -> None:
        self.close()
        if self.bar_enabled and total:
            labels = {"expired": "expired objects", "orphans": "orphans"}
            self._bar = click.progressbar(length=total, label=labels.get(name, name), file=sys.stderr,
                                          show_pos=True)
            self._bar.__enter__()

    def item(self, item: CleanupItem) -> None:
        if self.verbose:
            verb = {"delete": "would delete" if self.dry_run else "deleted", "failed": "FAILED",
                    "missing": "missing", "kept": "kept (in use)",
                    "abort": "would abort" if self.dry_run else "aborted"}[item.action]
            where = f"{item.bucket}/{item.key}" if item.bucket else item.key
            line = f"{verb:<13} {item.reason:<10} {item.size:>12}  {where}"
            if self._bar is not None:
                line = "\r\x1b[K" + line  # over the bar's line; the next update draws it below
            click.echo(line + (f"  {item.error}" if item.error else ""))
        if self._bar is not None and item.action in ("delete", "failed"):
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


async def _run_cleanup(settings: Settings, storage: StorageBackend, dry_run: bool,
                       display: _CleanupDisplay) -> CleanupReport:
    """Open the catalog and the storage backend as the daemon does, run one cleanup, close them."""
    from gateway.catalog import catalog_from_settings
    from gateway.metrics import MeteredStorage, Metrics
    from gateway.retention import Retention

    catalog = catalog_from_settings(settings)
    await catalog.open()
    metrics = Metrics()
    backend = MeteredStorage(storage, metrics)
    try:
        await backend.start()
        try:
            return await Retention(settings, catalog, backend, metrics).run(
                dry_run=dry_run, trigger="cli", progress=display)
        finally:
            display.close()
            await backend.close()
    finally:
        await catalog.close()


def _print_report(report: CleanupReport) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    reasons = ", ".join(f"{r} {d['objects']}" for r, d in sorted(report.deleted.items())) or "none"
    click.echo(f"{verb} {report.objects} objects, {_size(report.bytes)}; by reason: {reasons}")
    if report.kept_in_use:
        click.echo(f"kept {report.kept_in_use} expired objects that queued or running jobs still need")
    if report.listed is not None:
        click.echo(f"storage listed {report.listed} objects; {report.orphans_in_grace} orphans within the "
                   f"grace period, {report.foreign_objects} foreign objects left alone")
    if report.aborted_uploads is not None:
        click.echo(f"{'would abort' if report.dry_run else 'aborted'} {report.aborted_uploads} incomplete "
                   f"uploads; {report.uploads_in_grace} within the grace period")
    if report.missing:
        shown = ", ".join(report.missing_ids[:20]) + (" ..." if report.missing > 20 else "")
        click.echo(f"{'found' if report.dry_run else 'marked'} {report.missing} rows missing "
                   f"(object not in storage): {shown}")
    pruned = "would prune" if report.dry_run else "pruned"
    click.echo(f"{pruned} {report.pruned['events']} events and {report.pruned['jobs']} done jobs")
    if report.failed:
        click.echo(f"failed to delete {report.failed} objects (kept for the next run):", err=True)
        for line in report.errors:
            click.echo(f"  {line}", err=True)
    if report.error:
        click.echo(f"gateway: cleanup stopped early: {report.error}", err=True)
    if report.dry_run:
        click.echo("dry run: nothing was changed")


CLEANUP_USES = ("catalog", "storage", "retention", "log", "media")
"""The settings ``gateway cleanup`` reads: a secret only the daemon needs (an API key, a provider's
token) may be unset in cron's environment."""


@main.command()
@CONFIG_OPTION
@click.option("--dry-run", is_flag=True, help="Change nothing; print what a run would delete.")
@click.option("-v", "--verbose", is_flag=True, help="Print one line per object (deleted, missing, kept).")
def cleanup(config_path: Path | None, dry_run: bool, verbose: bool) -> None:
    """Run the retention cleanup once, as the schedule does ([retention] in gateway.toml), and
    print what it deleted (objects, bytes). Safe while the daemon runs: one run at a time."""
    from gateway.app import check_sections, select_storage
    from gateway.catalog import CatalogError
    from gateway.logs import setup_logging
    from gateway.retention import CleanupBusy

    settings = _settings(config_path, uses=CLEANUP_USES)
    setup_logging(settings.log.model_copy(update={"level": "WARNING"}))  # the report is the output
    pm = _or_exit(make_manager)
    _or_exit(lambda: check_sections(settings, pm))
    storage = _or_exit(lambda: select_storage(settings, pm))
    display = _CleanupDisplay(bar=sys.stderr.isatty(), verbose=verbose, dry_run=dry_run)
    try:
        report = asyncio.run(_run_cleanup(settings, storage, dry_run, display))
    except CleanupBusy as exc:
        click.echo(f"gateway: {exc}", err=True)
        sys.exit(3)
    except CatalogError as exc:
        click.echo(f"gateway: {exc}", err=True)
        sys.exit(1)
    _print_report(report)
    if report.error or report.failed:
        sys.exit(1)


@main.command()
@CONFIG_OPTION
@click.option("--to", "url", required=True, metavar="postgresql://USER:PASSWORD@HOST:PORT/DBNAME",
              help="The new, empty PostgreSQL database.")
def migrate(config_path: Path | None, url: str) -> None:
    """Copy the SQLite catalog ([catalog] path) into a new PostgreSQL database, to run several
    replicas on it: events, jobs, media rows and the cleanup log, ids kept. Stop the daemon first
    (the command takes its lock); then set [catalog] url to the database and start the replicas."""
    from gateway.catalog import CatalogError, CatalogLocked, SQLiteCatalog
    from gateway.catalog.postgres import PostgresCatalog
    from gateway.catalog.postgres.copy import copy_catalog
    from pydantic import ValidationError

    from gateway.config import CatalogSettings

    settings = _settings(config_path, uses=("catalog",))
    try:
        CatalogSettings(url=url)
    except ValidationError as exc:
        click.echo(f"gateway: --to: {exc.errors()[0]['msg'].removeprefix('Value error, ')}", err=True)
        sys.exit(2)
    if not settings.catalog.path.exists():
        click.echo(f"gateway: no SQLite catalog at {settings.catalog.path}", err=True)
        sys.exit(1)

    async def _copy() -> dict[str, int]:
        source = SQLiteCatalog(settings.catalog.path, exclusive=True)
        target = PostgresCatalog(url)
        await source.open()
        try:
            await target.open()
            try:
                return await copy_catalog(source, target)
            finally:
                await target.close()
        finally:
            await source.close()

    try:
        copied = asyncio.run(_copy())
    except CatalogLocked as exc:
        click.echo(f"gateway: {exc}; stop it first", err=True)
        sys.exit(2)
    except CatalogError as exc:
        click.echo(f"gateway: {exc}", err=True)
        sys.exit(1)
    click.echo("copied " + ", ".join(f"{n} {table}" for table, n in copied.items())
               + f" from {settings.catalog.path}; set [catalog] url to use it")


@main.command()
def plugins() -> None:
    """List the plugins that loaded and the hooks each implements."""
    pm = _or_exit(make_manager)
    for info in describe(pm):
        dist = f"{info.distribution} {info.version}" if info.distribution else "-"
        click.echo(f"{info.name:<16} {info.module:<28} {dist:<28} {', '.join(info.hooks) or '(no hooks)'}")
