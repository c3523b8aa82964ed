"""The SQLite catalog's retention queries (:mod:`gateway.retention` runs them): expired media,
unfinished deletions, the storage listing for reconciliation, pruning, the ``cleanup_runs`` log, and
the scrape-time statistics."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

import sqlite_utils

from gateway.catalog.contract import CatalogStats, ExpiryRule
from gateway.catalog.rows import (
    CleanupRunRow,
    DoomedMedia,
    ExpiredMedia,
    ListedObject,
    UnlistedMedia,
)
from gateway.catalog.sqlite.connection import SQLiteConnection, fetch_dicts, transaction
from gateway.catalog.sqlite.migrations import JOB_EVENT


class RetentionMixin(SQLiteConnection):
    """:class:`gateway.catalog.CatalogContract`'s retention queries on SQLite."""

    # An object is *needed* while a queued or running job works on an event whose media refers to
    # it: the event's ingest job reuses stored rows by ``source_key`` (the same attachment in a
    # redelivery, in ``message`` and ``message.any``, or quoted in a reply), and its deliver jobs
    # send links to them. Such rows are never claimed. Claiming (state ``deleting``) happens in the
    # same transaction as that check, and a claimed row no longer counts for ``source_key`` reuse,
    # so an event committed after the claim fetches the attachment again instead of linking to an
    # object about to go. Dead jobs protect nothing (they wait for a person, maybe forever).
    _NEEDED = f"""
        active AS MATERIALIZED (SELECT DISTINCT {JOB_EVENT} AS event_id FROM jobs
                   WHERE state IN ('queued', 'running') AND {JOB_EVENT} IS NOT NULL),
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
        """``(expired rows, of which needed, bytes of the others)`` under ``rule``. It reads every
        media row of the backend (0.7 s for a million on the 2-core VM): on the scan thread, so that
        the webhooks' commits do not wait behind a cleanup run's count."""
        sql, params = self._expired_sql(rule, "")
        sql += "SELECT COUNT(*), COALESCE(SUM(in_use), 0), COALESCE(SUM(CASE WHEN in_use THEN 0 ELSE size END), 0)" \
               " FROM expired"
        return await self.scan(lambda db: tuple(db.conn.execute(sql, params).fetchone()))

    async def expired_media(self, rule: ExpiryRule, after: str, limit: int, claim: bool
                            ) -> list[ExpiredMedia]:
        """Up to ``limit`` expired rows with ``id > after``, by id: dicts with ``id``, ``key``,
        ``bucket``, ``size`` (bytes), ``category``, ``provider``, ``reason`` and ``in_use`` (bool).

        With ``claim``, rows not in use are moved to state ``deleting`` in the same transaction
        (their objects are then deleted, then :meth:`forget_media` removes the rows).
        """
        sql, params = self._expired_sql(rule, after)
        sql += "SELECT * FROM expired ORDER BY id LIMIT :limit"
        params["limit"] = limit

        def _select(db: sqlite_utils.Database) -> list[ExpiredMedia]:
            rows = cast(list[ExpiredMedia], fetch_dicts(db.conn.execute(sql, params)))
            for row in rows:
                row["in_use"] = bool(row["in_use"])
            return rows

        def _claim(db: sqlite_utils.Database) -> list[ExpiredMedia]:
            with transaction(db) as conn:  # the check and the claim: one transaction
                rows = _select(db)
                conn.executemany(
                    "UPDATE media SET state = 'deleting', state_at = ?, state_reason = ?"
                    " WHERE id = ? AND state IN ('stored', 'missing')",
                    [(rule.now, r["reason"], r["id"]) for r in rows if not r["in_use"]])
            return rows

        return await (self.run(_claim) if claim else self.scan(_select))  # a dry run only reads

    async def media_being_deleted(self, backend: str, after: str, limit: int) -> list[DoomedMedia]:
        """Rows in state ``deleting`` (claimed by a run whose delete failed or was interrupted),
        by id, ``id > after``: ``id``, ``key``, ``bucket``, ``size``, ``category``, ``provider``,
        ``reason``."""
        return await self.run(lambda db: cast(list[DoomedMedia], fetch_dicts(db.conn.execute(
                "SELECT id, key, bucket, size, category, provider, COALESCE(state_reason, 'age') AS reason"
                " FROM media WHERE state = 'deleting' AND backend = ? AND id > ? ORDER BY id LIMIT ?",
                (backend, after, limit)))))

    async def forget_media(self, ids: list[str]) -> int:
        """Delete the rows ``ids`` that are in state ``deleting`` (their objects are gone). Returns how many."""
        def _forget(db: sqlite_utils.Database) -> int:
            with transaction(db) as conn:
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

    async def add_listing(self, objects: list[ListedObject]) -> None:
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
                                 ) -> list[ListedObject]:
        """Listed objects that no media row of ``backend`` points at (orphan candidates), by
        ``(bucket, key)`` after ``after``: ``(bucket or "", key, size, modified)``."""
        return await self.run(lambda db: [tuple(r) for r in db.conn.execute(
            "SELECT s.bucket, s.key, s.size, s.modified FROM temp.cleanup_listing s"
            " WHERE (s.bucket, s.key) > (?, ?) AND NOT EXISTS (SELECT 1 FROM media m"
            "  WHERE m.key = s.key AND m.backend = ? AND (m.bucket IS NULL OR m.bucket = s.bucket OR s.bucket = ''))"
            " ORDER BY s.bucket, s.key LIMIT ?", (*after, backend, limit))])

    async def rows_not_listed(self, backend: str, created_before: float, after: str, limit: int
                              ) -> list[UnlistedMedia]:
        """Stored rows of ``backend`` created before ``created_before`` whose object is not in the
        listing, by id after ``after``: ``id``, ``key``, ``bucket``, ``size``, ``provider``, ``event_id``."""
        return await self.run(lambda db: cast(list[UnlistedMedia], fetch_dicts(db.conn.execute(
            "SELECT id, key, bucket, size, provider, event_id FROM media m"
            " WHERE +m.backend = ? AND +m.state = 'stored' AND +m.created_at < ? AND m.id > ?"  # by primary key
            " AND NOT EXISTS (SELECT 1 FROM temp.cleanup_listing s"
            "  WHERE s.key = m.key AND (m.bucket IS NULL OR s.bucket = m.bucket))"
            " ORDER BY id LIMIT ?", (backend, created_before, after, limit)))))

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
            with transaction(db) as conn:
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
        (``None``: kept forever): the events, and the done jobs that are theirs or old enough. On
        the scan thread (a dry run's count reads every event)."""
        never = float("-inf")
        sql = (f"WITH p AS ({self._PRUNABLE_EVENTS}) SELECT (SELECT COUNT(*) FROM p),"
               f" (SELECT COUNT(*) FROM jobs WHERE state = 'done'"
               f"  AND (updated_at < :jobs_before OR {JOB_EVENT} IN (SELECT id FROM p)))")
        params = {"before": never if events_before is None else events_before,
                  "jobs_before": never if jobs_before is None else jobs_before}
        return await self.scan(lambda db: tuple(db.conn.execute(sql, params).fetchone()))  # every event

    async def prune_events(self, before: float, limit: int) -> tuple[int, int]:
        """Delete up to ``limit`` events received before ``before`` whose jobs are all done, with
        those jobs. Returns ``(events, jobs)`` deleted."""
        def _prune(db: sqlite_utils.Database) -> tuple[int, int]:
            with transaction(db) as conn:
                ids = [r[0] for r in conn.execute(self._PRUNABLE_EVENTS + " ORDER BY e.received_at LIMIT :limit",
                                                  {"before": before, "limit": limit})]
                jobs = events = 0
                for event_id in ids:
                    jobs += conn.execute(f"DELETE FROM jobs WHERE {JOB_EVENT} = ? AND state = 'done'",
                                         (event_id,)).rowcount
                    events += conn.execute("DELETE FROM events WHERE id = ?", (event_id,)).rowcount
            return events, jobs

        return await self.run(_prune)

    async def prune_done_jobs(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` done jobs last updated before ``before``. Returns how many."""
        def _prune(db: sqlite_utils.Database) -> int:
            with transaction(db) as conn:
                return conn.execute(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state = 'done'"
                    " AND updated_at < ? ORDER BY id LIMIT ?)", (before, limit)).rowcount

        return await self.run(_prune)

    async def record_cleanup_run(self, trigger: str, started_at: float, finished_at: float, ok: bool,
                                 report: dict[str, Any], keep: int = 100) -> None:
        """Log a finished cleanup run (``report`` as JSON); keep the last ``keep`` runs."""
        def _record(db: sqlite_utils.Database) -> None:
            with transaction(db) as conn:
                conn.execute("INSERT INTO cleanup_runs (trigger, started_at, finished_at, ok, report)"
                             " VALUES (?, ?, ?, ?, ?)", (trigger, started_at, finished_at, int(ok),
                                                         json.dumps(report)))
                conn.execute("DELETE FROM cleanup_runs WHERE id <= (SELECT MAX(id) FROM cleanup_runs) - ?",
                             (keep,))

        await self.run(_record)

    async def cleanup_runs(self, limit: int = 10) -> list[CleanupRunRow]:
        """The last ``limit`` cleanup runs, newest first (``report`` decoded)."""
        def _runs(db: sqlite_utils.Database) -> list[CleanupRunRow]:
            rows = list(db["cleanup_runs"].rows_where(order_by="id DESC", limit=limit))
            for r in rows:
                r["report"] = json.loads(r["report"]) if r["report"] else None
            return cast(list[CleanupRunRow], rows)

        return await self.read(_runs)

    async def stats(self) -> CatalogStats:
        """Everything ``/metrics`` reads from the catalog, in one trip to the scan thread (it counts
        every job and media row: see :meth:`scan`)."""
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

        return await self.scan(_stats)
