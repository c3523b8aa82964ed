"""The catalog: SQLite (through sqlite-utils) holding ``events``, ``jobs`` and ``media`` (DESIGN §5-6),
and the log of retention cleanups (``cleanup_runs``).

Every call runs on one dedicated thread that owns the connection, so the event loop never blocks
on SQLite and there is exactly one writer. The database runs in WAL mode with
``synchronous=FULL``: a committed webhook survives a crash or power loss.

Schema changes are numbered migrations; ``PRAGMA user_version`` holds the schema version.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import json
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from gateway.sdk.provider import WebhookEvent

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
    conn.execute(f"CREATE INDEX idx_jobs_event_id ON jobs ({_JOB_EVENT})")
    db["cleanup_runs"].create(
        {"id": int, "trigger": str, "started_at": float, "finished_at": float, "ok": int, "report": str},
        pk="id", not_null={"trigger", "started_at", "finished_at", "ok"},
    )
    db["cleanup_runs"].create_index(["ok", "finished_at"])


def _migration_3(db: sqlite_utils.Database) -> None:
    """Media timestamps at whole microseconds (:func:`exact_time`), the precision the API shows
    and compares them at, so that a file's own ``created_at`` is an exact bound; an index for
    listing by the provider's message id."""
    conn = db.conn
    conn.create_function("exact_time", 1, exact_time, deterministic=True)
    conn.execute("UPDATE media SET created_at = exact_time(created_at), expires_at = exact_time(expires_at)")
    conn.execute("CREATE INDEX idx_media_message_id ON media (message_id)")


def exact_time(ts: float | None) -> float | None:
    """Epoch seconds rounded to whole microseconds: the one precision media timestamps are stored
    at, shown at (RFC 3339 with six decimals) and compared at. ``None`` stays ``None``."""
    return None if ts is None else round(ts, 6)


# The event a job works on; the same expression as idx_jobs_event_id, so that queries use it.
_JOB_EVENT = "json_extract(payload, '$.event_id')"

MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migration_1, _migration_2, _migration_3]
SCHEMA_VERSION = len(MIGRATIONS)


class CatalogError(Exception):
    """The catalog could not be opened or is from a newer gateway."""


class CatalogLocked(CatalogError):
    """Another process holds the catalog's exclusive lock (a daemon already runs on it).

    ``pid`` is the holder's process id as written in the lock file (None if unreadable).
    """

    def __init__(self, path: Path, pid: int | None):
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"catalog {path} is in use by {holder} (a gateway daemon already runs on it)")
        self.path, self.pid = path, pid


@dataclass(frozen=True, slots=True)
class ExpiryRule:
    """Which media rows a cleanup deletes (:meth:`Catalog.expired_media`). Times are epoch
    seconds, ages seconds (``math.inf``: never).

    - ``backend``: only rows stored on this backend (the one the cleanup can reach);
    - ``now``: the policy clock; ages and ``expires_at`` are measured against it;
    - ``before``: rows created at or after it are left alone (the run's real start, so that what
      an ingest stores while a run goes on is never part of it);
    - ``default_age``, ``provider_ages``, ``category_ages``: a row's maximum age is the longest of
      its provider's and its category's when either is given, else ``default_age``;
    - ``keep_public``: rows with ``is_public`` never expire by age (``expires_at`` still applies).
    """

    backend: str
    now: float
    before: float
    default_age: float
    provider_ages: Mapping[str, float] = field(default_factory=dict)
    category_ages: Mapping[str, float] = field(default_factory=dict)
    keep_public: bool = True


@dataclass(slots=True)
class CatalogStats:
    """What ``/metrics`` reads from the catalog at scrape time (:meth:`Catalog.stats`).

    ``jobs``: ``{(kind, state): count}``; ``oldest_queued``: ``{kind: created_at}`` of the oldest
    queued job; ``media``: ``(backend, category, state, count, bytes)`` rows;
    ``last_cleanup``: ``finished_at`` of the last successful, non-dry cleanup run, or None.
    """

    jobs: dict[tuple[str, str], int]
    oldest_queued: dict[str, float]
    media: list[tuple[str, str, str, int, int]]
    last_cleanup: float | None


