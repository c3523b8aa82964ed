"""The catalog (DESIGN §5-6): webhook events, the durable job queue, media rows and the retention
log. :mod:`.contract` says what every implementation does (:class:`CatalogContract`, the errors,
:class:`ExpiryRule`, :class:`CatalogStats`), :mod:`.rows` the rows it takes and returns;
:mod:`.sqlite` is the default implementation, exported here as :class:`Catalog`; :mod:`.postgres`
the one several replicas share. :func:`catalog_from_settings` picks one from ``[catalog]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.catalog.contract import (
    JOB_STATES,
    CatalogContract,
    CatalogError,
    CatalogLocked,
    CatalogStats,
    ExpiryRule,
    MediaTaken,
    exact_time,
)
from gateway.catalog.rows import (
    ClaimedJob,
    CleanupRunRow,
    DoomedMedia,
    EventRow,
    ExpiredMedia,
    JobRow,
    ListedObject,
    MediaRow,
    ReadyEvent,
    StatsGroup,
    UnlistedMedia,
)
from gateway.catalog.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteCatalog

if TYPE_CHECKING:
    from gateway.config import Settings

Catalog = SQLiteCatalog
"""The default catalog (``Catalog(path, exclusive=False)``): SQLite."""


def catalog_from_settings(settings: Settings, exclusive: bool = False, read_only: bool = False) -> CatalogContract:
    """The catalog ``[catalog]`` names: PostgreSQL at ``catalog.url`` (shared by replicas; jobs
    leased for ``queue.lease`` seconds; a pool of connections for every worker and a few webhooks
    and API calls besides), else the SQLite file ``catalog.path`` (``exclusive``: the daemon's, see
    :meth:`CatalogContract.lock`). ``read_only``: see :attr:`CatalogContract.read_only` (a serving
    worker's; PostgreSQL: a pool of :data:`READ_ONLY_POOL`). Not opened yet."""
    if settings.catalog.url:
        from gateway.catalog.postgres import PostgresCatalog  # psycopg only when it is used
        return PostgresCatalog(settings.catalog.url, lease=settings.queue.lease, read_only=read_only,
                               pool_size=READ_ONLY_POOL if read_only else settings.queue.workers + 8)
    return SQLiteCatalog(settings.catalog.path, exclusive=exclusive, read_only=read_only)


READ_ONLY_POOL = 4
"""Connections a read-only PostgreSQL catalog holds at most (serving: one row per uncached id)."""

__all__ = [
    "JOB_STATES", "MIGRATIONS", "SCHEMA_VERSION", "Catalog", "CatalogContract", "CatalogError", "CatalogLocked",
    "CatalogStats", "ClaimedJob", "CleanupRunRow", "DoomedMedia", "EventRow", "ExpiredMedia", "ExpiryRule",
    "JobRow", "ListedObject", "MediaRow", "MediaTaken", "ReadyEvent", "SQLiteCatalog", "StatsGroup", "UnlistedMedia", "catalog_from_settings",
    "exact_time",
]
