"""The PostgreSQL catalog's ``media``: one row per stored object, written after the object."""

from __future__ import annotations

from typing import Any, cast

from gateway.catalog.postgres.connection import PostgresConnection, pg_condition
from gateway.catalog.rows import MEDIA_SOURCE_TAKEN, to_column, MediaRow, StatsGroup, media_insert

_STORED_BY_SOURCE = "SELECT * FROM media WHERE source_key = %s AND state = 'stored'"


class MediaMixin(PostgresConnection):
    """:class:`gateway.catalog.CatalogContract`'s media methods on PostgreSQL."""

    async def media_by_source(self, source_key: str) -> MediaRow | None:
        """The ``stored`` media row for ``source_key``, or None."""
        rows = await self.fetch(_STORED_BY_SOURCE, (source_key,))
        return cast(MediaRow, rows[0]) if rows else None

    async def get_media(self, media_id: str) -> MediaRow | None:
        """The media row, or None."""
        rows = await self.fetch("SELECT * FROM media WHERE id = %s", (media_id,))
        return cast(MediaRow, rows[0]) if rows else None

    async def insert_media(self, record: MediaRow) -> tuple[MediaRow, bool]:
        """Insert a media row; ``(the stored row with its source_key, False)`` if one exists."""
        sql, args = media_insert(record, "%s", MEDIA_SOURCE_TAKEN)
        async with self.transaction() as conn:
            cur = await conn.execute(sql.encode(), args)
            if cur.rowcount:
                return record, True
            existing = await (await conn.execute(_STORED_BY_SOURCE, (record["source_key"],))).fetchone()
        return cast(MediaRow, existing), False

    async def update_media(self, media_id: str, values: dict[str, Any]) -> bool:
        """Set columns of a media row; ``True`` if the row exists."""
        cols = ", ".join(f"{c} = %s" for c in values)
        return await self.execute(f"UPDATE media SET {cols} WHERE id = %s",
                                  [*(to_column(v) for v in values.values()), media_id]) > 0

    async def list_media(self, where: list[str], args: list[Any], sort: str, descending: bool,
                         after: tuple[Any, str] | None, limit: int) -> list[MediaRow]:
        """Media rows matching ``where`` in ``sort`` order then ``id``, after the keyset ``after``."""
        if sort not in ("created_at", "size"):
            raise ValueError(sort)
        conds, params = [pg_condition(c) for c in where], list(args)
        if after is not None:
            conds.append(f"({sort}, id) {'<' if descending else '>'} (%s, %s)")
            params.extend(after)
        direction = "DESC" if descending else "ASC"
        params.append(limit)
        rows = await self.fetch(f"SELECT * FROM media WHERE {' AND '.join(conds) or 'TRUE'}"
                                f" ORDER BY {sort} {direction}, id {direction} LIMIT %s", params)
        return cast(list[MediaRow], rows)

    async def media_stats(self, tenant: str | None) -> dict[str, list[StatsGroup]]:
        """``{"category"|"provider"|"backend": [(value, count, bytes)]}`` over media not being deleted."""
        out: dict[str, list[StatsGroup]] = {}
        for col in ("category", "provider", "backend"):
            rows = await self.fetch(
                f"SELECT COALESCE({col}, '') AS v, COUNT(*) AS n, COALESCE(SUM(size), 0)::bigint AS b FROM media"
                f" WHERE state != 'deleting' AND (%(t)s::text IS NULL OR tenant = %(t)s) GROUP BY 1 ORDER BY 1",
                {"t": tenant})
            out[col] = [(r["v"], int(r["n"]), int(r["b"])) for r in rows]
        return out

    async def claim_media_for_delete(self, media_id: str, now: float) -> MediaRow | None:
        """Mark a media row ``deleting`` (reason ``api``) and return it; None if absent or taken."""
        rows = await self.fetch("UPDATE media SET state = 'deleting', state_at = %s, state_reason = 'api'"
                                " WHERE id = %s AND state != 'deleting' RETURNING *", (now, media_id))
        return cast(MediaRow, rows[0]) if rows else None

    async def media_totals(self) -> list[tuple[str, str, str, int, int]]:
        """``(backend, provider, category, count, bytes)`` for every group."""
        rows = await self.fetch("SELECT backend, COALESCE(provider, '') AS p, category, COUNT(*) AS n,"
                                " COALESCE(SUM(size), 0)::bigint AS b FROM media GROUP BY 1, 2, 3")
        return [(r["backend"], r["p"], r["category"], int(r["n"]), int(r["b"])) for r in rows]
