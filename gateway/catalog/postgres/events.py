"""The PostgreSQL catalog's ``events``: webhook events committed with their ingest jobs. The unique
index on ``idempotency_key`` keeps a key once across every replica (``ON CONFLICT DO NOTHING``)."""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from gateway.catalog.postgres.connection import PostgresConnection, pg_condition
from gateway.catalog.postgres.jobs import insert_claimed_job, insert_job
from gateway.catalog.rows import ClaimedJob, EventRow, ReadyEvent, event_row, new_event_id
from gateway.sdk.provider import WebhookEvent


class EventsMixin(PostgresConnection):
    """:class:`gateway.catalog.CatalogContract`'s events methods on PostgreSQL."""

    async def record_webhook(self, provider: str, raw: bytes, events: list[WebhookEvent],
                             now: float | None = None, *, event_ids: Sequence[str] | None = None,
                             ready: Mapping[int, ReadyEvent] | None = None,
                             claim: Collection[str] = ()) -> tuple[list[str], list[str], list[ClaimedJob]]:
        """Commit each event with its ``ingest`` job in one transaction. Returns ``(accepted event
        ids, idempotency keys already seen, claimed jobs)``; a duplicate gets no row and no job.
        ``event_ids``, ``ready`` and ``claim`` (jobs claimed under this replica's lease): see
        :meth:`gateway.catalog.CatalogContract.record_webhook`."""
        now = now if now is not None else time.time()
        ids = list(event_ids) if event_ids is not None else [new_event_id() for _ in events]
        done = ready or {}
        accepted: list[str] = []
        duplicates: list[str] = []
        claimed: list[ClaimedJob] = []
        async with self.transaction() as conn:

            async def add(kind: str, key: str, payload: dict[str, Any], deadline: float | None = None) -> None:
                if kind not in claim:
                    await insert_job(conn, kind, key, payload, now, deadline=deadline)
                elif (row := await insert_claimed_job(conn, kind, key, payload, now, self.owner,
                                                      now + self.lease, deadline)) is not None:
                    claimed.append(row)

            for i, (ev, event_id) in enumerate(zip(events, ids, strict=True)):
                handled = done.get(i)
                cur = await conn.execute(
                    "INSERT INTO events (id, provider, idempotency_key, event, account, chat,"
                    " message_id, received_at, raw, payload, media, state, forward)"
                    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                    " ON CONFLICT (idempotency_key) DO NOTHING",
                    (event_id, provider, ev.idempotency_key, ev.event, ev.account, ev.chat,
                     ev.message_id, now, raw, json.dumps(ev.payload),
                     json.dumps([m.to_dict() for m in ev.media]),
                     "queued" if handled is None else "ingested",
                     None if handled is None else json.dumps(handled.forward)))
                if cur.rowcount == 0:
                    duplicates.append(ev.idempotency_key)
                    continue
                if handled is None:
                    await add("ingest", f"ingest:{event_id}", {"event_id": event_id},
                              deadline=now + self.media_lifetime(provider))
                else:
                    for kind, key, payload in handled.followups:
                        await add(kind, key, payload)
                accepted.append(event_id)
        return accepted, duplicates, claimed

    async def events_per_minute(self, since: float) -> list[tuple[int, int]]:
        """Webhook events received since ``since`` (epoch seconds), by minute: ``(minute start in
        epoch seconds, count)`` in time order; uses the ``received_at`` index."""
        rows = await self.fetch(
            "SELECT (floor(received_at / 60) * 60)::bigint AS minute, COUNT(*) AS n FROM events"
            " WHERE received_at >= %s GROUP BY 1 ORDER BY 1", (since,))
        return [(int(r["minute"]), int(r["n"])) for r in rows]

    async def get_event(self, event_id: str) -> EventRow | None:
        """The event row (``payload``/``media``/``forward``/``notes`` decoded), or None."""
        rows = await self.fetch("SELECT * FROM events WHERE id = %s", (event_id,))
        return event_row(rows[0]) if rows else None

    async def count(self, table: str, where: str | None = None, args: list[Any] | None = None) -> int:
        """Rows in ``table`` (``events``, ``jobs`` or ``media``) matching ``where``."""
        if table not in ("events", "jobs", "media"):
            raise ValueError(table)
        rows = await self.fetch(f"SELECT COUNT(*) AS n FROM {table} WHERE {pg_condition(where or '1=1')}",
                                args or [])
        return int(rows[0]["n"])
