"""The SQLite catalog's schema: numbered migrations, applied in order by
:meth:`gateway.catalog.sqlite.SQLiteCatalog.open`; ``PRAGMA user_version`` holds the number of the
last one applied (:data:`SCHEMA_VERSION`). A migration never changes once released: a schema change is
a new one appended to :data:`MIGRATIONS`.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

from gateway.catalog.contract import exact_time

# The event a job works on; the same expression as idx_jobs_event_id, so that queries use it.
JOB_EVENT = "json_extract(payload, '$.event_id')"


def _migration_1(db: sqlite_utils.Database) -> None:
    db.table("events").create(
        {
            "id": str,
            "provider": str,
            "idempotency_key": str,
            "event": str,
            "account": str,
            "chat": str,
            "message_id": str,
            "received_at": float,
            "raw": bytes,
            "payload": str,
            "media": str,
            "forward": str,
            "state": str,
            "notes": str,
        },
        pk="id",
        not_null={"provider", "idempotency_key", "event", "received_at", "raw", "payload", "state"},
    )
    db.table("events").create_index(["idempotency_key"], unique=True)
    db.table("events").create_index(["received_at"])
    db.table("jobs").create(
        {
            "id": int,
            "kind": str,
            "key": str,
            "payload": str,
            "state": str,
            "attempts": int,
            "run_at": float,
            "created_at": float,
            "updated_at": float,
            "last_error": str,
        },
        pk="id",
        not_null={"kind", "key", "payload", "state", "attempts", "run_at", "created_at", "updated_at"},
        defaults={"attempts": 0},
    )
    db.table("jobs").create_index(["key"], unique=True)
    db.table("jobs").create_index(["state", "run_at"])
    db.table("media").create(
        {
            "id": str,
            "sha256": str,
            "size": int,
            "mimetype": str,
            "declared_mimetype": str,
            "category": str,
            "filename": str,
            "backend": str,
            "bucket": str,
            "key": str,
            "provider": str,
            "account": str,
            "chat": str,
            "message_id": str,
            "direction": str,
            "source_key": str,
            "source_url": str,
            "event_id": str,
            "created_at": float,
            "expires_at": float,
            "tenant": str,
            "is_public": int,
            "extra": str,
        },
        pk="id",
        not_null={"sha256", "size", "mimetype", "category", "filename", "backend", "key",
                  "direction", "created_at"},
        defaults={"is_public": 0, "direction": "inbound"},
    )
    db.table("media").create_index(["source_key"], unique=True)
    db.table("media").create_index(["created_at"])
    db.table("media").create_index(["category"])


def _migration_2(db: sqlite_utils.Database) -> None:
    """Retention: a media row's ``state`` (``stored``; ``deleting`` once a cleanup claimed it, until
    its object and then the row are gone; ``missing`` when its object was not found in storage),
    with when and why it changed; ``source_key`` unique among stored rows only, so an attachment
    whose copy is being deleted or is missing is fetched again rather than linked to nothing;
    indexes for the cleanup's queries; and the ``cleanup_runs`` log."""
    conn = db.conn
    conn.execute("ALTER TABLE media ADD COLUMN state TEXT NOT NULL DEFAULT 'stored'")
    conn.execute("ALTER TABLE media ADD COLUMN state_at FLOAT")
    conn.execute("ALTER TABLE media ADD COLUMN state_reason TEXT")
    conn.execute("DROP INDEX idx_media_source_key")
    conn.execute("CREATE UNIQUE INDEX idx_media_source_key ON media (source_key) WHERE state = 'stored'")
    conn.execute("CREATE INDEX idx_media_key ON media (key)")
    # covers the per-scrape totals (state, backend, category, count, bytes) without reading rows
    conn.execute("CREATE INDEX idx_media_state ON media (state, backend, category, size)")
    conn.execute(f"CREATE INDEX idx_jobs_event_id ON jobs ({JOB_EVENT})")
    db.table("cleanup_runs").create(
        {"id": int, "trigger": str, "started_at": float, "finished_at": float, "ok": int, "report": str},
        pk="id", not_null={"trigger", "started_at", "finished_at", "ok"},
    )
    db.table("cleanup_runs").create_index(["ok", "finished_at"])


def _migration_3(db: sqlite_utils.Database) -> None:
    """Media timestamps at whole microseconds (:func:`exact_time`), the precision the API shows
    and compares them at, so that a file's own ``created_at`` is an exact bound; an index for
    listing by the provider's message id."""
    conn = db.conn
    conn.create_function("exact_time", 1, exact_time, deterministic=True)
    conn.execute("UPDATE media SET created_at = exact_time(created_at), expires_at = exact_time(expires_at)")
    conn.execute("CREATE INDEX idx_media_message_id ON media (message_id)")


def _migration_4(db: sqlite_utils.Database) -> None:
    """Job lanes (DESIGN §6): a job's ``deadline`` (epoch seconds; an ingest job's provider
    deletes the media then, NULL for other kinds), and an index to claim by kind, due time and
    deadline, and to find when a kind's next job is due."""
    conn = db.conn
    conn.execute("ALTER TABLE jobs ADD COLUMN deadline REAL")
    conn.execute("CREATE INDEX idx_jobs_lane ON jobs (state, kind, deadline, run_at)")
    conn.execute("CREATE INDEX idx_jobs_kind_run_at ON jobs (state, kind, run_at)")


def _migration_5(db: sqlite_utils.Database) -> None:
    """Drop ``idx_jobs_state_run_at`` (state, run_at), made redundant by migration 4's indexes:
    each query it served plans as well or better on ``idx_jobs_lane`` or ``idx_jobs_kind_run_at``
    (measured on 126,000 jobs: the claims, the due time, the backlog, requeueing, the counts), and
    every claim and completion moved an entry in it: 3.1 of the 33 WAL pages an image message
    wrote (``bench.latency --wal-pages``)."""
    db.conn.execute("DROP INDEX IF EXISTS idx_jobs_state_run_at")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migration_1, _migration_2, _migration_3, _migration_4, _migration_5]
SCHEMA_VERSION = len(MIGRATIONS)
