"""The default catalog: SQLite (through sqlite-utils) holding ``events``, ``jobs`` and ``media``
(DESIGN §5-6), and the log of retention cleanups (``cleanup_runs``).

Every call runs on one dedicated thread that owns the connection (:mod:`.connection`), so the event
loop never blocks on SQLite and there is exactly one writer. The database runs in WAL mode with
``synchronous=FULL``: a committed webhook survives a crash or power loss. Schema changes are
numbered migrations (:mod:`.migrations`); ``PRAGMA user_version`` holds the schema version.
"""

from __future__ import annotations

from gateway.catalog.contract import CatalogContract
from gateway.catalog.sqlite.connection import SQLiteConnection
from gateway.catalog.sqlite.events import EventsMixin
from gateway.catalog.sqlite.jobs import JobsMixin
from gateway.catalog.sqlite.media import MediaMixin
from gateway.catalog.sqlite.migrations import MIGRATIONS, SCHEMA_VERSION
from gateway.catalog.sqlite.retention import RetentionMixin

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SQLiteCatalog", "SQLiteConnection"]


class SQLiteCatalog(EventsMixin, JobsMixin, MediaMixin, RetentionMixin, CatalogContract):
    """:class:`gateway.catalog.CatalogContract` on the SQLite file ``path``
    (``SQLiteCatalog(path, exclusive=False, read_only=False)``; ``exclusive``: :meth:`open` takes
    :meth:`lock`; ``read_only``: see :attr:`CatalogContract.read_only`).

    Open with :meth:`open`, close with :meth:`close`. All public methods but :meth:`lock` are
    coroutines that run on the catalog thread; :meth:`run` runs any ``fn(db)`` there (tests and
    diagnostics read the database with it).
    """

    kind = "sqlite"
