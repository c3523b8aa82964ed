"""The SQLite catalog's ``jobs``: the durable queue's rows (DESIGN §6). One writer (the catalog
thread), so claiming the oldest due job in one ``UPDATE ... RETURNING`` hands it to one worker."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, cast

import sqlite_utils

from gateway.catalog.contract import MediaTaken
from gateway.catalog.rows import (MEDIA_ANY_TAKEN, MEDIA_SOURCE_HOLDER, ClaimedJob, JobRow, MediaRow,
                                   job_listing, media_insert)
from gateway.catalog.sqlite.connection import SQLiteConnection, to_sql, transaction


_SOURCE_HOLDER = MEDIA_SOURCE_HOLDER.format("?")


def insert_job(conn: sqlite3.Connection, kind: str, key: str, payload: dict[str, Any],
                now: float, run_at: float | None = None, deadline: float | None = None) -> bool:
    """Queue a job unless one with ``key`` (its idempotency key) exists; ``True`` if added. Inside the
    caller's transaction ``conn``. ``deadline``: when its work is lost if not done (epoch seconds;
    claims take the earliest first)."""
    cur = conn.execute(
        "INSERT INTO jobs (kind, key, payload, state, attempts, run_at, created_at, updated_at, deadline)"
        " VALUES (?,?,?, 'queued', 0, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING",
        (kind, key, json.dumps(payload), run_at if run_at is not None else now, now, now, deadline),
    )
    return cur.rowcount > 0


def insert_claimed_job(conn: sqlite3.Connection, kind: str, key: str, payload: dict[str, Any],
                       now: float, deadline: float | None = None) -> ClaimedJob | None:
    """Add a job already claimed (``running``, its first attempt counted) unless one with ``key``
    exists; the claimed row, or None. Inside the caller's transaction ``conn``. ``deadline``: as
    :func:`insert_job`'s (kept should the job be queued again)."""
    row = conn.execute(
        "INSERT INTO jobs (kind, key, payload, state, attempts, run_at, created_at, updated_at, deadline)"
        " VALUES (?,?,?, 'running', 1, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING"
        " RETURNING id, kind, key, payload, attempts, created_at",
        (kind, key, json.dumps(payload), now, now, now, deadline)).fetchone()
    if row is None:
        return None
    return {"id": row[0], "kind": row[1], "key": row[2], "payload": payload, "attempts": row[4],
            "created_at": row[5]}


def job_row(db: sqlite_utils.Database, job_id: int) -> JobRow | None:
    """The job ``job_id`` (``payload`` decoded), or None."""
    rows = list(db["jobs"].rows_where("id = ?", [job_id]))
    if not rows:
        return None
    rows[0]["payload"] = json.loads(rows[0]["payload"])
    return cast(JobRow, rows[0])


def _kinds_clause(kinds: Sequence[str] | None, exclude: Sequence[str]) -> tuple[str, list[str]]:
    """``(" AND kind IN (?,...) AND kind NOT IN (?,...)", args)`` to pick jobs of ``kinds``
    (None: any) and none of ``exclude``."""
    sql, args = "", []
    if kinds is not None:
        sql += f" AND kind IN ({','.join('?' * len(kinds))})"
        args += list(kinds)
    if exclude:
        sql += f" AND kind NOT IN ({','.join('?' * len(exclude))})"
        args += list(exclude)
    return sql, args


