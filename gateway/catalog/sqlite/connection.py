"""The SQLite catalog's connection: one dedicated thread owns it, so the event loop never blocks on
SQLite and there is exactly one writer. WAL mode with ``synchronous=FULL``: a committed webhook
survives a crash or power loss. One daemon per catalog: an exclusive ``flock`` on ``<path>.lock``.

Group commit (DESIGN §6): writes submitted with :meth:`SQLiteConnection.write` that wait for the
catalog thread together (webhooks, job claims and completions arriving while a commit is in
flight) run in one transaction and share one ``COMMIT`` (one fsync); none of their callers hears
back before that commit returned.

Checkpoints when idle: when the catalog thread has nothing to do and rows were written since the
last checkpoint (at most one every :data:`CHECKPOINT_INTERVAL` seconds), it copies the WAL back
into the database (``PRAGMA wal_checkpoint(PASSIVE)``), so that SQLite's own checkpoint (at 1,000
WAL pages) seldom runs inside a commit a webhook is waiting for.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from gateway.catalog.contract import CatalogError, CatalogLocked
from gateway.catalog.rows import to_column
from gateway.catalog.sqlite.migrations import MIGRATIONS, SCHEMA_VERSION
from gateway.catalog.contract import CatalogTuning

T = TypeVar("T")

log = logging.getLogger("gateway.catalog.sqlite")

#: Most writes one group commit takes from the queue: bounds the time the first waits.
MAX_BATCH = 256

#: Seconds, at least, between two idle-time checkpoints of the WAL (:meth:`SQLiteConnection.checkpoint_when_idle`).
CHECKPOINT_INTERVAL = 0.5


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` (the write lock at once, so the transaction never fails half-way on a
    busy database) ... ``COMMIT``; ``ROLLBACK`` when the block raises. Inside a transaction
    already open (a group commit's, :meth:`SQLiteConnection.write`), the block joins it: it
    becomes durable with the group's ``COMMIT``, and if it raises, the group is rolled back and
    each of its writes runs again alone."""
    conn = db.conn
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def fetch_dicts(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    """The cursor's remaining rows as ``{column: value}`` dicts."""
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


to_sql = to_column
"""A column value as SQLite stores it (:func:`gateway.catalog.rows.to_column`)."""


@dataclass(slots=True)
class _Call:
    """One call waiting for the catalog thread; ``write``: it may share a group commit."""

    future: Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    write: bool = False
    durable: bool = True
    #: The awaiting coroutine's future, settled by :func:`_settle` on its loop (one wake-up per group).
    settle: asyncio.Future[Any] | None = None


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """On the event loop: set each future's result or exception (unless it was cancelled)."""
    for future, result, error in outcomes:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class _CatalogThread(Executor):
    """The catalog's one thread: runs submitted calls one at a time in submission order, except
    that :meth:`submit_first` calls run before every call still waiting. Marking a job done goes
    first, so that the moment between a job's effect (a bot's 2xx) and the commit that records it,
    in which a crash repeats the job, is not stretched by a queue of other catalog work.

    Writes (``write=True``) waiting together, up to :data:`MAX_BATCH`, run as one group commit
    through ``group(calls)``, which resolves their futures once it committed.

    ``idle()`` runs whenever the queue is empty, before the thread waits for the next call: it
    returns the seconds after which it wants to run again if nothing arrives, or ``None``.
    """

    def __init__(self, group: Callable[[list[_Call]], None] | None = None,
                 idle: Callable[[], float | None] | None = None) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, _Call | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._shutdown = False
        self._group = group
        self._idle = idle

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` after the calls already waiting."""
        return self._put(1, _Call(Future(), fn, args, kwargs))

    def submit_first(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        """Run ``fn(*args)`` before the ordinary calls already waiting."""
        return self._put(0, _Call(Future(), fn, args, {}))

    def submit_write(self, fn: Callable[[], T], first: bool = False, durable: bool = True,
                     settle: asyncio.Future[T] | None = None) -> Future[T]:
        """Run ``fn()`` in a group commit with the other writes waiting (``first``: ahead of the
        ordinary calls, like :meth:`submit_first`; ``durable``: see :meth:`SQLiteConnection.write`).
        ``settle``: an asyncio future that gets the outcome too, on its own loop, together with
        the other futures of the group in one callback."""
        return self._put(0 if first else 1, _Call(Future(), fn, (), {}, write=True, durable=durable,
                                                  settle=settle))

    def _put(self, priority: int, call: _Call) -> Future[Any]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="catalog", daemon=True)
                self._thread.start()
            self._queue.put((priority, next(self._seq), call))
        return call.future

    def _next(self) -> tuple[int, int, _Call | None]:
        """The next call from the queue; when there is none, ``idle()`` first."""
        if self._idle is None:
            return self._queue.get()
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            pass
        while True:
            try:
                wait = self._idle()
            except Exception:  # idle work is best effort: the calls still run
                log.exception("catalog: idle work failed")
                wait = None
            try:
                return self._queue.get(timeout=wait)
            except queue.Empty:
                continue

    def _work(self) -> None:
        held: tuple[int, int, _Call | None] | None = None
        while True:
            entry, held = (held, None) if held is not None else (self._next(), None)
            call = entry[2]
            if call is None:
                return
            if call.write and self._group is not None:
                batch = [call] if call.future.set_running_or_notify_cancel() else []
                while len(batch) < MAX_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt[2] is None or not nxt[2].write:
                        held = nxt  # runs next, after this group's commit
                        break
                    if nxt[2].future.set_running_or_notify_cancel():
                        batch.append(nxt[2])
                if batch:
                    self._group(batch)
                continue
            if not call.future.set_running_or_notify_cancel():
                continue
            try:
                call.future.set_result(call.fn(*call.args, **call.kwargs))
            except BaseException as exc:  # handed to the awaiting coroutine
                call.future.set_exception(exc)

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


class SQLiteConnection(CatalogTuning):
    """The SQLite catalog's connection at ``path`` and its one thread: opening (WAL,
    ``synchronous=FULL``, migrations), the daemon's lock, and :meth:`run` to reach the database
    from the event loop. The concern modules (events, jobs, media, retention) build on it;
    :class:`gateway.catalog.sqlite.SQLiteCatalog` puts them together.

    ``exclusive``: :meth:`open` takes :meth:`lock` first (the daemon's catalog). ``read_only``:
    see :attr:`gateway.catalog.CatalogContract.read_only` (both connections ``query_only``).
    """

    def __init__(self, path: Path, exclusive: bool = False, read_only: bool = False):
        self.path = Path(path)
        self.exclusive = exclusive
        self.read_only = read_only
        self._executor = _CatalogThread(self._group_commit, self.checkpoint_when_idle)
        self._db: sqlite_utils.Database | None = None
        #: The reader's own connection and thread (:meth:`read`): reads never wait behind a commit.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog-read")
        self._read_db: sqlite_utils.Database | None = None
        #: The scans' own connection and thread (:meth:`scan`): they never hold up the reads.
        self._scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog-scan")
        self._scan_db: sqlite_utils.Database | None = None
        self._lock_fd: int | None = None
        #: Group commits done, and the writes they carried (read by the metrics).
        self.commits = 0
        #: Of those, the ones that waited for the disk (``synchronous=FULL``: an fsync).
        self.durable_commits = 0
        self.committed_writes = 0
        #: Idle-time checkpoints done (:meth:`checkpoint_when_idle`), and the writer's
        #: ``total_changes`` (rows written) at the last.
        self.checkpoints = 0
        self._checkpointed_changes = 0
        self._checkpointed_at = 0.0
        self._checkpoint_failing = False

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
        """Run ``fn(db, *args)`` on the catalog thread and return its result. Raises
        :class:`CatalogError` when the catalog is not open (before :meth:`open`, after :meth:`close`)."""
        self._require()  # a closed catalog's thread is gone: say so rather than fail to schedule
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._require(), *args))

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the read-only ``fn(db, *args)`` on the reader thread, over a second connection
        (``query_only``), so that it does not wait behind the catalog thread's writes and their
        fsync. WAL gives it the state of the last commit when it starts: a write whose ``await``
        returned is seen. Raises :class:`CatalogError` when the catalog is not open."""
        self._require()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, lambda: fn(self._reader_db(), *args))

    async def scan(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the read-only ``fn(db, *args)`` on the scan thread, over a connection of its own
        (``query_only``): for aggregates over every job or media row (the metrics, the counts of
        the console and the files API), which take seconds on a catalog of millions of rows and
        must not hold up the short reads of :meth:`read` (readiness, the media backlog, serving).
        Sees the last commit, as :meth:`read`. Raises :class:`CatalogError` when the catalog is not
        open."""
        self._require()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._scanner, lambda: fn(self._scanner_db(), *args))

    def _reader_db(self) -> sqlite_utils.Database:
        """The reader thread's connection, opened on its first use."""
        self._require()
        if self._read_db is None:
            self._read_db = self._query_only()
        return self._read_db

    def _scanner_db(self) -> sqlite_utils.Database:
        """The scan thread's connection, opened on its first use."""
        self._require()
        if self._scan_db is None:
            self._scan_db = self._query_only()
        return self._scan_db

    def _query_only(self) -> sqlite_utils.Database:
        """A new ``query_only`` connection to the catalog, for a thread of its own."""
        conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA query_only=ON")
        return sqlite_utils.Database(conn)

    async def write(self, fn: Callable[..., T], *args: Any, first: bool = False, durable: bool = True) -> T:
        """Run ``fn(db, *args)`` on the catalog thread inside a group commit: with the other writes
        waiting at that moment, in one transaction and one ``COMMIT`` (one fsync). ``fn`` must only
        write to the database (it may run twice: when a write of its group raises, each runs again
        alone), and may use :func:`transaction`. Returns ``fn``'s result once the commit is
        durable; ``fn``'s exception undoes its own writes only and is raised here. ``first``: ahead
        of the ordinary calls waiting. ``durable=False`` (job claims, leases: state a crash may
        lose, since the job is queued again): a group of only such writes commits with
        ``synchronous=NORMAL``, no fsync (WAL: the commit survives a crash of the process, and the
        next durable commit's fsync covers it against power loss). Raises :class:`CatalogError`
        when the catalog is not open, and the ``sqlite3.Error`` of a failed ``BEGIN``/``COMMIT``."""
        self._require()
        settle: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        call = self._executor.submit_write(lambda: fn(self._require(), *args), first=first, durable=durable,
                                           settle=settle)
        settle.add_done_callback(lambda f: call.cancel() if f.cancelled() else None)  # not run yet: skipped
        return await settle

    def _group_commit(self, calls: list[_Call]) -> None:
        """On the catalog thread: run ``calls`` in one transaction and commit once, then resolve
        their futures. If one raises, the group is rolled back and each call runs again alone, in a
        transaction of its own (the writes are SQL only, so running one again is safe), so that
        its exception goes to its own caller and the others still commit."""
        try:
            results = self._commit(calls)
        except BaseException:
            if len(calls) == 1:
                results = None
            else:
                for call in calls:
                    self._resolve([call], self._try_commit([call]))
                return
        self._resolve(calls, results if results is not None else self._try_commit(calls))

    def _try_commit(self, calls: list[_Call]) -> list[Any] | BaseException:
        try:
            return self._commit(calls)
        except BaseException as exc:
            return exc

    def _commit(self, calls: list[_Call]) -> list[Any]:
        """``BEGIN IMMEDIATE``, every call, ``COMMIT``: their results; ``ROLLBACK`` and raise if
        one call or the commit raises."""
        conn = self._require().conn
        durable = any(call.durable for call in calls)
        if not durable:  # only for this commit: every other transaction on the connection stays FULL
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = [call.fn() for call in calls]
            conn.execute("COMMIT")
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolled back already
            raise
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous=FULL")
        self.commits += 1
        self.durable_commits += durable
        self.committed_writes += len(calls)
        if self.on_commit is not None:
            try:
                self.on_commit(len(calls), durable)
            except Exception:  # metrics never fail a commit
                pass
        return results

    def checkpoint_when_idle(self) -> float | None:
        """On the catalog thread, when it has nothing else to do: if rows were written on the
        writer's connection since the last checkpoint (in a group commit or not), ``PRAGMA
        wal_checkpoint(PASSIVE)``: copy the committed WAL frames into the database file and fsync
        it; it never waits for readers, and leaves the frames a reader still needs. At most one
        every :data:`CHECKPOINT_INTERVAL` seconds: returns the seconds until the next may run, or
        ``None`` when there is nothing to checkpoint. SQLite's automatic checkpoint (1,000 WAL
        pages, inside a commit) stays as the backstop while the thread is never idle. A failed
        checkpoint is logged (one line until one succeeds again) and tried again after the
        interval; the commits are durable in the WAL either way
        (https://www.sqlite.org/wal.html#ckpt)."""
        db = self._db
        if db is None or self.read_only or db.conn.total_changes == self._checkpointed_changes:
            return None
        wait = self._checkpointed_at + CHECKPOINT_INTERVAL - time.monotonic()
        if wait > 0:
            return wait
        changes = db.conn.total_changes
        self._checkpointed_at = time.monotonic()
        try:
            db.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            if not self._checkpoint_failing:  # one line per outage, not one per half second
                log.warning("catalog %s: idle-time WAL checkpoint failed (tried again every %.1f s): %s",
                            self.path, CHECKPOINT_INTERVAL, exc)
            self._checkpoint_failing = True
            return CHECKPOINT_INTERVAL
        if self._checkpoint_failing:
            log.info("catalog %s: idle-time WAL checkpoints work again", self.path)
        self._checkpoint_failing = False
        self._checkpointed_changes = changes
        self.checkpoints += 1
        return None

    @staticmethod
    def _resolve(calls: list[_Call], outcome: list[Any] | BaseException) -> None:
        """Settle the calls' futures with ``outcome`` (results in order, or one exception for all);
        the awaiting coroutines' futures in one callback per event loop."""
        settled: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for i, call in enumerate(calls):
            if isinstance(outcome, BaseException):
                call.future.set_exception(outcome)
                result, error = None, outcome
            else:
                call.future.set_result(outcome[i])
                result, error = outcome[i], None
            if call.settle is not None:
                settled.setdefault(call.settle.get_loop(), []).append((call.settle, result, error))
        for loop, outcomes in settled.items():
            try:
                loop.call_soon_threadsafe(_settle, outcomes)
            except RuntimeError:  # the loop closed: nobody waits any more
                pass

    def _require(self) -> sqlite_utils.Database:
        if self._db is None:
            raise CatalogError("catalog is not open")
        return self._db

    async def open(self) -> None:
        """Create the file and directory if needed, enable WAL, apply migrations. An ``exclusive``
        catalog (the daemon's) first takes :meth:`lock`, so nothing is touched while another
        daemon runs on it. A ``read_only`` one touches nothing: the file must exist at this
        gateway's schema version.

        Raises :class:`CatalogLocked` (see :meth:`lock`), :class:`CatalogError` if the schema is
        newer than this gateway knows (read-only: missing, or not this gateway's).
        """
        if self.exclusive:
            self.lock()
        def _open() -> sqlite_utils.Database:
            if self.read_only:
                return _open_read_only()
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
                with transaction(db):
                    MIGRATIONS[number](db)
                    conn.execute(f"PRAGMA user_version={number + 1}")
            return db

        def _open_read_only() -> sqlite_utils.Database:
            if not self.path.is_file():
                raise CatalogError(f"no catalog at {self.path}")
            conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
            conn.execute("PRAGMA query_only=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                conn.close()
                raise CatalogError(f"catalog {self.path} has schema version {version}; this gateway knows "
                                   f"{SCHEMA_VERSION} (only the daemon migrates it)")
            return sqlite_utils.Database(conn)

        loop = asyncio.get_running_loop()
        try:
            self._db = await loop.run_in_executor(self._executor, _open)
        except BaseException:
            self._unlock()
            raise

    async def close(self) -> None:
        """Close the connection and stop the catalog thread."""
        loop = asyncio.get_running_loop()
        if self._read_db is not None:
            read_db, self._read_db = self._read_db, None
            await loop.run_in_executor(self._reader, read_db.conn.close)
        if self._scan_db is not None:
            scan_db, self._scan_db = self._scan_db, None
            await loop.run_in_executor(self._scanner, scan_db.conn.close)
        if self._db is not None:
            db, self._db = self._db, None
            await loop.run_in_executor(self._executor, db.conn.close)
        self._reader.shutdown(wait=True)
        self._scanner.shutdown(wait=True)
        self._executor.shutdown(wait=True)
        self._unlock()

    async def check(self) -> None:
        """Raise if the catalog cannot answer a query (for ``/readyz``)."""
        await self.run(lambda db: db.conn.execute("SELECT 1").fetchone())

    async def schema_version(self) -> int:
        """The ``user_version`` of the open database."""
        return await self.run(lambda db: db.conn.execute("PRAGMA user_version").fetchone()[0])
