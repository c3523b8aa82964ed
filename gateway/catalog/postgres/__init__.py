"""The PostgreSQL catalog: the same contract as SQLite's, for several gateway replicas on one
database (DESIGN §6, scale-out). psycopg 3 with its async pool (:mod:`.connection`); numbered
migrations in ``gateway_schema`` (:mod:`.migrations`); jobs claimed with ``FOR UPDATE SKIP LOCKED``
under a lease (:mod:`.jobs`); the scheduled cleanup under an advisory lock and ``/events`` notices
over ``LISTEN``/``NOTIFY`` (:mod:`.connection`).
"""

from __future__ import annotations

from gateway.catalog.contract import CatalogContract
from gateway.catalog.postgres.connection import PostgresConnection
from gateway.catalog.postgres.events import EventsMixin
from gateway.catalog.postgres.jobs import JobsMixin
from gateway.catalog.postgres.media import MediaMixin
from gateway.catalog.postgres.migrations import MIGRATIONS, SCHEMA_VERSION
from gateway.catalog.postgres.retention import RetentionMixin

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresCatalog", "PostgresConnection"]


class PostgresCatalog(EventsMixin, JobsMixin, MediaMixin, RetentionMixin, CatalogContract):
    """:class:`gateway.catalog.CatalogContract` on the PostgreSQL database at ``url``
    (``PostgresCatalog("postgresql://user@host:5432/gateway", lease=30.0)``); see
    :class:`PostgresConnection` for the arguments. Open with :meth:`open`, close with :meth:`close`.
    """