class JobsMixin(SQLiteConnection):
    """:class:`gateway.catalog.CatalogContract`'s jobs methods on SQLite."""

    async def enqueue(self, kind: str, key: str, payload: dict[str, Any]) -> bool:
        """Add a job unless one with ``key`` exists (idempotency key). ``True`` if added."""
        def _enqueue(db: sqlite_utils.Database) -> bool:
            with transaction(db) as conn:
                return insert_job(conn, kind, key, payload, time.time())

        return await self.write(_enqueue)

    async def claim_job(self, now: float | None = None, kinds: Sequence[str] | None = None,
                        exclude_kinds: Sequence[str] = ()) -> ClaimedJob | None:
        """Take the due queued job of ``kinds`` (None: any) and none of ``exclude_kinds`` with the
        earliest deadline (jobs
        without one first), then the oldest: mark it running, count the attempt, return it.
        Claims waiting together share a group commit."""
        now = now if now is not None else time.time()
        lane, lane_args = _kinds_clause(kinds, exclude_kinds)

        def _claim(db: sqlite_utils.Database) -> ClaimedJob | None:
            with transaction(db) as conn:
                cur = conn.execute(
                    "UPDATE jobs SET state='running', attempts=attempts+1, updated_at=?"
                    f" WHERE id = (SELECT id FROM jobs WHERE state='queued'{lane} AND run_at<=?"
                    " ORDER BY deadline, run_at, id LIMIT 1)"
                    " RETURNING id, kind, key, payload, attempts, created_at",
                    (now, *lane_args, now),
                )
                row = cur.fetchone()
            if row is None:
                return None
            return {"id": row[0], "kind": row[1], "key": row[2], "payload": json.loads(row[3]),
                    "attempts": row[4], "created_at": row[5]}

        return await self.write(_claim, durable=False)  # a claim lost in a crash: queued again

    async def next_run_at(self, kinds: Sequence[str] | None = None,
                          exclude_kinds: Sequence[str] = ()) -> float | None:
        """When the earliest queued job of ``kinds`` (None: any) and none of ``exclude_kinds`` is
        due (epoch seconds), or None."""
        lane, lane_args = _kinds_clause(kinds, exclude_kinds)
        return await self.read(lambda db: db.conn.execute(
            f"SELECT MIN(run_at) FROM jobs WHERE state='queued'{lane}", lane_args).fetchone()[0])

    async def media_backlog(self) -> tuple[float, float] | None:
        """``(created_at, deadline)`` of the queued ingest job with the earliest deadline, or None."""
        def _backlog(db: sqlite_utils.Database) -> tuple[float, float] | None:
            row = db.conn.execute(
                "SELECT created_at, deadline FROM jobs WHERE state='queued' AND kind='ingest'"
                " AND deadline IS NOT NULL ORDER BY deadline LIMIT 1").fetchone()
            return (row[0], row[1]) if row is not None else None

        return await self.read(_backlog)

    async def media_waiting(self) -> int:
        """Queued or running ``ingest`` jobs (the ``idx_jobs_lane`` index)."""
        return int(await self.run(lambda db: db.conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') AND kind='ingest'").fetchone()[0]))

    async def complete_job(self, job_id: int, followups: Sequence[tuple[str, str, dict[str, Any]]] = (),
                           event_update: tuple[str, dict[str, Any]] | None = None,
                           claim: bool = False, durable: bool = True,
                           media: Sequence[MediaRow] = ()) -> list[ClaimedJob]:
        """Insert the ``media`` rows (:class:`MediaTaken` if another stored row holds one's source
        key), mark a job done, enqueue ``followups`` ``(kind, key, payload)`` (``claim``: already
        claimed, and returned) and apply ``event_update`` ``(event_id, {column: value})``, all in
        one transaction, ahead of other waiting catalog work (``durable=False``: without an fsync
        of its own, see the contract)."""
        now = time.time()
        inserts = [media_insert(row, "?", MEDIA_ANY_TAKEN) for row in media]

        def _complete(db: sqlite_utils.Database) -> list[ClaimedJob]:
            claimed: list[ClaimedJob] = []
            with transaction(db) as conn:
                if media:
                    taken = [str(row["source_key"]) for row, (sql, args) in zip(media, inserts)
                             if not conn.execute(sql, args).rowcount
                             and conn.execute(_SOURCE_HOLDER, (row["source_key"],)).fetchone() != (row["id"],)]
                    if taken:
                        raise MediaTaken(taken)  # rolls the transaction back
                if event_update is not None:
                    event_id, values = event_update
                    cols = ", ".join(f"{c} = ?" for c in values)
                    conn.execute(f"UPDATE events SET {cols} WHERE id = ?",
                                 [*(to_sql(v) for v in values.values()), event_id])
                for kind, key, payload in followups:
                    if not claim:
                        insert_job(conn, kind, key, payload, now)
                    elif (row := insert_claimed_job(conn, kind, key, payload, now)) is not None:
                        claimed.append(row)
                conn.execute("UPDATE jobs SET state='done', updated_at=?, last_error=NULL WHERE id=?",
                             (now, job_id))
            return claimed

        # the job's effect has happened: record it at once
        return await self.write(_complete, first=True, durable=durable)

    async def fail_job(self, job_id: int, error: str, retry_at: float | None) -> None:
        """Record a failed attempt: back to ``queued`` at ``retry_at``, or ``dead`` when None."""
        now = time.time()

        def _fail(db: sqlite_utils.Database) -> None:
            with transaction(db) as conn:
                if retry_at is None:
                    conn.execute("UPDATE jobs SET state='dead', last_error=?, updated_at=? WHERE id=?",
                                 (error[:2000], now, job_id))
                else:
                    conn.execute("UPDATE jobs SET state='queued', last_error=?, run_at=?, updated_at=?"
                                 " WHERE id=?", (error[:2000], retry_at, now, job_id))

        await self.write(_fail)

    async def release_job(self, job_id: int) -> None:
        """Return an interrupted running job to the queue without counting the attempt."""
        def _release(db: sqlite_utils.Database) -> None:
            with transaction(db) as conn:
                conn.execute("UPDATE jobs SET state='queued', attempts=MAX(attempts-1, 0), updated_at=?"
                             " WHERE id=? AND state='running'", (time.time(), job_id))

        await self.write(_release, durable=False)

    async def requeue_running(self) -> int:
        """Jobs left ``running`` by a crash go back to ``queued`` (called at start). Returns how many."""
        def _requeue(db: sqlite_utils.Database) -> int:
            with transaction(db) as conn:
                return conn.execute("UPDATE jobs SET state='queued', updated_at=? WHERE state='running'",
                                    (time.time(),)).rowcount

        return await self.run(_requeue)

    async def get_job(self, job_id: int) -> JobRow | None:
        """The job row (``payload`` decoded), or None."""
        return await self.read(job_row, job_id)

    async def list_jobs(self, state: str | None = None, kind: str | None = None, *, limit: int | None = None,
                        newest_first: bool = False, before: int | None = None) -> list[JobRow]:
        """Jobs filtered by ``state`` and ``kind``, oldest (or ``newest_first``) first, at most
        ``limit``, ids below ``before`` (see :meth:`gateway.catalog.CatalogContract.list_jobs`)."""
        sql, args = job_listing("SELECT * FROM jobs", ":{}", state=state, kind=kind, before=before,
                                newest_first=newest_first, limit=limit)

        def _list(db: sqlite_utils.Database) -> list[JobRow]:
            cur = db.conn.execute(sql, args)
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, row)) for row in cur]
            for r in rows:
                r["payload"] = json.loads(r["payload"])
            return cast(list[JobRow], rows)

        return await self.read(_list)

    async def job_counts(self) -> dict[tuple[str, str], int]:
        """``{(kind, state): count}`` (every job: on the scan thread)."""
        def _counts(db: sqlite_utils.Database) -> dict[tuple[str, str], int]:
            rows = db.conn.execute("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state")
            return {(k, s): n for k, s, n in rows}

        return await self.scan(_counts)

    async def retry_dead_job(self, job_id: int) -> JobRow | None:
        """Queue a dead job again (attempts reset). The row as queued again (read in the same
        transaction, before a worker can claim it), or None if the job was not dead."""
        def _retry(db: sqlite_utils.Database) -> JobRow | None:
            with transaction(db) as conn:
                if not conn.execute(
                        "UPDATE jobs SET state = 'queued', attempts = 0, run_at = ?, updated_at = ?"
                        " WHERE id = ? AND state = 'dead'", (time.time(), time.time(), job_id)).rowcount:
                    return None
                return job_row(db, job_id)

        return await self.run(_retry)
