"""The catalog: SQLite (through sqlite-utils) holding ``events``, ``jobs`` and ``media`` (DESIGN §5-6).

Every call runs on one dedicated thread that owns the connection, so the event loop never blocks
on SQLite and there is exactly one writer. The database runs in WAL mode with
``synchronous=FULL``: a committed webhook survives a crash or power loss.

Schema changes are numbered migrations; ``PRAGMA user_version`` holds the schema version.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from gateway.providers import WebhookEvent

T = TypeVar("T")

JOB_STATES = ("queued", "running", "done", "dead")


def _migration_1(db: sqlite_utils.Database) -> None:
    db["events"].create(
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
    db["events"].create_index(["idempotency_key"], unique=True)
    db["events"].create_index(["received_at"])
    db["jobs"].create(
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
    db["jobs"].create_index(["key"], unique=True)
    db["jobs"].create_index(["state", "run_at"])
    db["media"].create(
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
    db["media"].create_index(["source_key"], unique=True)
    db["media"].create_index(["created_at"])
    db["media"].create_index(["category"])


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migration_1]
SCHEMA_VERSION = len(MIGRATIONS)


class CatalogError(Exception):
    """The catalog could not be opened or is from a newer gateway."""


class Catalog:
    """Async facade over the SQLite catalog at ``path``.

    Open with :meth:`open`, close with :meth:`close`. All public methods are coroutines that run
    on the catalog thread.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog")
        self._db: sqlite_utils.Database | None = None

    # -- plumbing -------------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(db, *args)`` on the catalog thread and return its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._require(), *args))

    def _require(self) -> sqlite_utils.Database:
        if self._db is None:
            raise CatalogError("catalog is not open")
        return self._db

    @staticmethod
    @contextmanager
    def _tx(db: sqlite_utils.Database) -> Iterator[sqlite3.Connection]:
        conn = db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def open(self) -> None:
        """Create the file and directory if needed, enable WAL, apply migrations.

        Raises :class:`CatalogError` if the schema is newer than this gateway knows.
        """
        def _open() -> sqlite_utils.Database:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
            db = sqlite_utils.Database(conn)
            db.enable_wal()
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CatalogError(
                    f"catalog {self.path} has schema version {version}; this gateway knows {SCHEMA_VERSION}"
                )
            for number in range(version, SCHEMA_VERSION):
                with self._tx(db):
                    MIGRATIONS[number](db)
                    conn.execute(f"PRAGMA user_version={number + 1}")
            return db

        loop = asyncio.get_running_loop()
        self._db = await loop.run_in_executor(self._executor, _open)

    async def close(self) -> None:
        """Close the connection and stop the catalog thread."""
        if self._db is not None:
            db, self._db = self._db, None
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, db.conn.close)
        self._executor.shutdown(wait=True)

    async def check(self) -> None:
        """Raise if the catalog cannot answer a query (for ``/readyz``)."""
        await self.run(lambda db: db.conn.execute("SELECT 1").fetchone())

    async def schema_version(self) -> int:
        """The ``user_version`` of the open database."""
        return await self.run(lambda db: db.conn.execute("PRAGMA user_version").fetchone()[0])

    # -- events ---------------------------------------------------------------------------
    async def record_webhook(self, provider: str, raw: bytes, events: list[WebhookEvent],
                             now: float | None = None) -> tuple[list[str], list[str]]:
        """Commit each event with its ``ingest`` job in one transaction.

        Returns ``(accepted event ids, idempotency keys already seen)``. An event whose idempotency
        key exists is a duplicate: no row, no job.
        """
        now = now if now is not None else time.time()

        def _record(db: sqlite_utils.Database) -> tuple[list[str], list[str]]:
            accepted: list[str] = []
            duplicates: list[str] = []
            with self._tx(db) as conn:
                for ev in events:
                    event_id = f"ev_{uuid.uuid4().hex}"
                    cur = conn.execute(
                        "INSERT INTO events (id, provider, idempotency_key, event, account, chat,"
                        " message_id, received_at, raw, payload, media, state)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,?, 'queued')"
                        " ON CONFLICT(idempotency_key) DO NOTHING",
                        (event_id, provider, ev.idempotency_key, ev.event, ev.account, ev.chat,
                         ev.message_id, now, raw, json.dumps(ev.payload),
                         json.dumps([m.to_dict() for m in ev.media])),
                    )
                    if cur.rowcount == 0:
                        duplicates.append(ev.idempotency_key)
                        continue
                    self._insert_job(conn, "ingest", f"ingest:{event_id}", {"event_id": event_id}, now)
                    accepted.append(event_id)
            return accepted, duplicates

        return await self.run(_record)

    async def get_event(self, event_id: str) -> dict[str, Any] | None:
        """The event row as a dict (``payload``/``media``/``forward``/``notes`` decoded), or None."""
        def _get(db: sqlite_utils.Database) -> dict[str, Any] | None:
            rows = list(db["events"].rows_where("id = ?", [event_id]))
            if not rows:
                return None
            row = rows[0]
            for col in ("payload", "media", "forward", "notes"):
                if row.get(col) is not None:
                    row[col] = json.loads(row[col])
            return row

        return await self.run(_get)

    async def count(self, table: str, where: str | None = None, args: list[Any] | None = None) -> int:
        """Rows in ``table`` (``events``, ``jobs`` or ``media``) matching ``where``."""
        if table not in ("events", "jobs", "media"):
            raise ValueError(table)
        return await self.run(lambda db: db[table].count_where(where or "1=1", args or []))

    # -- jobs -----------------------------------------------------------------------------
    @staticmethod
    def _insert_job(conn: sqlite3.Connection, kind: str, key: str, payload: dict[str, Any],
                    now: float, run_at: float | None = None) -> bool:
        cur = conn.execute(
            "INSERT INTO jobs (kind, key, payload, state, attempts, run_at, created_at, updated_at)"
            " VALUES (?,?,?, 'queued', 0, ?, ?, ?) ON CONFLICT(key) DO NOTHING",
            (kind, key, json.dumps(payload), run_at if run_at is not None else now, now, now),
        )
        return cur.rowcount > 0

    async def enqueue(self, kind: str, key: str, payload: dict[str, Any]) -> bool:
        """Add a job unless one with ``key`` exists (idempotency key). ``True`` if added."""
        def _enqueue(db: sqlite_utils.Database) -> bool:
            with self._tx(db) as conn:
                return self._insert_job(conn, kind, key, payload, time.time())

        return await self.run(_enqueue)

    async def claim_job(self, now: float | None = None) -> dict[str, Any] | None:
        """Take the oldest due queued job: mark it running, count the attempt, return it."""
        now = now if now is not None else time.time()

        def _claim(db: sqlite_utils.Database) -> dict[str, Any] | None:
            with self._tx(db) as conn:
                cur = conn.execute(
                    "UPDATE jobs SET state='running', attempts=attempts+1, updated_at=?"
                    " WHERE id = (SELECT id FROM jobs WHERE state='queued' AND run_at<=?"
                    " ORDER BY run_at, id LIMIT 1)"
                    " RETURNING id, kind, key, payload, attempts, created_at",
                    (now, now),
                )
                row = cur.fetchone()
            if row is None:
                return None
            return {"id": row[0], "kind": row[1], "key": row[2], "payload": json.loads(row[3]),
                    "attempts": row[4], "created_at": row[5]}

        return await self.run(_claim)

    async def next_run_at(self) -> float | None:
        """When the earliest queued job is due (epoch seconds), or None."""
        return await self.run(lambda db: db.conn.execute(
            "SELECT MIN(run_at) FROM jobs WHERE state='queued'").fetchone()[0])

    async def complete_job(self, job_id: int, followups: list[tuple[str, str, dict[str, Any]]] = (),
                           event_update: tuple[str, dict[str, Any]] | None = None) -> None:
        """Mark a job done, enqueue ``followups`` ``(kind, key, payload)`` and apply
        ``event_update`` ``(event_id, {column: value})``, all in one transaction."""
        now = time.time()

        def _complete(db: sqlite_utils.Database) -> None:
            with self._tx(db) as conn:
                if event_update is not None:
                    event_id, values = event_update
                    cols = ", ".join(f"{c} = ?" for c in values)
                    conn.execute(f"UPDATE events SET {cols} WHERE id = ?",
                                 [*(_to_sql(v) for v in values.values()), event_id])
                for kind, key, payload in followups:
                    self._insert_job(conn, kind, key, payload, now)
                conn.execute("UPDATE jobs SET state='done', updated_at=?, last_error=NULL WHERE id=?",
                             (now, job_id))

        await self.run(_complete)

    async def fail_job(self, job_id: int, error: str, retry_at: float | None) -> None:
        """Record a failed attempt: back to ``queued`` at ``retry_at``, or ``dead`` when None."""
        now = time.time()

        def _fail(db: sqlite_utils.Database) -> None:
            with self._tx(db) as conn:
                if retry_at is None:
                    conn.execute("UPDATE jobs SET state='dead', last_error=?, updated_at=? WHERE id=?",
                                 (error[:2000], now, job_id))
                else:
                    conn.execute("UPDATE jobs SET state='queued', last_error=?, run_at=?, updated_at=?"
                                 " WHERE id=?", (error[:2000], retry_at, now, job_id))

        await self.run(_fail)

    async def release_job(self, job_id: int) -> None:
        """Return an interrupted running job to the queue without counting the attempt."""
        def _release(db: sqlite_utils.Database) -> None:
            with self._tx(db) as conn:
                conn.execute("UPDATE jobs SET state='queued', attempts=MAX(attempts-1, 0), updated_at=?"
                             " WHERE id=? AND state='running'", (time.time(), job_id))

        await self.run(_release)

    async def requeue_running(self) -> int:
        """Jobs left ``running`` by a crash go back to ``queued`` (called at start). Returns how many."""
        def _requeue(db: sqlite_utils.Database) -> int:
            with self._tx(db) as conn:
                return conn.execute("UPDATE jobs SET state='queued', updated_at=? WHERE state='running'",
                                    (time.time(),)).rowcount

        return await self.run(_requeue)

    async def get_job(self, job_id: int) -> dict[str, Any] | None:
        """The job row (``payload`` decoded), or None."""
        def _get(db: sqlite_utils.Database) -> dict[str, Any] | None:
            rows = list(db["jobs"].rows_where("id = ?", [job_id]))
            if not rows:
                return None
            rows[0]["payload"] = json.loads(rows[0]["payload"])
            return rows[0]

        return await self.run(_get)

    async def list_jobs(self, state: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Jobs filtered by ``state`` and ``kind``, oldest first."""
        def _list(db: sqlite_utils.Database) -> list[dict[str, Any]]:
            where, args = [], []
            if state:
                where.append("state = ?")
                args.append(state)
            if kind:
                where.append("kind = ?")
                args.append(kind)
            rows = list(db["jobs"].rows_where(" AND ".join(where) or None, args, order_by="id"))
            for r in rows:
                r["payload"] = json.loads(r["payload"])
            return rows

        return await self.run(_list)

    async def job_counts(self) -> dict[tuple[str, str], int]:
        """``{(kind, state): count}`` for the metrics."""
        def _counts(db: sqlite_utils.Database) -> dict[tuple[str, str], int]:
            rows = db.conn.execute("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state")
            return {(k, s): n for k, s, n in rows}

        return await self.run(_counts)

    # -- media ----------------------------------------------------------------------------
    async def media_by_source(self, source_key: str) -> dict[str, Any] | None:
        """The media row stored for ``source_key`` (see :class:`gateway.providers.MediaRef`)."""
        return await self.run(lambda db: next(db["media"].rows_where("source_key = ?", [source_key]), None))

    async def get_media(self, media_id: str) -> dict[str, Any] | None:
        """The media row, or None."""
        return await self.run(lambda db: next(db["media"].rows_where("id = ?", [media_id]), None))

    async def insert_media(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Insert a media row written after its object. If its ``source_key`` is taken (a concurrent
        ingest stored the same attachment), returns ``(existing row, False)``; else ``(record, True)``."""
        def _insert(db: sqlite_utils.Database) -> tuple[dict[str, Any], bool]:
            cols = list(record)
            with self._tx(db) as conn:
                cur = conn.execute(
                    f"INSERT INTO media ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
                    " ON CONFLICT(source_key) DO NOTHING",
                    [_to_sql(record[c]) for c in cols],
                )
                if cur.rowcount:
                    return record, True
            existing = next(db["media"].rows_where("source_key = ?", [record["source_key"]]))
            return existing, False

        return await self.run(_insert)

    async def media_totals(self) -> list[tuple[str, str, str, int, int]]:
        """``(backend, provider, category, count, bytes)`` for every stored group."""
        return await self.run(lambda db: list(db.conn.execute(
            "SELECT backend, COALESCE(provider, ''), category, COUNT(*), COALESCE(SUM(size), 0)"
            " FROM media GROUP BY 1, 2, 3")))


def _to_sql(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    return value
