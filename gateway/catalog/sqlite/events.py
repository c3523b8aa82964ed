"""The SQLite catalog's ``events``: webhook events committed with their ingest jobs."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, cast

import sqlite_utils

from gateway.catalog.rows import EventRow
from gateway.catalog.sqlite.connection import SQLiteConnection, fetch_dicts, transaction
from gateway.catalog.sqlite.jobs import insert_job
from gateway.providers import WebhookEvent


class EventsMixin(SQLiteConnection):
    """:class:`gateway.catalog.CatalogContract`'s events methods on SQLite."""

    async def record_webhook(self, provider: str, raw: bytes, events: list[WebhookEvent],
                             now: float | None = None) -> tuple[list[str], list[str]]:
        """Commit each event with its ``ingest`` job in one transaction, grouped with the other
        webhooks waiting for the catalog (:meth:`SQLiteConnection.write`): returns once it is durable.

        Returns ``(accepted event ids, idempotency keys already seen)``. An event whose idempotency
        key exists is a duplicate: no row, no job.
        """
        now = now if now is not None else time.time()

        def _record(db: sqlite_utils.Database) -> tuple[list[str], list[str]]:
            accepted: list[str] = []
            duplicates: list[str] = []
            with transaction(db) as conn:
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
                    insert_job(conn, "ingest", f"ingest:{event_id}", {"event_id": event_id}, now,
                               deadline=now + self.media_lifetime(provider))
                    accepted.append(event_id)
            return accepted, duplicates

        return await self.write(_record)

    async def get_event(self, event_id: str) -> EventRow | None:
        """The event row as a dict (``payload``/``media``/``forward``/``notes`` decoded), or None."""
        def _get(db: sqlite_utils.Database) -> EventRow | None:
            rows = fetch_dicts(db.conn.execute("SELECT * FROM events WHERE id = ?", (event_id,)))
            if not rows:
                return None
            row = rows[0]
            for col in ("payload", "media", "forward", "notes"):
                if row.get(col) is not None:
                    row[col] = json.loads(row[col])
            return cast(EventRow, row)

        return await self.run(_get)

    async def count(self, table: str, where: str | None = None, args: list[Any] | None = None) -> int:
        """Rows in ``table`` (``events``, ``jobs`` or ``media``) matching ``where``."""
        if table not in ("events", "jobs", "media"):
            raise ValueError(table)
        return await self.run(lambda db: db[table].count_where(where or "1=1", args or []))
