"""The catalog (DESIGN §5-6): webhook events, the durable job queue, media rows and the retention
log. :mod:`.contract` says what every implementation does (:class:`CatalogContract`, the errors,
:class:`ExpiryRule`, :class:`CatalogStats`), :mod:`.rows` the rows it takes and returns;
:mod:`.sqlite` is the default implementation, exported here as :class:`Catalog`.
"""

from gateway.catalog.contract import (
    JOB_STATES,
    CatalogContract,
    CatalogError,
    CatalogLocked,
    CatalogStats,
    ExpiryRule,
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
    StatsGroup,
    UnlistedMedia,
)
from gateway.catalog.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteCatalog

Catalog = SQLiteCatalog
"""The catalog the gateway opens (``Catalog(path, exclusive=False)``): SQLite."""

__all__ = [
    "JOB_STATES", "MIGRATIONS", "SCHEMA_VERSION", "Catalog", "CatalogContract", "CatalogError", "CatalogLocked",
    "CatalogStats", "ClaimedJob", "CleanupRunRow", "DoomedMedia", "EventRow", "ExpiredMedia", "ExpiryRule",
    "JobRow", "ListedObject", "MediaRow", "SQLiteCatalog", "StatsGroup", "UnlistedMedia", "exact_time",
]