class _CatalogThread(Executor):
    """The catalog's one thread: runs submitted calls one at a time in submission order, except
    that :meth:`submit_first` calls run before every call still waiting. Marking a job done goes
    first, so that the moment between a job's effect (a bot's 2xx) and the commit that records it,
    in which a crash repeats the job, is not stretched by a queue of other catalog work."""

    def __init__(self) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` after the calls already waiting."""
        return self._put(1, fn, args, kwargs)

    def submit_first(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        """Run ``fn(*args)`` before the ordinary calls already waiting."""
        return self._put(0, fn, args, {})

    def _put(self, priority: int, fn: Callable[..., T], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="catalog", daemon=True)
                self._thread.start()
            self._queue.put((priority, next(self._seq), (future, fn, args, kwargs)))
        return future

    def _work(self) -> None:
        while True:
            _, _, item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the awaiting coroutine
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop after the calls already submitted; ``wait``: until they ran."""
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            thread = self._thread
            self._queue.put((2, next(self._seq), None))
        if wait and thread is not None:
            thread.join()


class Catalog:
    """Async facade over the SQLite catalog at ``path``.

    Open with :meth:`open`, close with :meth:`close`. All public methods are coroutines that run
    on the catalog thread.
    """

    def __init__(self, path: Path, exclusive: bool = False):
        self.path = Path(path)
        self.exclusive = exclusive
        self._executor = _CatalogThread()
        self._db: sqlite_utils.Database | None = None
        self._lock_fd: int | None = None

    # -- the daemon's lock ----------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        """The lock file beside the database: ``<path>.lock``, holding the holder's PID."""
        return self.path.with_name(self.path.name + ".lock")

    def lock(self) -> None:
        """Take the catalog's exclusive lock for this process (``flock`` on :attr:`lock_path`,
        which then holds our PID), without waiting. One daemon per catalog: the lock lives as long
        as the catalog is open (:meth:`close` releases it; so does the process's death).
        ``gateway cleanup`` and other readers do not take it. Idempotent.

        Raises :class:`CatalogLocked` naming the holder's PID if another process holds it.
        (A PostgreSQL catalog would use leases instead; the lock stays the catalog's business.)
        """
        if self._lock_fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CatalogLocked(self.path, int(holder) if holder.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.ftruncate(fd, 0)
            os.close(fd)  # releases the flock

    # -- plumbing -------------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(db, *args)`` on the catalog thread and return its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._require(), *args))

    async def _run_first(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`run`, ahead of the calls waiting for the catalog thread."""
        return await asyncio.wrap_future(self._executor.submit_first(lambda: fn(self._require(), *args)))

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
        """Create the file and directory if needed, enable WAL, apply migrations. An ``exclusive``
        catalog (the daemon's) first takes :meth:`lock`, so nothing is touched while another
        daemon runs on it.

        Raises :class:`CatalogLocked` (see :meth:`lock`), :class:`CatalogError` if the schema is
        newer than this gateway knows.
        """
        if self.exclusive:
            self.lock()
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
        try:
            self._db = await loop.run_in_executor(self._executor, _open)
        except BaseException:
            self._unlock()
            raise

    async def close(self) -> None:
        """Close the connection and stop the catalog thread."""
        if self._db is not None:
            db, self._db = self._db, None
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, db.conn.close)
        self._executor.shutdown(wait=True)
        self._unlock()

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
        ``event_update`` ``(event_id, {column: value})``, all in one transaction, ahead of other
        waiting catalog work."""
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

        await self._run_first(_complete)  # the job's effect has happened: record it at once

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

    @staticmethod
    def _job_row(db: sqlite_utils.Database, job_id: int) -> dict[str, Any] | None:
        rows = list(db["jobs"].rows_where("id = ?", [job_id]))
        if not rows:
            return None
        rows[0]["payload"] = json.loads(rows[0]["payload"])
        return rows[0]

    async def get_job(self, job_id: int) -> dict[str, Any] | None:
        """The job row (``payload`` decoded), or None."""
        return await self.run(self._job_row, job_id)

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
        """The media row stored for ``source_key`` (see :class:`gateway.sdk.provider.MediaRef`); rows a
        cleanup is deleting or found missing do not count (the attachment is fetched again)."""
        return await self.run(lambda db: next(db["media"].rows_where(
            "source_key = ? AND state = 'stored'", [source_key]), None))

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
                    " ON CONFLICT(source_key) WHERE state = 'stored' DO NOTHING",
                    [_to_sql(record[c]) for c in cols],
                )
                if cur.rowcount:
                    return record, True
            existing = next(db["media"].rows_where("source_key = ? AND state = 'stored'",
                                                   [record["source_key"]]))
            return existing, False

        return await self.run(_insert)

    async def update_media(self, media_id: str, values: dict[str, Any]) -> bool:
        """Set columns of a media row; ``True`` if the row exists."""
        def _update(db: sqlite_utils.Database) -> bool:
            cols = ", ".join(f"{c} = ?" for c in values)
            with self._tx(db) as conn:
                cur = conn.execute(f"UPDATE media SET {cols} WHERE id = ?",
                                   [*(_to_sql(v) for v in values.values()), media_id])
                return cur.rowcount > 0

        return await self.run(_update)

    async def list_media(self, where: list[str], args: list[Any], sort: str, descending: bool,
                         after: tuple[Any, str] | None, limit: int) -> list[dict[str, Any]]:
        """Media rows matching ``where`` (SQL conditions on the ``media`` table, ``?`` params in
        ``args``), in ``sort`` order (``created_at`` or ``size``) then ``id``, starting after the
        keyset ``after`` = ``(sort value, id)``: a page that stays correct while rows are added."""
        if sort not in ("created_at", "size"):
            raise ValueError(sort)
        conds, params = list(where), list(args)
        op = "<" if descending else ">"
        if after is not None:
            conds.append(f"({sort}, id) {op} (?, ?)")
            params.extend(after)
        direction = "DESC" if descending else "ASC"
        sql = (f"SELECT * FROM media WHERE {' AND '.join(conds) or '1=1'}"
               f" ORDER BY {sort} {direction}, id {direction} LIMIT ?")
        params.append(limit)

        def _list(db: sqlite_utils.Database) -> list[dict[str, Any]]:
            cur = db.conn.execute(sql, params)
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

        return await self.run(_list)

    async def media_stats(self, tenant: str | None) -> dict[str, list[tuple[str, int, int]]]:
        """``{"category"|"provider"|"backend": [(value, count, bytes)]}`` over stored media, of one
        tenant when ``tenant`` is given."""
        where, args = "state != 'deleting'", []
        if tenant is not None:
            where += " AND tenant = ?"
            args.append(tenant)

        def _stats(db: sqlite_utils.Database) -> dict[str, list[tuple[str, int, int]]]:
            return {col: [tuple(r) for r in db.conn.execute(
                f"SELECT COALESCE({col}, ''), COUNT(*), COALESCE(SUM(size), 0) FROM media WHERE {where}"
                f" GROUP BY 1 ORDER BY 1", args)] for col in ("category", "provider", "backend")}

        return await self.run(_stats)

    async def claim_media_for_delete(self, media_id: str, now: float) -> dict[str, Any] | None:
        """Mark a visible media row ``deleting`` (so neither ingest nor a cleanup uses it meanwhile)
        and return it; None if there is no such row or another deletion has it."""
        def _claim(db: sqlite_utils.Database) -> dict[str, Any] | None:
            with self._tx(db) as conn:
                cur = conn.execute(
                    "UPDATE media SET state = 'deleting', state_at = ?, state_reason = 'api'"
                    " WHERE id = ? AND state != 'deleting'", (now, media_id))
                if not cur.rowcount:
                    return None
            return next(db["media"].rows_where("id = ?", [media_id]), None)

        return await self.run(_claim)

    async def retry_dead_job(self, job_id: int) -> dict[str, Any] | None:
        """Queue a dead job again (attempts reset). The row as queued again (read in the same
        transaction, before a worker can claim it), or None if the job was not dead."""
        def _retry(db: sqlite_utils.Database) -> dict[str, Any] | None:
            with self._tx(db) as conn:
                if not conn.execute(
                        "UPDATE jobs SET state = 'queued', attempts = 0, run_at = ?, updated_at = ?"
                        " WHERE id = ? AND state = 'dead'", (time.time(), time.time(), job_id)).rowcount:
                    return None
                return self._job_row(db, job_id)

        return await self.run(_retry)

    async def media_totals(self) -> list[tuple[str, str, str, int, int]]:
        """``(backend, provider, category, count, bytes)`` for every stored group."""
        return await self.run(lambda db: list(db.conn.execute(
            "SELECT backend, COALESCE(provider, ''), category, COUNT(*), COALESCE(SUM(size), 0)"
            " FROM media GROUP BY 1, 2, 3")))


    # -- retention (gateway/retention.py) --------------------------------------------------
    # An object is *needed* while a queued or running job works on an event whose media refers to
    # it: the event's ingest job reuses stored rows by ``source_key`` (the same attachment in a
    # redelivery, in ``message`` and ``message.any``, or quoted in a reply), and its deliver jobs
    # send links to them. Such rows are never claimed. Claiming (state ``deleting``) happens in the
    # same transaction as that check, and a claimed row no longer counts for ``source_key`` reuse,
    # so an event committed after the claim fetches the attachment again instead of linking to an
    # object about to go. Dead jobs protect nothing (they wait for a person, maybe forever).
    _NEEDED = f"""
        active AS MATERIALIZED (SELECT DISTINCT {_JOB_EVENT} AS event_id FROM jobs
                   WHERE state IN ('queued', 'running') AND {_JOB_EVENT} IS NOT NULL),
        needed AS MATERIALIZED (SELECT DISTINCT json_extract(r.value, '$.source_key') AS source_key
                   FROM events e JOIN active a ON e.id = a.event_id, json_each(COALESCE(e.media, '[]')) r)"""

    @classmethod
    def _expired_sql(cls, rule: ExpiryRule, after: str) -> tuple[str, dict[str, Any]]:
        """The ``expired`` CTE (id, key, bucket, size, category, provider, reason, in_use) and its
        parameters. ``reason``: ``expires_at`` or ``age``; ``in_use``: 1 when needed (see above)."""
        params: dict[str, Any] = {
            "backend": rule.backend, "now": rule.now, "before": rule.before, "after": after,
            "default_age": rule.default_age, "keep_public": int(rule.keep_public),
        }

        def case(column: str, ages: Mapping[str, float], prefix: str) -> str:
            if not ages:
                return "NULL"
            whens = []
            for i, (name, age) in enumerate(sorted(ages.items())):
                params[f"{prefix}n{i}"], params[f"{prefix}a{i}"] = name, age
                whens.append(f"WHEN :{prefix}n{i} THEN :{prefix}a{i}")
            return f"CASE m.{column} {' '.join(whens)} END"

        sql = f"""WITH {cls._NEEDED},
            aged AS (
                SELECT m.id, m.key, m.bucket, m.size, m.category, m.provider, m.source_key, m.event_id,
                       m.created_at, m.expires_at, m.is_public,
                       {case("provider", rule.provider_ages, "p")} AS p_age,
                       {case("category", rule.category_ages, "c")} AS c_age
                FROM media m  -- walk the primary key from :after (unary + keeps other indexes out)
                WHERE +m.backend = :backend AND +m.state IN ('stored', 'missing')
                  AND +m.created_at < :before AND m.id > :after
                ORDER BY m.id),
            expired AS (
                SELECT id, key, bucket, size, category, provider,
                       CASE WHEN expires_at IS NOT NULL AND expires_at <= :now THEN 'expires_at'
                            ELSE 'age' END AS reason,
                       (COALESCE(source_key IN (SELECT source_key FROM needed), 0)
                        OR COALESCE(event_id IN (SELECT event_id FROM active), 0)) AS in_use
                FROM aged
                WHERE (expires_at IS NOT NULL AND expires_at <= :now)
                   OR (NOT (:keep_public AND is_public = 1)
                       AND created_at < :now - CASE WHEN p_age IS NULL AND c_age IS NULL THEN :default_age
                                                    ELSE MAX(COALESCE(p_age, 0), COALESCE(c_age, 0)) END))
            """
        return sql, params

    async def count_expired_media(self, rule: ExpiryRule) -> tuple[int, int, int]:
        """``(expired rows, of which needed, bytes of the others)`` under ``rule``."""
        sql, params = self._expired_sql(rule, "")
        sql += "SELECT COUNT(*), COALESCE(SUM(in_use), 0), COALESCE(SUM(CASE WHEN in_use THEN 0 ELSE size END), 0)" \
               " FROM expired"
        return await self.run(lambda db: tuple(db.conn.execute(sql, params).fetchone()))

    async def expired_media(self, rule: ExpiryRule, after: str, limit: int, claim: bool
                            ) -> list[dict[str, Any]]:
        """Up to ``limit`` expired rows with ``id > after``, by id: dicts with ``id``, ``key``,
        ``bucket``, ``size`` (bytes), ``category``, ``provider``, ``reason`` and ``in_use`` (bool).

        With ``claim``, rows not in use are moved to state ``deleting`` in the same transaction
        (their objects are then deleted, then :meth:`forget_media` removes the rows).
        """
        sql, params = self._expired_sql(rule, after)
        sql += "SELECT * FROM expired ORDER BY id LIMIT :limit"
        params["limit"] = limit

        def _select(db: sqlite_utils.Database) -> list[dict[str, Any]]:
            with self._tx(db) as conn:
                cur = conn.execute(sql, params)
                cols = [d[0] for d in cur.description]
                rows = [dict(zip(cols, r)) for r in cur.fetchall()]
                for row in rows:
                    row["in_use"] = bool(row["in_use"])
                if claim:
                    conn.executemany(
                        "UPDATE media SET state = 'deleting', state_at = ?, state_reason = ?"
                        " WHERE id = ? AND state IN ('stored', 'missing')",
                        [(rule.now, r["reason"], r["id"]) for r in rows if not r["in_use"]])
            return rows

        return await self.run(_select)

    async def media_being_deleted(self, backend: str, after: str, limit: int) -> list[dict[str, Any]]:
        """Rows in state ``deleting`` (claimed by a run whose delete failed or was interrupted),
        by id, ``id > after``: ``id``, ``key``, ``bucket``, ``size``, ``category``, ``provider``,
        ``reason``."""
        return await self.run(lambda db: [dict(zip(
            ("id", "key", "bucket", "size", "category", "provider", "reason"), row))
            for row in db.conn.execute(
                "SELECT id, key, bucket, size, category, provider, COALESCE(state_reason, 'age')"
                " FROM media WHERE state = 'deleting' AND backend = ? AND id > ? ORDER BY id LIMIT ?",
                (backend, after, limit))])

    async def forget_media(self, ids: list[str]) -> int:
        """Delete the rows ``ids`` that are in state ``deleting`` (their objects are gone). Returns how many."""
        def _forget(db: sqlite_utils.Database) -> int:
            with self._tx(db) as conn:
                return sum(conn.execute("DELETE FROM media WHERE id = ? AND state = 'deleting'", (i,)).rowcount
                           for i in ids)

        return await self.run(_forget) if ids else 0

    async def begin_listing(self) -> None:
        """Start a storage listing: an empty connection-private table ``temp.cleanup_listing``."""
        def _begin(db: sqlite_utils.Database) -> None:
            db.conn.execute("DROP TABLE IF EXISTS temp.cleanup_listing")
            db.conn.execute("CREATE TEMP TABLE cleanup_listing (bucket TEXT NOT NULL, key TEXT NOT NULL,"
                            " size INTEGER, modified FLOAT, PRIMARY KEY (bucket, key)) WITHOUT ROWID")
            db.conn.execute("CREATE INDEX temp.cleanup_listing_key ON cleanup_listing (key)")

        await self.run(_begin)

    async def add_listing(self, objects: list[tuple[str, str, int, float]]) -> None:
        """Add listed objects ``(bucket or "", key, size in bytes, modified epoch seconds)``."""
        def _add(db: sqlite_utils.Database) -> None:
            conn = db.conn
            conn.execute("BEGIN")  # writes only the temp table: takes no lock on the catalog
            conn.executemany("INSERT OR REPLACE INTO temp.cleanup_listing VALUES (?, ?, ?, ?)", objects)
            conn.execute("COMMIT")

        await self.run(_add)

    async def end_listing(self) -> None:
        """Drop the listing table."""
        await self.run(lambda db: db.conn.execute("DROP TABLE IF EXISTS temp.cleanup_listing"))

    async def listed_without_row(self, backend: str, after: tuple[str, str], limit: int
                                 ) -> list[tuple[str, str, int, float]]:
        """Listed objects that no media row of ``backend`` points at (orphan candidates), by
        ``(bucket, key)`` after ``after``: ``(bucket or "", key, size, modified)``."""
        return await self.run(lambda db: [tuple(r) for r in db.conn.execute(
            "SELECT s.bucket, s.key, s.size, s.modified FROM temp.cleanup_listing s"
            " WHERE (s.bucket, s.key) > (?, ?) AND NOT EXISTS (SELECT 1 FROM media m"
            "  WHERE m.key = s.key AND m.backend = ? AND (m.bucket IS NULL OR m.bucket = s.bucket OR s.bucket = ''))"
            " ORDER BY s.bucket, s.key LIMIT ?", (*after, backend, limit))])

    async def rows_not_listed(self, backend: str, created_before: float, after: str, limit: int
                              ) -> list[dict[str, Any]]:
        """Stored rows of ``backend`` created before ``created_before`` whose object is not in the
        listing, by id after ``after``: ``id``, ``key``, ``bucket``, ``size``, ``provider``, ``event_id``."""
        return await self.run(lambda db: [dict(zip(
            ("id", "key", "bucket", "size", "provider", "event_id"), row)) for row in db.conn.execute(
            "SELECT id, key, bucket, size, provider, event_id FROM media m"
            " WHERE +m.backend = ? AND +m.state = 'stored' AND +m.created_at < ? AND m.id > ?"  # by primary key
            " AND NOT EXISTS (SELECT 1 FROM temp.cleanup_listing s"
            "  WHERE s.key = m.key AND (m.bucket IS NULL OR s.bucket = m.bucket))"
            " ORDER BY id LIMIT ?", (backend, created_before, after, limit))])

    async def media_keys_present(self, backend: str, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of ``keys`` (``(bucket or "", key)``) a media row of ``backend`` points at now."""
        def _present(db: sqlite_utils.Database) -> set[tuple[str, str]]:
            found = set()
            for bucket, key in keys:
                if db.conn.execute("SELECT 1 FROM media WHERE key = ? AND backend = ?"
                                   " AND (bucket IS NULL OR bucket = ? OR ? = '')",
                                   (key, backend, bucket, bucket)).fetchone():
                    found.add((bucket, key))
            return found

        return await self.run(_present)

    async def mark_missing(self, ids: list[str], now: float) -> int:
        """Move stored rows ``ids`` to state ``missing`` (their object is gone). Returns how many."""
        def _mark(db: sqlite_utils.Database) -> int:
            with self._tx(db) as conn:
                return sum(conn.execute(
                    "UPDATE media SET state = 'missing', state_at = ?, state_reason = 'not in storage'"
                    " WHERE id = ? AND state = 'stored'", (now, i)).rowcount for i in ids)

        return await self.run(_mark) if ids else 0

    _PRUNABLE_EVENTS = """SELECT e.id FROM events e
        WHERE e.received_at < :before AND e.state != 'queued'
          AND NOT EXISTS (SELECT 1 FROM jobs j WHERE json_extract(j.payload, '$.event_id') = +e.id
                          AND j.state != 'done')"""  # +e.id: no affinity, so idx_jobs_event_id applies

    async def count_prunable(self, events_before: float | None, jobs_before: float | None) -> tuple[int, int]:
        """``(events, jobs)`` that :meth:`prune_events` then :meth:`prune_done_jobs` would delete
        (``None``: kept forever): the events, and the done jobs that are theirs or old enough."""
        never = float("-inf")
        sql = (f"WITH p AS ({self._PRUNABLE_EVENTS}) SELECT (SELECT COUNT(*) FROM p),"
               f" (SELECT COUNT(*) FROM jobs WHERE state = 'done'"
               f"  AND (updated_at < :jobs_before OR {_JOB_EVENT} IN (SELECT id FROM p)))")
        params = {"before": never if events_before is None else events_before,
                  "jobs_before": never if jobs_before is None else jobs_before}
        return await self.run(lambda db: tuple(db.conn.execute(sql, params).fetchone()))

    async def prune_events(self, before: float, limit: int) -> tuple[int, int]:
        """Delete up to ``limit`` events received before ``before`` whose jobs are all done, with
        those jobs. Returns ``(events, jobs)`` deleted."""
        def _prune(db: sqlite_utils.Database) -> tuple[int, int]:
            with self._tx(db) as conn:
                ids = [r[0] for r in conn.execute(self._PRUNABLE_EVENTS + " ORDER BY e.received_at LIMIT :limit",
                                                  {"before": before, "limit": limit})]
                jobs = events = 0
                for event_id in ids:
                    jobs += conn.execute(f"DELETE FROM jobs WHERE {_JOB_EVENT} = ? AND state = 'done'",
                                         (event_id,)).rowcount
                    events += conn.execute("DELETE FROM events WHERE id = ?", (event_id,)).rowcount
            return events, jobs

        return await self.run(_prune)

    async def prune_done_jobs(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` done jobs last updated before ``before``. Returns how many."""
        def _prune(db: sqlite_utils.Database) -> int:
            with self._tx(db) as conn:
                return conn.execute(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state = 'done'"
                    " AND updated_at < ? ORDER BY id LIMIT ?)", (before, limit)).rowcount

        return await self.run(_prune)

    async def record_cleanup_run(self, trigger: str, started_at: float, finished_at: float, ok: bool,
                                 report: dict[str, Any], keep: int = 100) -> None:
        """Log a finished cleanup run (``report`` as JSON); keep the last ``keep`` runs."""
        def _record(db: sqlite_utils.Database) -> None:
            with self._tx(db) as conn:
                conn.execute("INSERT INTO cleanup_runs (trigger, started_at, finished_at, ok, report)"
                             " VALUES (?, ?, ?, ?, ?)", (trigger, started_at, finished_at, int(ok),
                                                         json.dumps(report)))
                conn.execute("DELETE FROM cleanup_runs WHERE id <= (SELECT MAX(id) FROM cleanup_runs) - ?",
                             (keep,))

        await self.run(_record)

    async def cleanup_runs(self, limit: int = 10) -> list[dict[str, Any]]:
        """The last ``limit`` cleanup runs, newest first (``report`` decoded)."""
        def _runs(db: sqlite_utils.Database) -> list[dict[str, Any]]:
            rows = list(db["cleanup_runs"].rows_where(order_by="id DESC", limit=limit))
            for r in rows:
                r["report"] = json.loads(r["report"]) if r["report"] else None
            return rows

        return await self.run(_runs)

    async def stats(self) -> CatalogStats:
        """Everything ``/metrics`` reads from the catalog, in one trip to the catalog thread."""
        def _stats(db: sqlite_utils.Database) -> CatalogStats:
            conn = db.conn
            jobs = {(k, s): n for k, s, n in conn.execute(
                "SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state")}
            oldest = {k: t for k, t in conn.execute(
                "SELECT kind, MIN(created_at) FROM jobs WHERE state = 'queued' GROUP BY kind")}
            media = [tuple(r) for r in conn.execute(
                "SELECT backend, category, state, COUNT(*), COALESCE(SUM(size), 0) FROM media"
                " GROUP BY backend, category, state")]
            last = conn.execute("SELECT MAX(finished_at) FROM cleanup_runs WHERE ok = 1").fetchone()[0]
            return CatalogStats(jobs, oldest, media, last)

        return await self.run(_stats)


def _to_sql(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    return value
