"""The catalog's rows as the host sees them (DESIGN §5-6): what :class:`gateway.catalog.CatalogContract`
methods take and return. Times are epoch seconds (floats; media times at whole microseconds, see
:func:`gateway.catalog.exact_time`), sizes bytes. JSON columns are decoded where a method says so.

Every implementation returns these keys; a ``NotRequired`` key may be absent (a row inserted
without it), a value typed ``X | None`` may be NULL.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict, cast


class EventRow(TypedDict):
    """One webhook event (table ``events``), as :meth:`~gateway.catalog.CatalogContract.get_event`
    returns it: ``payload``, ``media``, ``forward`` and ``notes`` decoded from JSON.

    ``idempotency_key`` is unique across providers; ``raw`` is the webhook body as received (bytes);
    ``media``: the event's :class:`gateway.sdk.provider.MediaRef` dicts; ``state``: ``queued`` until
    its ingest job ran, then what that job set (``stored``, ...).
    """

    id: str
    provider: str
    idempotency_key: str
    event: str
    account: str | None
    chat: str | None
    message_id: str | None
    received_at: float
    raw: bytes
    payload: Any
    media: list[dict[str, Any]] | None
    forward: Any
    state: str
    notes: Any


class JobRow(TypedDict):
    """One job of the durable queue (table ``jobs``), ``payload`` decoded.

    ``key`` is the job's idempotency key (unique); ``state`` one of
    :data:`gateway.catalog.JOB_STATES`; ``attempts`` counts claims (a crash's attempt too);
    ``run_at``: when it is due; ``last_error``: the last failure's message (at most 2000 characters).
    """

    id: int
    kind: str
    key: str
    payload: dict[str, Any]
    state: str
    attempts: int
    run_at: float
    created_at: float
    updated_at: float
    last_error: str | None
    deadline: NotRequired[float | None]


class ClaimedJob(TypedDict):
    """What :meth:`~gateway.catalog.CatalogContract.claim_job` hands a worker: the job, now
    ``running``, with the attempt counted."""

    id: int
    kind: str
    key: str
    payload: dict[str, Any]
    attempts: int
    created_at: float


class MediaRow(TypedDict):
    """One stored object (table ``media``). ``id`` is the media id (``m_`` + 27 hex digits);
    ``key`` the object key on ``backend`` (in ``bucket`` where the backend has buckets);
    ``source_key`` identifies the provider's attachment and is unique among ``stored`` rows, across
    providers; ``direction``: ``inbound``, ``outbound`` or ``upload``; ``is_public``: 0 or 1;
    ``extra``: JSON text. ``state``: ``stored``, ``deleting`` (a deletion claimed it) or
    ``missing`` (its object was not found in storage), changed at ``state_at`` for ``state_reason``.

    :meth:`~gateway.catalog.CatalogContract.insert_media` takes one without the columns that have
    defaults (``NotRequired``).
    """

    id: str
    sha256: str
    size: int
    mimetype: str
    category: str
    filename: str
    backend: str
    key: str
    created_at: float
    declared_mimetype: NotRequired[str | None]
    bucket: NotRequired[str | None]
    provider: NotRequired[str | None]
    account: NotRequired[str | None]
    chat: NotRequired[str | None]
    message_id: NotRequired[str | None]
    direction: NotRequired[str]
    source_key: NotRequired[str | None]
    source_url: NotRequired[str | None]
    event_id: NotRequired[str | None]
    expires_at: NotRequired[float | None]
    tenant: NotRequired[str | None]
    is_public: NotRequired[int]
    extra: NotRequired[Any]
    state: NotRequired[str]
    state_at: NotRequired[float | None]
    state_reason: NotRequired[str | None]


class DoomedMedia(TypedDict):
    """A media row a cleanup deletes (object first, then row): what
    :meth:`~gateway.catalog.CatalogContract.media_being_deleted` returns. ``reason``: ``age``,
    ``expires_at`` or ``api``."""

    id: str
    key: str
    bucket: str | None
    size: int
    category: str
    provider: str | None
    reason: str


class ExpiredMedia(DoomedMedia):
    """An expired media row (:meth:`~gateway.catalog.CatalogContract.expired_media`); ``in_use``:
    a queued or running job needs it, so it is kept (and never claimed)."""

    in_use: bool


class UnlistedMedia(TypedDict):
    """A stored row whose object the storage listing did not show
    (:meth:`~gateway.catalog.CatalogContract.rows_not_listed`)."""

    id: str
    key: str
    bucket: str | None
    size: int
    provider: str | None
    event_id: str | None


class CleanupRunRow(TypedDict):
    """A finished cleanup run (table ``cleanup_runs``): ``trigger`` (``schedule``, ``api``,
    ``cli``), real start and end times, ``ok`` (0 or 1), ``report``: the decoded
    :meth:`gateway.retention.CleanupReport.to_dict`, or None."""

    id: int
    trigger: str
    started_at: float
    finished_at: float
    ok: int
    report: dict[str, Any] | None


ListedObject = tuple[str, str, int, float]
"""An object a storage listing showed: ``(bucket or "", key, size in bytes, modified epoch seconds)``."""

StatsGroup = tuple[str, int, int]
"""``(value, count, bytes)``: one group of :meth:`~gateway.catalog.CatalogContract.media_stats`."""


EVENT_JSON_COLUMNS = ("payload", "media", "forward", "notes")
"""The columns of ``events`` stored as JSON text."""


def to_column(value: Any) -> Any:
    """A value as every SQL implementation stores it: dicts and lists as JSON text, bools as 0/1."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    return value


MEDIA_SOURCE_TAKEN = "ON CONFLICT (source_key) WHERE state = 'stored' DO NOTHING"
"""A media insert's conflict clause: a stored row with the same ``source_key`` keeps its place
(:meth:`gateway.catalog.CatalogContract.insert_media`)."""
MEDIA_ANY_TAKEN = "ON CONFLICT DO NOTHING"
"""A media insert's conflict clause for :meth:`gateway.catalog.CatalogContract.complete_job`: a
row with the same id (recorded by another job of the same attachment) or ``source_key`` stays."""
MEDIA_SOURCE_HOLDER = "SELECT id FROM media WHERE source_key = {} AND state = 'stored'"
"""The id of the stored row of a ``source_key`` (``{}``: the dialect's placeholder)."""


def media_insert(record: MediaRow, placeholder: str, conflict: str) -> tuple[str, list[Any]]:
    """``(SQL, arguments)`` inserting ``record`` into ``media`` (values as :func:`to_column` makes
    them) followed by the ``conflict`` clause, for both dialects: ``placeholder`` is ``?`` or
    ``%s``."""
    cols = list(record)
    sql = (f"INSERT INTO media ({', '.join(cols)}) VALUES ({', '.join([placeholder] * len(cols))})"
           f" {conflict}")
    return sql, [to_column(record[c]) for c in cols]  # type: ignore[literal-required]


def job_listing(select: str, placeholder: str, *, state: str | None, kind: str | None, before: int | None,
                newest_first: bool, limit: int | None) -> tuple[str, dict[str, Any]]:
    """``(SQL, named arguments)`` of :meth:`gateway.catalog.CatalogContract.list_jobs` for both
    dialects: ``select`` (``SELECT ... FROM jobs``) with only the filters given (an empty
    ``state`` or ``kind`` is none), so that the ``(state, kind, ...)`` indexes apply; ordered by
    id, limited. ``placeholder``: the dialect's named parameter, ``{}`` for the name (``":{}"``,
    ``"%({})s"``)."""
    args: dict[str, Any] = {}
    where: list[str] = []
    for name, condition, value in (("state", "state =", state or None), ("kind", "kind =", kind or None),
                                   ("before", "id <", before)):
        if value is not None:
            where.append(f"{condition} {placeholder.format(name)}")
            args[name] = value
    sql = select + (" WHERE " + " AND ".join(where) if where else "") + \
        f" ORDER BY id {'DESC' if newest_first else 'ASC'}"
    if limit is not None:
        sql += f" LIMIT {placeholder.format('limit')}"
        args["limit"] = limit
    return sql, args


class RandomPool:
    """Unpredictable bytes for ids, drawn from ``os.urandom`` ``size`` bytes at a time: one system
    call per a few hundred ids instead of one per id. ``os.urandom`` lets go of the GIL for its
    system call, and the event loop that called it then waits for the catalog thread to hand the
    GIL back, which under a burst cost ~10% of the webhook path. Thread-safe; a forked child
    starts a pool of its own."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._lock = threading.Lock()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._buffer = b""
        self._used = 0

    def hex(self, nbytes: int) -> str:
        """``nbytes`` random bytes as ``2 * nbytes`` lowercase hex digits."""
        with self._lock:
            if self._used + nbytes > len(self._buffer):
                self._buffer, self._used = os.urandom(max(self.size, nbytes)), 0
            chunk = self._buffer[self._used:self._used + nbytes]
            self._used += nbytes
        return chunk.hex()


RANDOM = RandomPool()
"""The process's :class:`RandomPool`."""


def new_event_id() -> str:
    """A new event id: ``ev_`` and 32 hex digits, time-ordered: 12 of the time in milliseconds
    (as a UUIDv7's, RFC 9562 §5.7), then 20 random (80 bits). Ids made close together sort close
    together, so the catalog's indexes grow at their end instead of at random pages."""
    return f"ev_{int(time.time() * 1000):012x}{RANDOM.hex(10)}"


@dataclass(frozen=True, slots=True)
class ReadyEvent:
    """An event the gateway handled as it arrived (one without media, so nothing to fetch): it is
    recorded already ``ingested``, with its rewritten ``forward`` payload, and with ``followups``
    (``(kind, key, payload)`` jobs: its deliveries) instead of an ``ingest`` job."""

    forward: dict[str, Any]
    followups: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)


def event_row(row: dict[str, Any]) -> EventRow:
    """A stored ``events`` row with its JSON columns (:data:`EVENT_JSON_COLUMNS`) decoded."""
    for col in EVENT_JSON_COLUMNS:
        if row.get(col) is not None:
            row[col] = json.loads(row[col])
    return cast(EventRow, row)
