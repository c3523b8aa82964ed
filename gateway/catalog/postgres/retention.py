"""The PostgreSQL catalog's retention queries (:mod:`gateway.retention` runs them): expired media,
unfinished deletions, the storage listing for reconciliation, pruning, the ``cleanup_runs`` log, and
the scrape-time statistics. The same rules as :mod:`gateway.catalog.sqlite.retention`, in
PostgreSQL's dialect."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

from gateway.catalog.contract import CatalogStats, ExpiryRule
from gateway.catalog.postgres.connection import PostgresConnection
from gateway.catalog.postgres.migrations import JOB_EVENT
from gateway.catalog.rows import CleanupRunRow, DoomedMedia, ExpiredMedia, ListedObject, UnlistedMedia


class RetentionMixin(PostgresConnection):
    """:class:`gateway.catalog.CatalogContract`'s retention queries on PostgreSQL."""

    # *Needed* objects (see the contract): media of an event that a queued or running job works on.
    _NEEDED = f"""
        active AS MATERIALIZED (SELECT DISTINCT {JOB_EVENT} AS event_id FROM jobs
                   WHERE state IN ('queued', 'running') AND {JOB_EVENT} IS NOT NULL),
        needed AS MATERIALIZED (SELECT DISTINCT r.value ->> 'source_key' AS source_key
                   FROM events e JOIN active a ON e.id = a.event_id,
                        jsonb_array_elements(COALESCE(e.media, '[]')::jsonb) AS r(value))"""

    @classmethod
    def _expired_sql(cls, rule: ExpiryRule, after: str) -> tuple[str, dict[str, Any]]:
        """The ``expired`` CTE (id, key, bucket, size, category, provider, reason, in_use) and its
        parameters."""
        params: dict[str, Any] = {
            "backend": rule.backend, "now": float(rule.now), "before": float(rule.before), "after": after,
            "default_age": float(rule.default_age), "keep_public": bool(rule.keep_public),
        }

        def case(column: str, ages: Mapping[str, float], prefix: str) -> str:
            if not ages:
                return "NULL::float8"
            whens = []
            for i, (name, age) in enumerate(sorted(ages.items())):
                params[f"{prefix}n{i}"], params[f"{prefix}a{i}"] = name, float(age)
                whens.append(f"WHEN %({prefix}n{i})s THEN %({prefix}a{i})s::float8")
            return f"CASE m.{column} {' '.join(whens)} END"

        sql = f"""WITH {cls._NEEDED},
            aged AS (
                SELECT m.id, m.key, m.bucket, m.size, m.category, m.provider, m.source_key, m.event_id,
                       m.created_at, m.expires_at, m.is_public,
                       {case("provider", rule.provider_ages, "p")} AS p_age,
                       {case("category", rule.category_ages, "c")} AS c_age
                FROM media m
                WHERE m.backend = %(backend)s AND m.state IN ('stored', 'missing')
                  AND m.created_at < %(before)s AND m.id > %(after)s),
            expired AS (
                SELECT id, key, bucket, size, category, provider,
                       CASE WHEN expires_at IS NOT NULL AND expires_at <= %(now)s THEN 'expires_at'
                            ELSE 'age' END AS reason,
                       (COALESCE(source_key IN (SELECT source_key FROM needed), FALSE)
                        OR COALESCE(event_id IN (SELECT event_id FROM active), FALSE)) AS in_use
                FROM aged
                WHERE (expires_at IS NOT NULL AND expires_at <= %(now)s)
                   OR (NOT (%(keep_public)s AND is_public = 1)
                       AND created_at < %(now)s - CASE WHEN p_age IS NULL AND c_age IS NULL
                                                       THEN %(default_age)s::float8
                                                       ELSE GREATEST(COALESCE(p_age, 0), COALESCE(c_age, 0)) END))
            """
        return sql, params

    async def count_expired_media(self, rule: ExpiryRule) -> tuple[int, int, int]:
        """``(expired rows, of which needed, bytes of the others)`` under ``rule``."""
        sql, params = self._expired_sql(rule, "")
        sql += ("SELECT COUNT(*) AS n, COALESCE(SUM(in_use::int), 0) AS u,"
                " COALESCE(SUM(CASE WHEN in_use THEN 0 ELSE size END), 0)::bigint AS b FROM expired")
        row = (await self.fetch(sql, params))[0]
        return int(row["n"]), int(row["u"]), int(row["b"])

    async def expired_media(self, rule: ExpiryRule, after: str, limit: int, claim: bool
                            ) -> list[ExpiredMedia]:
        """Up to ``limit`` expired rows with ``id > after``, by id; with ``claim`` the rows not in
        use move to ``deleting`` in the same transaction."""
        sql, params = self._expired_sql(rule, after)
        sql += "SELECT * FROM expired ORDER BY id LIMIT %(limit)s"
        params["limit"] = limit
        async with self.transaction() as conn:
            rows = cast(list[ExpiredMedia], await (await conn.execute(sql.encode(), params)).fetchall())
            if claim:
                doomed = [r for r in rows if not r["in_use"]]
                if doomed:
                    await conn.execute(
                        "UPDATE media m SET state = 'deleting', state_at = %s, state_reason = d.reason"
                        " FROM unnest(%s::text[], %s::text[]) AS d(id, reason)"
                        " WHERE m.id = d.id AND m.state IN ('stored', 'missing')",
                        (rule.now, [r["id"] for r in doomed], [r["reason"] for r in doomed]))
        return rows

    async def media_being_deleted(self, backend: str, after: str, limit: int) -> list[DoomedMedia]:
        """Rows of ``backend`` in state ``deleting``, ``id > after``, by id."""
        return cast(list[DoomedMedia], await self.fetch(
            "SELECT id, key, bucket, size, category, provider, COALESCE(state_reason, 'age') AS reason"
            " FROM media WHERE state = 'deleting' AND backend = %s AND id > %s ORDER BY id LIMIT %s",
            (backend, after, limit)))

    async def forget_media(self, ids: list[str]) -> int:
        """Delete the rows ``ids`` that are ``deleting``. Returns how many."""
        if not ids:
            return 0
        return await self.execute("DELETE FROM media WHERE id = ANY(%s) AND state = 'deleting'", (ids,))

    async def begin_listing(self) -> None:
        """Start an empty listing: this catalog's rows of ``cleanup_listing`` (keyed by its own id)."""
        await self.end_listing()

    async def add_listing(self, objects: list[ListedObject]) -> None:
        """Add listed objects ``(bucket or "", key, size in bytes, modified epoch seconds)``."""
        if not objects:
            return
        async with self.transaction() as conn:
            await conn.execute(
                "INSERT INTO cleanup_listing (listing, bucket, key, size, modified)"
                " SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::float8[])"
                " ON CONFLICT (listing, bucket, key) DO UPDATE SET size = EXCLUDED.size, modified = EXCLUDED.modified",
                (self._listing, [o[0] for o in objects], [o[1] for o in objects], [o[2] for o in objects],
                 [o[3] for o in objects]))

    async def end_listing(self) -> None:
        """Drop this catalog's listing."""
        await self.execute("DELETE FROM cleanup_listing WHERE listing = %s", (self._listing,))

    async def listed_without_row(self, backend: str, after: tuple[str, str], limit: int
                                 ) -> list[ListedObject]:
        """Listed objects that no media row of ``backend`` points at, by ``(bucket, key)`` after ``after``."""
        rows = await self.fetch(
            "SELECT s.bucket, s.key, s.size, s.modified FROM cleanup_listing s"
            " WHERE s.listing = %s AND (s.bucket, s.key) > (%s, %s) AND NOT EXISTS (SELECT 1 FROM media m"
            "  WHERE m.key = s.key AND m.backend = %s AND (m.bucket IS NULL OR m.bucket = s.bucket OR s.bucket = ''))"
            " ORDER BY s.bucket, s.key LIMIT %s", (self._listing, *after, backend, limit))
        return [(r["bucket"], r["key"], r["size"], r["modified"]) for r in rows]

    async def rows_not_listed(self, backend: str, created_before: float, after: str, limit: int
                              ) -> list[UnlistedMedia]:
        """Stored rows of ``backend`` created before ``created_before`` whose object is not listed."""
        return cast(list[UnlistedMedia], await self.fetch(
            "SELECT id, key, bucket, size, provider, event_id FROM media m"
            " WHERE m.backend = %s AND m.state = 'stored' AND m.created_at < %s AND m.id > %s"
            " AND NOT EXISTS (SELECT 1 FROM cleanup_listing s WHERE s.listing = %s"
            "  AND s.key = m.key AND (m.bucket IS NULL OR s.bucket = m.bucket))"
            " ORDER BY id LIMIT %s", (backend, created_before, after, self._listing, limit)))

    async def media_keys_present(self, backend: str, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of ``keys`` (``(bucket or "", key)``) a media row of ``backend`` points at now."""
        if not keys:
            return set()
        rows = await self.fetch(
            "SELECT t.b, t.k FROM unnest(%s::text[], %s::text[]) AS t(b, k) WHERE EXISTS (SELECT 1 FROM media m"
            " WHERE m.key = t.k AND m.backend = %s AND (m.bucket IS NULL OR m.bucket = t.b OR t.b = ''))",
            ([b for b, _ in keys], [k for _, k in keys], backend))
        return {(r["b"], r["k"]) for r in rows}

    async def mark_missing(self, ids: list[str], now: float) -> int:
        """Move stored rows ``ids`` to ``missing``. Returns how many."""
        if not ids:
            return 0
        return await self.execute("UPDATE media SET state = 'missing', state_at = %s,"
                                  " state_reason = 'not in storage' WHERE id = ANY(%s) AND state = 'stored'",
                                  (now, ids))

    _PRUNABLE_EVENTS = f"""SELECT e.id FROM events e
        WHERE e.received_at < %(before)s AND e.state != 'queued'
          AND NOT EXISTS (SELECT 1 FROM jobs j WHERE {JOB_EVENT} = e.id AND j.state != 'done')"""

    async def count_prunable(self, events_before: float | None, jobs_before: float | None) -> tuple[int, int]:
        """``(events, jobs)`` that :meth:`prune_events` then :meth:`prune_done_jobs` would delete."""
        never = float("-inf")
        row = (await self.fetch(
            f"WITH p AS ({self._PRUNABLE_EVENTS}) SELECT (SELECT COUNT(*) FROM p) AS e,"
            f" (SELECT COUNT(*) FROM jobs WHERE state = 'done'"
            f"  AND (updated_at < %(jobs_before)s OR {JOB_EVENT} IN (SELECT id FROM p))) AS j",
            {"before": never if events_before is None else events_before,
             "jobs_before": never if jobs_before is None else jobs_before}))[0]
        return int(row["e"]), int(row["j"])

    async def prune_events(self, before: float, limit: int) -> tuple[int, int]:
        """Delete up to ``limit`` finished events received before ``before`` with their done jobs."""
        async with self.transaction() as conn:
            ids = [r["id"] for r in await (await conn.execute(
                (self._PRUNABLE_EVENTS + " ORDER BY e.received_at LIMIT %(limit)s FOR UPDATE OF e SKIP LOCKED").encode(),
                {"before": before, "limit": limit})).fetchall()]
            if not ids:
                return 0, 0
            jobs = (await conn.execute(f"DELETE FROM jobs WHERE {JOB_EVENT} = ANY(%s) AND state = 'done'".encode(),
                                       (ids,))).rowcount
            events = (await conn.execute("DELETE FROM events WHERE id = ANY(%s)", (ids,))).rowcount
        return events, jobs

    async def prune_done_jobs(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` done jobs last updated before ``before``. Returns how many."""
        return await self.execute("DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state = 'done'"
                                  " AND updated_at < %s ORDER BY id LIMIT %s)", (before, limit))

    async def record_cleanup_run(self, trigger: str, started_at: float, finished_at: float, ok: bool,
                                 report: dict[str, Any], keep: int = 100) -> None:
        """Log a finished cleanup run (``report`` as JSON); keep the last ``keep`` runs."""
        async with self.transaction() as conn:
            await conn.execute("INSERT INTO cleanup_runs (trigger, started_at, finished_at, ok, report)"
                               " VALUES (%s, %s, %s, %s, %s)",
                               (trigger, started_at, finished_at, int(ok), json.dumps(report)))
            await conn.execute("DELETE FROM cleanup_runs WHERE id <= (SELECT MAX(id) FROM cleanup_runs) - %s",
                               (keep,))

    async def cleanup_runs(self, limit: int = 10) -> list[CleanupRunRow]:
        """The last ``limit`` cleanup runs, newest first (``report`` decoded)."""
        rows = await self.fetch("SELECT * FROM cleanup_runs ORDER BY id DESC LIMIT %s", (limit,))
        for r in rows:
            r["report"] = json.loads(r["report"]) if r["report"] else None
        return cast(list[CleanupRunRow], rows)

    async def stats(self) -> CatalogStats:
        """Everything ``/metrics`` reads from the catalog, in one transaction."""
        async with self.transaction() as conn:
            jobs = {(r["kind"], r["state"]): int(r["n"]) for r in await (await conn.execute(
                "SELECT kind, state, COUNT(*) AS n FROM jobs GROUP BY kind, state")).fetchall()}
            oldest = {r["kind"]: r["t"] for r in await (await conn.execute(
                "SELECT kind, MIN(created_at) AS t FROM jobs WHERE state = 'queued' GROUP BY kind")).fetchall()}
            media = [(r["backend"], r["category"], r["state"], int(r["n"]), int(r["b"]))
                     for r in await (await conn.execute(
                         "SELECT backend, category, state, COUNT(*) AS n, COALESCE(SUM(size), 0)::bigint AS b"
                         " FROM media GROUP BY backend, category, state")).fetchall()]
            last = await (await conn.execute(
                "SELECT MAX(finished_at) AS t FROM cleanup_runs WHERE ok = 1")).fetchone()
        return CatalogStats(jobs, oldest, media, last["t"] if last else None)
