"""The PostgreSQL catalog's connection pool (psycopg 3, ``psycopg_pool.AsyncConnectionPool``):
opening (migrations under an advisory lock), one transaction per contract call, the cleanup's
advisory lock, and ``LISTEN``/``NOTIFY`` for notices that cross replicas.

Several replicas share one database: there is no one-daemon lock (:meth:`PostgresConnection.lock`
does nothing); running jobs carry a lease instead (:mod:`.jobs`). Every replica has an ``owner`` id
(host, PID and a random part) that it writes into the jobs it claims.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.catalog.contract import CatalogError
from gateway.catalog.postgres.migrations import MIGRATIONS, SCHEMA_VERSION
from gateway.catalog.contract import CatalogTuning

log = logging.getLogger("gateway.catalog.postgres")

Conn = psycopg.AsyncConnection[dict[str, Any]]

_MIGRATE_LOCK = zlib.crc32(b"gateway:migrate")
_CLEANUP_LOCK = zlib.crc32(b"gateway:cleanup")


def pg_condition(condition: str) -> str:
    """A host-built SQL condition (``?`` placeholders, SQLite's ``instr``) in psycopg's dialect."""
    return condition.replace("%", "%%").replace("?", "%s").replace("instr(", "strpos(")


def default_owner() -> str:
    """This process's replica id: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class PostgresConnection(CatalogTuning):
    """The pool on ``url`` (``postgresql://user@host:port/dbname``) and the plumbing the concern
    modules (events, jobs, media, retention) build on; :class:`gateway.catalog.postgres.PostgresCatalog`
    puts them together.

    ``lease``: seconds a claimed job stays this replica's without a renewal; ``owner``: this
    replica's id (default :func:`default_owner`); ``pool_size``: most connections held;
    ``read_only``: see :attr:`gateway.catalog.CatalogContract.read_only` (its sessions run with
    ``default_transaction_read_only``).
    """

    def __init__(self, url: str, *, lease: float = 30.0, owner: str | None = None, pool_size: int = 10,
                 read_only: bool = False):
        self.url = url
        self.read_only = read_only
        self.lease = lease
        self.owner = owner or default_owner()
        self.pool_size = pool_size
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._listing = f"{self.owner}:{uuid.uuid4().hex}"

    kind = "postgresql"

    @property
    def replica(self) -> str | None:
        """This replica's id: the ``owner`` written into the jobs it leases."""
        return self.owner

    # -- lifecycle ------------------------------------------------------------------------
    def lock(self) -> None:
        """Nothing: replicas share a PostgreSQL catalog; their jobs carry leases instead."""

    async def open(self) -> None:
        """Open the pool and apply the migrations (one replica at a time: an advisory lock; a
        ``read_only`` catalog applies none).

        Raises :class:`CatalogError` if the database cannot be reached or its schema is newer
        than this gateway knows (read-only: not this gateway's)."""
        if self._pool is not None:
            return
        try:  # one direct connection first: an unreachable database fails at once, with its reason
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise CatalogError(f"cannot open catalog {self._safe_url}: {str(exc).strip()}") from exc
        async with conn:
            await (self._check_version(conn) if self.read_only else self._migrate(conn))
        kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
        if self.read_only:
            kwargs["options"] = "-c default_transaction_read_only=on"
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self.url, min_size=1, max_size=self.pool_size, open=False,
            kwargs=kwargs, connection_class=psycopg.AsyncConnection)
        try:
            await pool.open(wait=True, timeout=10)
        except PoolTimeout as exc:
            await pool.close()
            raise CatalogError(f"cannot open catalog {self._safe_url}: {exc}") from exc
        self._pool = pool

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Apply the missing migrations, one replica at a time (a transaction-scoped advisory lock)."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            await conn.execute("CREATE TABLE IF NOT EXISTS gateway_schema (version INTEGER NOT NULL)")
            row = await (await conn.execute("SELECT version FROM gateway_schema")).fetchone()
            version = int(row[0]) if row else 0
            if row is None:
                await conn.execute("INSERT INTO gateway_schema VALUES (0)")
            if version > SCHEMA_VERSION:
                raise CatalogError(f"catalog {self._safe_url} has schema version {version};"
                                   f" this gateway knows {SCHEMA_VERSION}")
            for number in range(version, SCHEMA_VERSION):
                await conn.execute(MIGRATIONS[number].encode())
                await conn.execute("UPDATE gateway_schema SET version = %s", (number + 1,))

    async def _check_version(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Raise :class:`CatalogError` unless the schema is this gateway's (a read-only catalog)."""
        try:
            row = await (await conn.execute("SELECT version FROM gateway_schema")).fetchone()
        except psycopg.errors.UndefinedTable:
            row = None
        version = int(row[0]) if row else 0
        if version != SCHEMA_VERSION:
            raise CatalogError(f"catalog {self._safe_url} has schema version {version}; this gateway knows "
                               f"{SCHEMA_VERSION} (only the daemon migrates it)")

    @property
    def _safe_url(self) -> str:
        """The URL without a password."""
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        return f"postgresql://{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"

    async def close(self) -> None:
        """Close the pool. Idempotent."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _require(self) -> AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise CatalogError("catalog is not open")
        return self._pool

    async def check(self) -> None:
        """Raise if the catalog cannot answer a query (for ``/readyz``)."""
        await self.fetch("SELECT 1")

    async def schema_version(self) -> int:
        """The version recorded in ``gateway_schema``."""
        return int((await self.fetch("SELECT version FROM gateway_schema"))[0]["version"])

    # -- plumbing -------------------------------------------------------------------------
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """A pooled connection inside one transaction (committed on exit, rolled back on error)."""
        async with self._require().connection() as conn, conn.transaction():
            yield conn

    async def fetch(self, query: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        """The rows of one query (its own transaction)."""
        async with self.transaction() as conn:
            cur = await conn.execute(query.encode(), params)
            return await cur.fetchall() if cur.description else []

    async def execute(self, query: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        """Run one statement (its own transaction); the number of rows it touched."""
        async with self.transaction() as conn:
            return (await conn.execute(query.encode(), params)).rowcount

    # -- the cleanup's lock ---------------------------------------------------------------
    @asynccontextmanager
    async def try_cleanup_lock(self) -> AsyncIterator[bool]:
        """The scheduled cleanup's cluster-wide lock, without waiting: yields ``True`` when this
        replica holds it for the block (a session advisory lock on one pooled connection, released
        at the end or when the connection dies), ``False`` when another replica runs a cleanup."""
        async with self._require().connection() as conn:
            row = await (await conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (_CLEANUP_LOCK,))).fetchone()
            held = bool(row and row["ok"])
            try:
                yield held
            finally:
                if held:
                    await conn.execute("SELECT pg_advisory_unlock(%s)", (_CLEANUP_LOCK,))

    # -- notices across replicas ----------------------------------------------------------
    async def publish(self, channel: str, payload: dict[str, Any]) -> None:
        """Send ``payload`` (JSON, under 8000 bytes) to every subscriber of ``channel`` in every
        replica (``pg_notify``)."""
        await self.execute("SELECT pg_notify(%s, %s)", (channel, json.dumps(payload)))

    async def _listen(self, channel: str) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        return conn

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Listen on ``channel`` for the block (``LISTEN`` on a connection of its own, outside the
        pool): yields an async iterator of the payloads any replica publishes from now on. A lost
        connection is opened again (notices sent meanwhile are lost: live notices, not a log)."""
        self._require()
        conn = await self._listen(channel)

        async def notices() -> AsyncIterator[dict[str, Any]]:
            nonlocal conn
            while True:
                try:
                    async for notice in conn.notifies():
                        yield json.loads(notice.payload)
                except psycopg.OperationalError as exc:
                    log.warning("lost the connection listening for %s: %s; reconnecting", channel, exc)
                    await conn.close()
                    while True:
                        try:
                            conn = await self._listen(channel)
                            break
                        except psycopg.OperationalError:
                            await asyncio.sleep(1.0)

        try:
            yield notices()
        finally:
            await conn.close()
