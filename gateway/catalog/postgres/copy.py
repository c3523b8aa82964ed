"""Copying an SQLite catalog into a PostgreSQL one (``gateway migrate --to postgresql://...``): the
way from one daemon to several replicas. Every row of ``events``, ``jobs``, ``media`` and
``cleanup_runs`` is copied as is (ids kept, job ids continued after the largest), in batches, one
transaction per batch. The target must be empty; the source must not be in use (the command takes
its daemon lock). Jobs a crash left ``running`` arrive without a lease: the first replica that
starts queues them again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlite_utils
from psycopg import sql

from gateway.catalog.contract import CatalogError
from gateway.catalog.postgres import PostgresCatalog
from gateway.catalog.sqlite import SQLiteCatalog

TABLES = ("events", "jobs", "media", "cleanup_runs")
"""What is copied, in this order."""


async def copy_catalog(source: SQLiteCatalog, target: PostgresCatalog, batch: int = 1000,
                       progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Copy every row of :data:`TABLES` from the open ``source`` into the open, empty ``target``,
    ``batch`` rows per transaction; ``progress(table, rows so far)`` after each batch. Returns
    ``{table: rows copied}``.

    Raises :class:`CatalogError` if ``target`` holds rows already."""
    for table in TABLES:
        if (await target.fetch(f"SELECT EXISTS (SELECT 1 FROM {table}) AS e"))[0]["e"]:
            raise CatalogError(f"the target catalog is not empty (table {table} has rows); "
                               "copy into a new database")
    copied: dict[str, int] = {}
    for table in TABLES:
        columns = await source.run(lambda db, t=table: [c.name for c in db[t].columns])
        after: Any = "" if table in ("events", "media") else 0
        copied[table] = 0
        while True:
            rows = await source.run(_read, table, columns, after, batch)
            if not rows:
                break
            statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)),
                sql.SQL(", ").join(sql.Placeholder() * len(columns)))
            async with target.transaction() as conn, conn.cursor() as cur:
                await cur.executemany(statement, rows)
            copied[table] += len(rows)
            after = rows[-1][columns.index("id")]
            if progress is not None:
                progress(table, copied[table])
    async with target.transaction() as conn:
        for table in ("jobs", "cleanup_runs"):  # new ids continue after the copied ones
            await conn.execute(sql.SQL("SELECT setval(pg_get_serial_sequence({t}, 'id'),"
                                       " (SELECT COALESCE(MAX(id), 0) + 1 FROM {i}), false)").format(
                t=sql.Literal(table), i=sql.Identifier(table)))
    return copied


def _read(db: sqlite_utils.Database, table: str, columns: list[str], after: Any, limit: int) -> list[tuple[Any, ...]]:
    """Up to ``limit`` rows of ``table`` with ``id > after``, by id."""
    names = ", ".join(f'"{c}"' for c in columns)
    return [tuple(r) for r in db.conn.execute(
        f"SELECT {names} FROM {table} WHERE id > ? ORDER BY id LIMIT ?", (after, limit))]
