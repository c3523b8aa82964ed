"""The SQLite catalog's ``events``: webhook events committed with their ingest jobs."""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import sqlite_utils

from gateway.catalog.rows import ClaimedJob, EventRow, ReadyEvent, event_row, new_event_id
from gateway.catalog.sqlite.connection import SQLiteConnection, fetch_dicts, transaction
from gateway.catalog.sqlite.jobs import insert_claimed_job, insert_job
from gateway.sdk.provider import WebhookEvent


class EventsMixin(SQLiteConnection):
    """:class:`gateway.catalog.CatalogContract`'s events methods on SQLite."""

    async def record_webhook(self, provider: str, raw: bytes, events: list[WebhookEvent],
                             now: float | None = None, *, event_ids: Sequence[str] | None = None,
                             ready: Mapping[int, ReadyEvent] | None = None,
                             claim: Collection[str] = ()) -> tuple[list[str], list[str], list[ClaimedJob]]:
        """Commit each event with its ``ingest`` job in one transaction, grouped with the other
        webhooks waiting for the catalog (:meth:`SQLiteConnection.write`): returns once it is durable.

        Returns ``(accepted event ids, idempotency keys already seen, claimed jobs)``. An event
        whose idempotency key exists is a duplicate: no row, no job. ``event_ids``, ``ready`` and
        ``claim``: see :meth:`gateway.catalog.CatalogContract.record_webhook`.
        """
        now = now if now is not None else time.time()
        ids = list(event_ids) if event_ids is not None else [new_event_id() for _ in events]
        done = ready or {}

        def _record(db: sqlite_utils.Database) -> tuple[list[str], list[str], list[ClaimedJob]]:
            accepted: list[str] = []
            duplicates: list[str] = []
            claimed: list[ClaimedJob] = []

            def add(kind: str, key: str, payload: dict[str, Any], deadline: float | None = None) -> None:
                if kind not in claim:
                    insert_job(conn, kind, key, payload, now, deadline=deadline)
                elif (row := insert_claimed_job(conn, kind, key, payload, now, deadline=deadline)) is not None:
                    claimed.append(row)

            with transaction(db) as conn:
                for i, (ev, event_id) in enumerate(zip(events, ids, strict=True)):
                    handled = done.get(i)
                    cur = conn.execute(
                        "INSERT INTO events (id, provider, idempotency_key, event, account, chat,"
                        " message_id, received_at, raw, payload, media, state, forward)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
                        " ON CONFLICT(idempotency_key) DO NOTHING",
                        (event_id, provider, ev.idempotency_key, ev.event, ev.account, ev.chat,
                         ev.message_id, now, raw, json.dumps(ev.payload),
                         json.dumps([m.to_dict() for m in ev.media]),
                         "queued" if handled is None else "ingested",
                         None if handled is None else json.dumps(handled.forward)),
                    )
                    if cur.rowcount == 0:
                        duplicates.append(ev.idempotency_key)
                        continue
                    if handled is None:
                        add("ingest", f"ingest:{event_id}", {"event_id": event_id},
                            deadline=now + self.media_lifetime(provider))
                    else:
                        for kind, key, payload in handled.followups:
                            add(kind, key, payload)
                    accepted.append(event_id)
            return accepted, duplicates, claimed

        return await self.write(_record)

    async def events_per_minute(self, since: float) -> list[tuple[int, int]]:
        """Webhook events received since ``since``, by minute (see the contract); uses the
        ``received_at`` index."""
        def _count(db: sqlite_utils.Database) -> list[tuple[int, int]]:
            return [(int(m), int(n)) for m, n in db.conn.execute(
                "SELECT CAST(received_at / 60 AS INTEGER) * 60, COUNT(*) FROM events"
                " WHERE received_at >= ? GROUP BY 1 ORDER BY 1", [since])]

        return await self.read(_count)

    async def get_event(self, event_id: str) -> EventRow | None:
        """The event row as a dict (``payload``/``media``/``forward``/``notes`` decoded), or None."""
        def _get(db: sqlite_utils.Database) -> EventRow | None:
            rows = fetch_dicts(db.conn.execute("SELECT * FROM events WHERE id = ?", (event_id,)))
            if not rows:
                return None
            return event_row(rows[0])

        return await self.read(_get)

    async def count(self, table: str, where: str | None = None, args: list[Any] | None = None) -> int:
        """Rows in ``table`` (``events``, ``jobs`` or ``media``) matching ``where``."""
        if table not in ("events", "jobs", "media"):
            raise ValueError(table)
        return await self.read(lambda db: db[table].count_where(where or "1=1", args or []))
