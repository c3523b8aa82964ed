"""The catalog contract (DESIGN §5-6): what the host asks of the store that holds the webhook events,
the durable job queue, the media rows and the retention log. :class:`CatalogContract` is what an
implementation provides; :class:`gateway.catalog.sqlite.SQLiteCatalog` is the default one.

Rules every implementation keeps (the contract suite, ``tests/test_catalog_contract.py``, checks them):

- **Durable on return.** A coroutine that changes something returns after the change is committed
  (a crash or power loss afterwards keeps it); the changes of one call commit together or not at all.
- **Idempotent by key.** An event's ``idempotency_key`` and a job's ``key`` are unique across all
  providers: a second insert is a duplicate, not an error and not a second row. A media row's
  ``source_key`` is unique among ``stored`` rows.
- **Jobs are leased one at a time.** :meth:`CatalogContract.claim_job` hands a due queued job to
  exactly one caller, even with several workers or replicas (PostgreSQL: ``FOR UPDATE SKIP
  LOCKED``), and counts the attempt. A catalog shared by replicas (PostgreSQL) gives the claim a
  lease that the worker renews (:meth:`CatalogContract.renew_leases`); a running job whose lease
  ran out (its replica died) is claimed again. An exclusive catalog (SQLite, one daemon) needs no
  lease: its daemon requeues what a crash left running (:meth:`CatalogContract.requeue_running`).
- **Times** are epoch seconds (float), injected where a method takes ``now`` (tests move the clock);
  media times are stored at whole microseconds (:func:`exact_time`). **Sizes** are bytes.
- **Errors.** :class:`CatalogError` when the catalog is not open, cannot be opened, or is from a
  newer gateway; :class:`CatalogLocked` when another daemon holds it. Anything else a driver raises
  (the database went away) propagates: the caller treats it as an outage and retries later.
- ``where`` arguments (:meth:`CatalogContract.count`, :meth:`CatalogContract.list_media`) are SQL
  conditions over the named table with ``?`` placeholders, built by the host from fixed column names;
  another SQL implementation translates the placeholders.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from gateway.catalog.rows import (
    ClaimedJob,
    CleanupRunRow,
    DoomedMedia,
    EventRow,
    ExpiredMedia,
    JobRow,
    ListedObject,
    MediaRow,
    ReadyEvent,
    StatsGroup,
    UnlistedMedia,
)
from gateway.sdk.provider import WebhookEvent

JOB_STATES = ("queued", "running", "done", "dead")
"""A job's states: ``queued`` (waiting for ``run_at``), ``running`` (claimed by a worker), ``done``,
``dead`` (failed for good; waits for a person to retry it)."""


@overload
def exact_time(ts: float) -> float: ...
@overload
def exact_time(ts: None) -> None: ...
@overload
def exact_time(ts: float | None) -> float | None: ...
def exact_time(ts: float | None) -> float | None:
    """Epoch seconds rounded to whole microseconds: the one precision media timestamps are stored
    at, shown at (RFC 3339 with six decimals) and compared at. ``None`` stays ``None``."""
    return None if ts is None else round(ts, 6)


class CatalogError(Exception):
    """The catalog could not be opened, is not open, or is from a newer gateway."""


class MediaTaken(Exception):
    """:meth:`CatalogContract.complete_job` inserts no media row of its ``media``, and commits
    nothing, because a ``stored`` row of another id holds the ``source_key`` of one of them (a copy of
    the same attachment was recorded meanwhile: by another replica, or before a restart).
    ``source_keys``: those keys, in the order of ``media``."""

    def __init__(self, source_keys: Sequence[str]):
        super().__init__(f"a stored media row holds source key {', '.join(source_keys)}")
        self.source_keys = list(source_keys)


class CatalogLocked(CatalogError):
    """Another process holds the catalog's exclusive lock (a daemon already runs on it).

    ``pid`` is the holder's process id as written in the lock file (None if unreadable).
    """

    def __init__(self, path: Path, pid: int | None):
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"catalog {path} is in use by {holder} (a gateway daemon already runs on it)")
        self.path, self.pid = path, pid


@dataclass(frozen=True, slots=True)
class ExpiryRule:
    """Which media rows a cleanup deletes (:meth:`CatalogContract.expired_media`). Times are epoch
    seconds, ages seconds (``math.inf``: never).

    - ``backend``: only rows stored on this backend (the one the cleanup can reach);
    - ``now``: the policy clock; ages and ``expires_at`` are measured against it;
    - ``before``: rows created at or after it are left alone (the run's real start, so that what
      an ingest stores while a run goes on is never part of it);
    - ``default_age``, ``provider_ages``, ``category_ages``: a row's maximum age is the longest of
      its provider's and its category's when either is given, else ``default_age``;
    - ``keep_public``: rows with ``is_public`` never expire by age (``expires_at`` still applies).
    """

    backend: str
    now: float
    before: float
    default_age: float
    provider_ages: Mapping[str, float] = field(default_factory=dict)
    category_ages: Mapping[str, float] = field(default_factory=dict)
    keep_public: bool = True


@dataclass(slots=True)
class CatalogStats:
    """What ``/metrics`` reads from the catalog at scrape time (:meth:`CatalogContract.stats`).

    ``jobs``: ``{(kind, state): count}``; ``oldest_queued``: ``{kind: created_at}`` of the oldest
    queued job; ``media``: ``(backend, category, state, count, bytes)`` rows;
    ``last_cleanup``: ``finished_at`` of the last successful, non-dry cleanup run, or None.
    """

    jobs: dict[tuple[str, str], int]
    oldest_queued: dict[str, float]
    media: list[tuple[str, str, str, int, int]]
    last_cleanup: float | None


class CatalogTuning:
    """What the host sets on any catalog after building it (``create_app``), shared by every
    implementation and the contract."""

    on_commit: Callable[[int, bool], None] | None = None
    """Called with each commit's number of writes, and whether it waited for the disk (fsync), where
    the implementation groups commits (for the metrics; on the catalog's own thread where it has one)."""
    default_media_lifetime: float = 180.0
    """Seconds a provider keeps a webhook's media, unless :attr:`media_lifetimes` names it: an ingest
    job's deadline is its webhook's time plus this (``[queue] media_deadline``)."""
    media_lifetimes: Mapping[str, float] = {}
    """``{provider: seconds}`` (``[queue] media_deadlines``); set a new mapping, never mutate."""

    def media_lifetime(self, provider: str) -> float:
        """Seconds after a webhook that ``provider`` deletes its media (WAHA: 180 by default)."""
        return self.media_lifetimes.get(provider, self.default_media_lifetime)


class CatalogContract(CatalogTuning, abc.ABC):
    """The catalog as the host uses it. Every method but :meth:`lock` is a coroutine and never
    blocks the event loop. Open with :meth:`open` before anything else, close with :meth:`close`."""

    # -- lifecycle ------------------------------------------------------------------------
    kind: str
    """The implementation's name (``sqlite``, ``postgresql``), for logs and metrics."""
    read_only: bool = False
    """Built to read only (the serving workers, which call :meth:`get_media`): :meth:`open` applies
    no migration and takes no lock, and raises :class:`CatalogError` unless the catalog exists at
    this gateway's schema version; any write fails with the driver's error."""

    @property
    def replica(self) -> str | None:
        """This process's id in a shared catalog (the ``owner`` of the jobs it leases); None for an
        exclusive catalog, which one daemon holds."""
        return None

    @abc.abstractmethod
    def lock(self) -> None:
        """Make this process the catalog's one daemon, without waiting; held until :meth:`close`
        or the process's death. Idempotent. Readers (``gateway cleanup``) do not take it.

        Raises :class:`CatalogLocked` naming the holder if another process holds it."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create what is missing and apply the numbered migrations.

        Raises :class:`CatalogLocked` (an exclusive catalog, see :meth:`lock`), :class:`CatalogError`
        if the schema is newer than this gateway knows."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection and the lock. Idempotent."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Return if the catalog answers a query (``/readyz``); raise otherwise
        (:class:`CatalogError` when it is not open)."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The number of migrations applied."""

    # -- events ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def record_webhook(self, provider: str, raw: bytes, events: list[WebhookEvent],
                             now: float | None = None, *, event_ids: Sequence[str] | None = None,
                             ready: Mapping[int, ReadyEvent] | None = None,
                             claim: Collection[str] = ()) -> tuple[list[str], list[str], list[ClaimedJob]]:
        """Commit each event of one webhook body ``raw`` with its ``ingest`` job (key
        ``ingest:<event id>``, payload ``{"event_id": ...}``, due at ``now``, its deadline the
        provider's media lifetime later) in one transaction.

        ``event_ids``: the ids to give ``events`` (same length; default: new ones, see
        :func:`gateway.catalog.rows.new_event_id`). ``ready``: index in ``events`` →
        :class:`ReadyEvent` for events the gateway handled already (no media): such an event is
        recorded ``ingested`` with its ``forward``, and gets the ready event's follow-up jobs
        instead of an ingest job. ``claim``: job kinds whose jobs this call adds are created
        claimed by the caller, as :meth:`complete_job` with ``claim`` does (running, first attempt
        counted, under this replica's lease), so that idle workers run them without a claim of
        their own.

        Returns ``(accepted event ids, idempotency keys already seen, the claimed jobs)``: an event
        whose idempotency key exists (from any provider, or earlier in ``events``) is a duplicate:
        no row, no job. Concurrent calls with one key accept it once."""

    @abc.abstractmethod
    async def events_per_minute(self, since: float) -> list[tuple[int, int]]:
        """Webhook events received at or after ``since`` (Unix seconds), counted by minute:
        ``[(minute start, Unix seconds divisible by 60; count)]`` oldest first, empty minutes left out.
        (The console's overview chart.)"""

    @abc.abstractmethod
    async def get_event(self, event_id: str) -> EventRow | None:
        """The event (JSON columns decoded), or None."""

    @abc.abstractmethod
    async def count(self, table: str, where: str | None = None, args: list[Any] | None = None) -> int:
        """Rows in ``table`` (``events``, ``jobs`` or ``media``) matching the SQL condition ``where``
        (``?`` placeholders bound to ``args``). Raises ``ValueError`` for another table."""

    # -- jobs -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def enqueue(self, kind: str, key: str, payload: dict[str, Any]) -> bool:
        """Add a queued job, due now, unless one with ``key`` (its idempotency key) exists, in any
        state. ``True`` if added."""

    @abc.abstractmethod
    async def claim_job(self, now: float | None = None, kinds: Sequence[str] | None = None,
                        exclude_kinds: Sequence[str] = ()) -> ClaimedJob | None:
        """Take the due queued job (``run_at <= now``) of one of ``kinds`` (None: any) and none of
        ``exclude_kinds`` (a job queue's lanes, DESIGN §6) with the
        earliest ``deadline`` (jobs without one first), then the earliest ``run_at``, then id:
        mark it running, count the attempt, return it; None when nothing is due. A job is handed
        to one caller only."""

    @abc.abstractmethod
    async def next_run_at(self, kinds: Sequence[str] | None = None,
                          exclude_kinds: Sequence[str] = ()) -> float | None:
        """When the earliest queued job of ``kinds`` (None: any) and none of ``exclude_kinds`` is
        due (epoch seconds), or None."""

    @abc.abstractmethod
    async def media_backlog(self) -> tuple[float, float] | None:
        """The queued ``ingest`` job with the earliest deadline as ``(created_at, deadline)``
        (epoch seconds), or None when no media waits: how close the oldest waiting media is to
        being deleted by its provider (readiness and the backlog metric)."""

    @abc.abstractmethod
    async def media_waiting(self) -> int:
        """How many ``ingest`` jobs are queued or running (media not stored yet, due now or
        later): with the recent store rate, how long the fetch lane needs for what was acknowledged
        (:class:`gateway.admission.Admission`)."""

    @abc.abstractmethod
    async def complete_job(self, job_id: int, followups: Sequence[tuple[str, str, dict[str, Any]]] = (),
                           event_update: tuple[str, dict[str, Any]] | None = None,
                           claim: bool = False, durable: bool = True,
                           media: Sequence[MediaRow] = ()) -> list[ClaimedJob]:
        """Mark a job done (``last_error`` cleared), enqueue ``followups`` ``(kind, key, payload)``
        (idempotent by key, as :meth:`enqueue`) and apply ``event_update`` ``(event_id, {column:
        value})`` (dicts and lists stored as JSON), all in one transaction. Runs ahead of other
        waiting catalog work: the job's effect has happened, and a crash before the commit repeats it.

        ``media``: rows of objects the job stored, inserted first in the same transaction (an
        ingest's, whose rewritten payload links them: one commit records both). A row whose id is
        in the catalog already, as the stored row of its ``source_key``, is left as it is (another
        job of the same attachment recorded it). A row whose ``source_key`` a stored row of another
        id holds raises :class:`MediaTaken`, and nothing of the call is committed.

        ``claim``: the follow-ups this call adds are created claimed by the caller, as
        :meth:`claim_job` would hand them (running, first attempt counted, under this replica's
        lease), and returned, so that the caller runs them without a claim of their own (a
        follow-up whose key existed is left as it is and not returned). Returns ``[]`` otherwise.

        ``durable=False``: for a job that may run again (a delivery, at least once): the commit need
        not wait for the disk (SQLite: no fsync; PostgreSQL: ``synchronous_commit = off``). A power
        loss before the next durable commit may take the ``done`` back, and the job runs again."""

    @abc.abstractmethod
    async def fail_job(self, job_id: int, error: str, retry_at: float | None) -> None:
        """Record a failed attempt with ``error`` (kept to 2000 characters): back to ``queued``
        due at ``retry_at``, or ``dead`` when it is None."""

    @abc.abstractmethod
    async def release_job(self, job_id: int) -> None:
        """Return a running job to the queue without counting the attempt (a worker stopping);
        a job that is not running is left alone."""

    @abc.abstractmethod
    async def requeue_running(self) -> int:
        """Return running jobs to the queue, attempts kept (their worker crashed; called at start).
        An exclusive catalog (its daemon holds :meth:`lock`) returns every running job; a shared one
        only those whose lease ran out, never a live replica's. Returns how many."""

    async def renew_leases(self, job_ids: Sequence[int]) -> int:
        """Keep the running jobs ``job_ids`` this process's for another lease (a shared catalog;
        the worker calls it while they run). Returns how many are still this process's. The
        default, for an exclusive catalog without leases: all of them."""
        return len(job_ids)

    @abc.abstractmethod
    async def get_job(self, job_id: int) -> JobRow | None:
        """The job (``payload`` decoded), or None."""

    @abc.abstractmethod
    async def list_jobs(self, state: str | None = None, kind: str | None = None, *, limit: int | None = None,
                        newest_first: bool = False, before: int | None = None) -> list[JobRow]:
        """Jobs filtered by ``state`` and ``kind`` (None: any), oldest (by id) first, or newest
        first with ``newest_first``; at most ``limit`` (None: all); ``before``: only ids below it
        (the last id of a newest-first page gives the next page). Done jobs are kept for days
        (``retention.done_jobs_max_age_days``), millions at a high rate: a listing for people
        gives a ``limit``, which the store applies, not the caller."""

    @abc.abstractmethod
    async def job_counts(self) -> dict[tuple[str, str], int]:
        """``{(kind, state): count}`` for the metrics; groups without jobs are absent."""

    @abc.abstractmethod
    async def retry_dead_job(self, job_id: int) -> JobRow | None:
        """Queue a dead job again, due now, attempts reset. Returns the row as queued again (read
        in the same transaction, before a worker can claim it), or None if the job was not dead."""

    # -- media ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def media_by_source(self, source_key: str) -> MediaRow | None:
        """The stored row for ``source_key`` (see :class:`gateway.sdk.provider.MediaRef`); rows being
        deleted or found missing do not count (the attachment is fetched again)."""

    @abc.abstractmethod
    async def get_media(self, media_id: str) -> MediaRow | None:
        """The media row in any state, or None."""

    @abc.abstractmethod
    async def insert_media(self, record: MediaRow) -> tuple[MediaRow, bool]:
        """Insert a media row, written after its object. If its ``source_key`` is taken by a stored
        row (a concurrent ingest stored the same attachment) nothing is inserted and the result is
        ``(that row, False)``; else ``(record, True)``. (An ingest's rows go in with its job's
        completion instead: :meth:`complete_job`'s ``media``.)"""

    @abc.abstractmethod
    async def update_media(self, media_id: str, values: dict[str, Any]) -> bool:
        """Set columns ``{column: value}`` of a media row (dicts and lists as JSON, bools as 0/1);
        ``True`` if the row exists."""

    @abc.abstractmethod
    async def list_media(self, where: list[str], args: list[Any], sort: str, descending: bool,
                         after: tuple[Any, str] | None, limit: int) -> list[MediaRow]:
        """Up to ``limit`` media rows matching every SQL condition of ``where`` (``?`` placeholders
        bound to ``args``), in ``sort`` order (``created_at`` or ``size``; else ``ValueError``) then
        ``id``, starting after the keyset ``after`` = ``(sort value, id)``: pages that stay
        correct while rows are added."""

    @abc.abstractmethod
    async def media_stats(self, tenant: str | None) -> dict[str, list[StatsGroup]]:
        """``{"category"|"provider"|"backend": [(value, count, bytes)]}`` over media not being
        deleted, of one tenant when ``tenant`` is given, by value (NULL as "")."""

    @abc.abstractmethod
    async def claim_media_for_delete(self, media_id: str, now: float) -> MediaRow | None:
        """Move a media row to ``deleting`` (reason ``api``) so that neither ingest nor a cleanup
        uses it meanwhile, and return it; None if there is no such row or another deletion has it."""

    @abc.abstractmethod
    async def media_totals(self) -> list[tuple[str, str, str, int, int]]:
        """``(backend, provider or "", category, count, bytes)`` of every group of media rows."""

    # -- retention queries (gateway.retention) ----------------------------------------------
    # An object is *needed* while a queued or running job works on an event whose media refers to
    # it (by ``source_key``), or was stored for such an event; needed rows are never claimed, and
    # claiming happens in the same transaction as that check. Dead jobs protect nothing.
    @abc.abstractmethod
    async def count_expired_media(self, rule: ExpiryRule) -> tuple[int, int, int]:
        """``(expired rows, of which needed, bytes of the others)`` under ``rule``."""

    @abc.abstractmethod
    async def expired_media(self, rule: ExpiryRule, after: str, limit: int, claim: bool
                            ) -> list[ExpiredMedia]:
        """Up to ``limit`` rows (``stored`` or ``missing``) expired under ``rule``, with ``id >
        after``, by id. With ``claim``, the rows not in use move to ``deleting`` (reason: theirs)
        in the same transaction; their objects are then deleted, then :meth:`forget_media`."""

    @abc.abstractmethod
    async def media_being_deleted(self, backend: str, after: str, limit: int) -> list[DoomedMedia]:
        """Rows of ``backend`` in state ``deleting`` (a deletion that failed or was interrupted),
        ``id > after``, by id, at most ``limit``."""

    @abc.abstractmethod
    async def forget_media(self, ids: list[str]) -> int:
        """Delete the rows ``ids`` that are ``deleting`` (their objects are gone). Returns how many."""

    @abc.abstractmethod
    async def begin_listing(self) -> None:
        """Start an empty storage listing, private to this catalog connection (one at a time)."""

    @abc.abstractmethod
    async def add_listing(self, objects: list[ListedObject]) -> None:
        """Add listed objects to the listing (a repeat replaces)."""

    @abc.abstractmethod
    async def end_listing(self) -> None:
        """Drop the listing. Idempotent."""

    @abc.abstractmethod
    async def listed_without_row(self, backend: str, after: tuple[str, str], limit: int
                                 ) -> list[ListedObject]:
        """Listed objects that no media row of ``backend`` points at (orphan candidates), by
        ``(bucket, key)`` after ``after``, at most ``limit``. A row without a bucket matches the
        key in any bucket, an object listed without a bucket ("") any row's bucket."""

    @abc.abstractmethod
    async def rows_not_listed(self, backend: str, created_before: float, after: str, limit: int
                              ) -> list[UnlistedMedia]:
        """Stored rows of ``backend`` created before ``created_before`` whose object is not in the
        listing, by id after ``after``, at most ``limit``."""

    @abc.abstractmethod
    async def media_keys_present(self, backend: str, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of ``keys`` (``(bucket or "", key)``) a media row of ``backend`` points at now."""

    @abc.abstractmethod
    async def mark_missing(self, ids: list[str], now: float) -> int:
        """Move stored rows ``ids`` to ``missing`` (reason ``not in storage``). Returns how many."""

    @abc.abstractmethod
    async def count_prunable(self, events_before: float | None, jobs_before: float | None) -> tuple[int, int]:
        """``(events, jobs)`` that :meth:`prune_events` then :meth:`prune_done_jobs` would delete
        with these bounds (``None``: kept forever)."""

    @abc.abstractmethod
    async def prune_events(self, before: float, limit: int) -> tuple[int, int]:
        """Delete up to ``limit`` events received before ``before``, no longer queued, whose jobs
        are all done, with those jobs. Returns ``(events, jobs)`` deleted."""

    @abc.abstractmethod
    async def prune_done_jobs(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` done jobs last updated before ``before``. Returns how many."""

    @abc.abstractmethod
    async def record_cleanup_run(self, trigger: str, started_at: float, finished_at: float, ok: bool,
                                 report: dict[str, Any], keep: int = 100) -> None:
        """Log a finished cleanup run (``report`` as JSON); keep only the last ``keep`` runs."""

    @abc.abstractmethod
    async def cleanup_runs(self, limit: int = 10) -> list[CleanupRunRow]:
        """The last ``limit`` cleanup runs, newest first (``report`` decoded)."""

    @asynccontextmanager
    async def try_cleanup_lock(self) -> AsyncIterator[bool]:
        """The scheduled cleanup's lock across every process sharing the catalog, without waiting:
        yields ``True`` when this process holds it for the block, ``False`` when another runs a
        cleanup (PostgreSQL: an advisory lock). The default, for an exclusive catalog whose one
        daemon is the only scheduler: always ``True`` (the retention runner's lock file keeps
        ``gateway cleanup`` out)."""
        yield True

    # -- live notices -----------------------------------------------------------------------
    async def publish(self, channel: str, payload: dict[str, Any]) -> None:
        """Send ``payload`` (a JSON object, under 8000 bytes encoded) to every current subscriber
        of ``channel`` in every process sharing the catalog (PostgreSQL: ``NOTIFY``). Live notices,
        not a log: a subscriber that is not listening misses them. The default: this process only."""
        for queue in _local_channels(self).get(channel, ()):
            queue.put_nowait(payload)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Listen on ``channel`` for the block: yields an async iterator of the payloads
        :meth:`publish` sends from the moment the block is entered (PostgreSQL: ``LISTEN``, on a
        connection of its own). The default: this process's."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        subscribers = _local_channels(self).setdefault(channel, set())
        subscribers.add(queue)

        async def notices() -> AsyncIterator[dict[str, Any]]:
            while True:
                yield await queue.get()

        try:
            yield notices()
        finally:
            subscribers.discard(queue)

    @abc.abstractmethod
    async def stats(self) -> CatalogStats:
        """Everything ``/metrics`` reads from the catalog, in one round trip."""


def _local_channels(catalog: CatalogContract) -> dict[str, set[asyncio.Queue[dict[str, Any]]]]:
    """The in-process subscribers of a catalog without a shared channel, by channel."""
    channels: dict[str, set[asyncio.Queue[dict[str, Any]]]] = catalog.__dict__.setdefault("_local_channels", {})
    return channels
