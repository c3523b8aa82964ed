"""The SQLite catalog's ``media``: one row per stored object, written after the object."""

from __future__ import annotations

from typing import Any, cast

import sqlite_utils

from gateway.catalog.rows import MEDIA_SOURCE_TAKEN, MediaRow, StatsGroup, media_insert
from gateway.catalog.sqlite.connection import (
    SQLiteConnection,
    fetch_dicts,
    to_sql,
    transaction,
)


class MediaMixin(SQLiteConnection):
    """:class:`gateway.catalog.CatalogContract`'s media methods on SQLite."""

    async def media_by_source(self, source_key: str) -> MediaRow | None:
        """The media row stored for ``source_key`` (see :class:`gateway.sdk.provider.MediaRef`); rows a
        cleanup is deleting or found missing do not count (the attachment is fetched again)."""
        return await self.read(lambda db: next(db["media"].rows_where(
            "source_key = ? AND state = 'stored'", [source_key]), None))

    async def get_media(self, media_id: str) -> MediaRow | None:
        """The media row, or None."""
        return await self.read(lambda db: next(db["media"].rows_where("id = ?", [media_id]), None))

    async def insert_media(self, record: MediaRow) -> tuple[MediaRow, bool]:
        """Insert a media row written after its object. If its ``source_key`` is taken (a concurrent
        ingest stored the same attachment), returns ``(existing row, False)``; else ``(record, True)``."""
        sql, args = media_insert(record, "?", MEDIA_SOURCE_TAKEN)

        def _insert(db: sqlite_utils.Database) -> tuple[MediaRow, bool]:
            with transaction(db) as conn:
                if conn.execute(sql, args).rowcount:
                    return record, True
            existing = next(db["media"].rows_where("source_key = ? AND state = 'stored'",
                                                   [record["source_key"]]))
            return cast(MediaRow, existing), False

        return await self.write(_insert)  # shares a group commit with the writes waiting

    async def update_media(self, media_id: str, values: dict[str, Any]) -> bool:
        """Set columns of a media row; ``True`` if the row exists."""
        def _update(db: sqlite_utils.Database) -> bool:
            cols = ", ".join(f"{c} = ?" for c in values)
            with transaction(db) as conn:
                cur = conn.execute(f"UPDATE media SET {cols} WHERE id = ?",
                                   [*(to_sql(v) for v in values.values()), media_id])
                return cur.rowcount > 0

        return await self.write(_update)

    async def list_media(self, where: list[str], args: list[Any], sort: str, descending: bool,
                         after: tuple[Any, str] | None, limit: int) -> list[MediaRow]:
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

        def _list(db: sqlite_utils.Database) -> list[MediaRow]:
            return cast(list[MediaRow], fetch_dicts(db.conn.execute(sql, params)))

        return await self.read(_list)

    async def media_stats(self, tenant: str | None) -> dict[str, list[StatsGroup]]:
        """``{"category"|"provider"|"backend": [(value, count, bytes)]}`` over stored media, of one
        tenant when ``tenant`` is given."""
        where, args = "state != 'deleting'", []
        if tenant is not None:
            where += " AND tenant = ?"
            args.append(tenant)

        def _stats(db: sqlite_utils.Database) -> dict[str, list[StatsGroup]]:
            return {col: [tuple(r) for r in db.conn.execute(
                f"SELECT COALESCE({col}, ''), COUNT(*), COALESCE(SUM(size), 0) FROM media WHERE {where}"
                f" GROUP BY 1 ORDER BY 1", args)] for col in ("category", "provider", "backend")}

        return await self.scan(_stats)  # every media row: on the scan thread

    async def claim_media_for_delete(self, media_id: str, now: float) -> MediaRow | None:
        """Mark a visible media row ``deleting`` (so neither ingest nor a cleanup uses it meanwhile)
        and return it; None if there is no such row or another deletion has it."""
        def _claim(db: sqlite_utils.Database) -> MediaRow | None:
            with transaction(db) as conn:
                cur = conn.execute(
                    "UPDATE media SET state = 'deleting', state_at = ?, state_reason = 'api'"
                    " WHERE id = ? AND state != 'deleting'", (now, media_id))
                if not cur.rowcount:
                    return None
            return cast(MediaRow | None, next(db["media"].rows_where("id = ?", [media_id]), None))

        return await self.run(_claim)

    async def media_totals(self) -> list[tuple[str, str, str, int, int]]:
        """``(backend, provider, category, count, bytes)`` for every stored group (every media
        row: on the scan thread)."""
        return await self.scan(lambda db: list(db.conn.execute(
            "SELECT backend, COALESCE(provider, ''), category, COUNT(*), COALESCE(SUM(size), 0)"
            " FROM media GROUP BY 1, 2, 3")))
