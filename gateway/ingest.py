"""The inbound pipeline (DESIGN §2): for each media reference of an event, fetch from the provider,
hash, count and sniff while streaming into storage, write the catalog row, rewrite the payload and
enqueue one delivery per bot target.

Idempotent: a reference whose ``source_key`` is already in the catalog is not fetched again, so a
retried job, a redelivered webhook or the same message in two events stores one object. (The first
attempt at an attachment that no other recent event named skips that look-up; should a copy exist
after all, stored before a restart or by another replica, the catalog's ``source_key`` conflict
keeps that one and the new object is deleted.)

The rows of the objects an ingest stored are inserted by its job's completion, in the commit that
records the rewritten payload linking them and the deliveries (:attr:`gateway.jobs.JobResult.media`):
one commit, one fsync, between the stored object and the forward. Until that commit, this process
remembers each such row by its ``source_key`` (:attr:`Ingestor.unrecorded`), so that another event
of the same attachment, or the job's next attempt, links the same object instead of fetching it
again; both completions insert the same row, and the first one records it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache, TTLCache

from gateway.catalog import CatalogContract, MediaRow, MediaTaken, ReadyEvent
from gateway.config import Settings
from gateway.delivery import Forwards
from gateway.jobs import Job, JobResult, PermanentError, RetryLater
from gateway.links import LinkSigner
from gateway.media import DigestMismatch, MediaTooLarge, category_for
from gateway.metrics import Metrics
from gateway.sdk.download import BODY_ERRORS
from gateway.sdk.outbound import Origin
from gateway.sdk.provider import (
    FetchError,
    copy_path,
    MediaOutcome,
    MediaRef,
    Provider,
    WebhookEvent,
)
from gateway.sdk.storage import InvalidKey, StorageError
from gateway.store import MediaRefused, MediaStore, NotCommitted
from gateway.thumbnails import DEFAULT_SIZE, has_thumbnail

log = logging.getLogger("gateway.ingest")


class Arrivals:
    """The media events this process acknowledged lately, so that their ingest jobs need no
    catalog read: ``event id -> (provider name, event)``, events of at most ``size`` bytes of
    webhook body in all, the least recently used dropped first; an ingest takes its event out. A
    miss (a retry, a restart, another replica) reads the catalog, which stays the source of truth.

    It also counts, for the last ``sources`` media source keys of those events, how many events
    named each, so that the ingest of an attachment only this event named lately need not
    look for a stored copy first (:meth:`Ingestor._ingest_ref`)."""

    def __init__(self, size: int = 4 * 1024 * 1024, sources: int = 16384):
        self._events: LRUCache[str, tuple[int, str, WebhookEvent]] = LRUCache(
            maxsize=size, getsizeof=lambda v: v[0] + 1)
        self._sources: LRUCache[str, int] = LRUCache(maxsize=sources)

    def remember(self, event_id: str, provider: str, event: WebhookEvent, body_bytes: int,
                 count_sources: bool = True) -> None:
        """Keep ``event`` of ``provider``, committed as ``event_id`` from a webhook body of
        ``body_bytes`` (a body over the whole size is not kept), and count its media's source keys
        (unless ``count_sources`` is False: :meth:`count_sources` did already)."""
        if body_bytes < self._events.maxsize:
            self._events[event_id] = (body_bytes, provider, event)
        if count_sources:
            self.count_sources(event)

    def count_sources(self, event: WebhookEvent) -> None:
        """Count that ``event`` names its media's source keys."""
        for ref in event.media:
            self._sources[ref.source_key] = self._sources.get(ref.source_key, 0) + 1

    def only_once(self, source_key: str) -> bool:
        """Whether exactly one remembered event named ``source_key`` lately (False once the count is
        forgotten: the least recently named keys go first)."""
        return self._sources.get(source_key) == 1

    def take(self, event_id: str) -> tuple[str, WebhookEvent] | None:
        """``(provider name, event)`` if remembered, forgotten here."""
        kept = self._events.pop(event_id, None)
        return None if kept is None else (kept[1], kept[2])


UNRECORDED_TTL = 600.0
"""Seconds :attr:`Ingestor.unrecorded` keeps the row of a stored object whose insert has not
committed (its job failed meanwhile, and no retry or other event used it): far below the orphan
scan's grace (``retention.orphan_grace_hours``), which then deletes an object nobody recorded."""


@dataclass(slots=True)
class Stored:
    """What the ingest of one media reference gave: its ``outcome``, and ``row``, the catalog row
    of the object it links when that row is not committed yet (the job's completion inserts it)."""

    outcome: MediaOutcome
    row: MediaRow | None = None


class Ingestor:
    """Handler of ``ingest`` jobs (payload ``{"event_id": ...}``)."""

    def __init__(self, settings: Settings, catalog: CatalogContract, media_store: MediaStore,
                 providers: dict[str, Provider], links: LinkSigner, metrics: Metrics,
                 forwards: Forwards | None = None):
        self.settings = settings
        #: Where the rewritten payloads go for the deliveries of this process (their catalog read saved).
        self.forwards = forwards if forwards is not None else Forwards()
        #: The media events the webhook handler acknowledged, for their ingest jobs.
        self.arrivals = Arrivals()
        self.catalog = catalog
        self.media_store = media_store
        self.providers = providers
        self.links = links
        self.metrics = metrics
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        #: event id -> the storing of its media, begun while its webhook's commit ran (:meth:`begin`)
        self._begun: dict[str, asyncio.Task[list[Stored]]] = {}
        #: source key -> the row of an object this process stored, until a job's completion
        #: commits it (or finds a copy recorded first); at most :data:`UNRECORDED_TTL` seconds.
        self.unrecorded: TTLCache[str, MediaRow] = TTLCache(maxsize=16384, ttl=UNRECORDED_TTL)

    @asynccontextmanager
    async def _locked(self, key: str) -> AsyncIterator[None]:
        """Serialise work on one ``source_key`` within this process; idle locks are dropped."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def __call__(self, job: Job) -> JobResult:
        """Run one ingest job. Raises to retry; :class:`PermanentError` when the event is gone."""
        event_id = job.payload["event_id"]
        arrived = self.arrivals.take(event_id)
        fresh = arrived is not None and job.attempts == 1  # first try, of an event this process acknowledged
        if arrived is not None:
            name, event = arrived
        else:
            row = await self.catalog.get_event(event_id)
            if row is None:
                raise PermanentError(f"event {event_id} is not in the catalog")
            name = row["provider"]
            event = WebhookEvent(
                idempotency_key=row["idempotency_key"], event=row["event"], account=row["account"] or "",
                payload=row["payload"], media=[MediaRef.from_dict(m) for m in row["media"] or []],
                chat=row["chat"], message_id=row["message_id"],
            )
        provider = self.providers.get(name)
        if provider is None:
            raise PermanentError(f"provider {name!r} is not enabled")
        begun = self._begun.pop(event_id, None)
        with _storage_errors():
            stored = await (begun if begun is not None else  # begun as the webhook committed
                            self._ingest_refs(provider, event, event_id, job.last_attempt, fresh))
        return self._result(provider, event, event_id, stored, job.last_attempt)

    def _result(self, provider: Provider, event: WebhookEvent, event_id: str, stored: list[Stored],
                last_attempt: bool) -> JobResult:
        """The job's result: the rewritten payload and deliveries, the rows to insert with them
        (each once), the ``media_stored`` hooks once committed, and the revision should a copy
        of one attachment have been recorded meanwhile (:meth:`_revise`)."""
        outcomes = [s.outcome for s in stored]
        ready = self._ready(provider, event, event_id, outcomes)
        notes = [o.error for o in outcomes if o.error]
        rows = list({s.row["id"]: s.row for s in stored if s.row is not None}.values())

        async def recorded() -> None:  # the rows are committed: the first job to commit one announces it
            for row in rows:
                if self._forget_unrecorded(row):
                    await self.media_store.stored(row)

        async def taken(exc: MediaTaken) -> JobResult:
            return await self._revise(provider, event, event_id, stored, exc, last_attempt)

        return JobResult(ready.followups, (event_id, {"forward": ready.forward, "state": "ingested",
                                                      "notes": notes or None}),
                         media=rows, after=recorded if rows else None, taken=taken if rows else None)

    async def _revise(self, provider: Provider, event: WebhookEvent, event_id: str, stored: list[Stored],
                      exc: MediaTaken, last_attempt: bool) -> JobResult:
        """The result again after the completion found a stored row of another id for the source
        keys ``exc`` names: the objects stored here for them are deleted, and those references are
        ingested again, linking the recorded copy (or storing anew should it be gone meanwhile)."""
        keys = set(exc.source_keys)
        revised: list[Stored] = []
        dropped: set[str] = set()
        with _storage_errors():
            for s in stored:
                if s.row is None or s.row["source_key"] not in keys:
                    revised.append(s)
                    continue
                if s.row["id"] not in dropped:
                    self._forget_unrecorded(s.row)
                    await self.media_store.drop(s.row)
                    dropped.add(s.row["id"])
                revised.append(await self._ingest_ref(provider, event, event_id, s.outcome.ref, last_attempt))
        return self._result(provider, event, event_id, revised, last_attempt)

    def _forget_unrecorded(self, row: MediaRow) -> bool:
        """Forget ``row`` in :attr:`unrecorded` (committed, or refused): True if it was there."""
        key = row["source_key"]
        held = self.unrecorded.get(key) if key is not None else None
        if key is None or held is None or held["id"] != row["id"]:
            return False
        del self.unrecorded[key]
        return True

    async def _ingest_refs(self, provider: Provider, event: WebhookEvent, event_id: str, last_attempt: bool,
                           fresh: bool, committed: asyncio.Future[bool] | None = None) -> list[Stored]:
        """Store each media reference of ``event`` in turn (:meth:`_ingest_ref`); ``committed``: see
        :meth:`begin`."""
        return [await self._ingest_ref(provider, event, event_id, ref, last_attempt,
                                       fresh and self.arrivals.only_once(ref.source_key), committed)
                for ref in event.media]

    def begin(self, provider: Provider, event: WebhookEvent, event_id: str) -> asyncio.Future[bool]:
        """Start storing the media of ``event`` while its webhook's commit runs, for an ingest job
        that an idle fetch worker of this process will take from that commit
        (:meth:`gateway.jobs.JobQueue.reserve`): the downloads overlap the commit's fsync. The
        objects' catalog rows wait for the returned future, which the caller sets: True once the
        event is committed (its job then takes these outcomes), False if it was not (a duplicate,
        or the commit failed): the objects are deleted again and nothing is recorded
        (:meth:`abandon`). A provider that deletes its files as it serves them is not affected:
        the download is one GET either way."""
        committed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.arrivals.count_sources(event)  # before the commit: another event of the same commit looks up
        self._begun[event_id] = asyncio.create_task(
            self._ingest_refs(provider, event, event_id, self.settings.queue.max_attempts <= 1, True, committed),
            name=f"ingest-early-{event_id}")
        return committed

    def abandon(self, event_id: str) -> None:
        """Drop the early storing of ``event_id`` (its webhook was not committed): it finishes by
        itself, deleting what it stored; its errors are only logged."""
        task = self._begun.pop(event_id, None)
        if task is not None:
            task.add_done_callback(_log_abandoned)

    def without_media(self, provider: Provider, event: WebhookEvent, event_id: str) -> ReadyEvent | None:
        """An event with no media reference has nothing to fetch: its rewritten payload and its
        deliveries, made as the webhook arrives, so that the catalog records it ``ingested`` with
        its deliver jobs and no ingest job (:meth:`CatalogContract.record_webhook`). None for an
        event with media."""
        return None if event.media else self._ready(provider, event, event_id, [])

    def _ready(self, provider: Provider, event: WebhookEvent, event_id: str,
               outcomes: list[MediaOutcome]) -> ReadyEvent:
        """The rewritten payload for the bots (the provider's rewrite, thumbnails, and the
        ``gateway`` object: event id and a note per media not stored) and one ``deliver`` job per
        target that takes the event."""
        forward = self._with_thumbnails(provider.rewrite(event, outcomes), outcomes)
        forward = {**forward, "gateway": {
            "event_id": event_id,
            "notes": [{"path": o.ref.path, "error": o.error} for o in outcomes if o.error],
        }}
        followups = [
            ("deliver", f"deliver:{event_id}:{t.name}", {"event_id": event_id, "target": t.name})
            for t in self.settings.targets if not t.events or event.event in t.events
        ]
        if followups:  # their jobs exist only once this forward is committed with them
            self.forwards.remember(event_id, event.event, forward)
        return ReadyEvent(forward, followups)

    async def _ingest_ref(self, provider: Provider, event: WebhookEvent, event_id: str,
                          ref: MediaRef, last_attempt: bool, new: bool = False,
                          committed: asyncio.Future[bool] | None = None) -> Stored:
        """Store one reference of ``event``, unless its ``source_key`` is in the catalog already, or
        in :attr:`unrecorded` (stored here, its row not committed yet: linked again, and inserted
        by whichever completion commits first). ``new``: the first attempt at an attachment no
        other event named lately: the catalog is not looked up first (a copy stored meanwhile, by
        another replica or before a restart, still wins: the completion raises
        :class:`MediaTaken`, and :meth:`_revise` drops the new object)."""
        extra = {"event_id": event_id, "provider": provider.name}
        declared_category = category_for(ref.mimetype)  # metrics label until the content is sniffed
        if ref.error:
            log.info("media at %s not fetched: %s", ref.path, ref.error, extra=extra)
            self.metrics.media_outcome(provider.name, declared_category, "skipped")
            return Stored(MediaOutcome(ref, error=ref.error))
        async with self._locked(ref.source_key):
            unrecorded = self.unrecorded.get(ref.source_key)
            if unrecorded is not None:
                self.metrics.media_outcome(provider.name, unrecorded["category"], "duplicate")
                return Stored(self._outcome(ref, unrecorded), unrecorded)
            existing = None if new else await self.catalog.media_by_source(ref.source_key)
            if existing is not None:
                self.metrics.media_outcome(provider.name, existing["category"], "duplicate")
                return Stored(self._outcome(ref, existing))
            started = time.monotonic()
            try:
                record = await self._store(provider, event, event_id, ref, committed)
            except (MediaTooLarge, MediaRefused) as exc:
                reason = "too_large" if isinstance(exc, MediaTooLarge) else "refused"
                self.metrics.media_failures.labels(provider.name, reason).inc()
                self.metrics.media_outcome(provider.name, declared_category, "refused",
                                           seconds=time.monotonic() - started)
                log.warning("media at %s not stored: %s", ref.path, exc, extra=extra)
                return Stored(MediaOutcome(ref, error=str(exc)))
            except (FetchError, DigestMismatch) as exc:
                reason = "digest_mismatch" if isinstance(exc, DigestMismatch) else exc.reason
                self.metrics.media_failures.labels(provider.name, reason).inc()
                final = last_attempt or (isinstance(exc, FetchError) and not exc.retryable)
                self.metrics.media_outcome(provider.name, declared_category, "failed" if final else "retry",
                                           seconds=time.monotonic() - started)
                if final:
                    log.error("media at %s given up: %s; forwarding with the original link",
                              ref.path, exc, extra=extra)
                    return Stored(MediaOutcome(ref, error=str(exc)))
                raise
            self.unrecorded[ref.source_key] = record
            return Stored(self._outcome(ref, record), record)

    def _with_thumbnails(self, forward: dict[str, Any], outcomes: list[MediaOutcome]) -> dict[str, Any]:
        """``forward`` with a signed ``thumbnail`` link added to the ``gateway`` object the provider's
        rewrite put beside each stored image or sticker (at the ref's ``path``)."""
        for outcome in outcomes:
            if outcome.record is None or not has_thumbnail(outcome.record):
                continue
            path: list[str | int] = [int(p) if p.isdigit() else p for p in outcome.ref.path.split(".")]
            copied, node = copy_path(forward, path)
            if isinstance(node, dict) and isinstance(node.get("gateway"), dict):
                node["gateway"] = {**node["gateway"], "thumbnail": self.links.thumbnail_link(
                    outcome.record["id"], DEFAULT_SIZE)}
                forward = copied
        return forward

    def _outcome(self, ref: MediaRef, record: Mapping[str, Any]) -> MediaOutcome:
        return MediaOutcome(ref, record=dict(record), link=self.links.link(record["id"], record["filename"]))

    async def _store(self, provider: Provider, event: WebhookEvent, event_id: str,
                     ref: MediaRef, committed: asyncio.Future[bool] | None = None) -> MediaRow:
        """Fetch ``ref`` and stream it into storage; return the catalog row, not inserted yet.

        Raises :class:`FetchError`, :class:`MediaTooLarge`, :class:`DigestMismatch`,
        :class:`MediaRefused`, or a storage error.
        """
        started = time.monotonic()
        async with provider.fetch(ref) as src:
            origin = Origin(
                provider=provider.name, account=event.account, direction="inbound", chat=event.chat,
                message_id=event.message_id, event_id=event_id, source_key=ref.source_key,
                source_url=ref.url, declared_mimetype=ref.mimetype or src.mimetype,
                declared_size=src.size, declared_sha256=ref.sha256 or src.sha256,
                filename=ref.filename or src.filename)
            # the row goes in with the job's completion, which records the rewritten payload linking it
            record = await self.media_store.put_object(_body_errors_as_fetch_errors(src.chunks), origin,
                                                       committed=committed)
        self.metrics.media_outcome(provider.name, record["category"], "stored",
                                   seconds=time.monotonic() - started, size=record["size"])
        return record


@contextmanager
def _storage_errors() -> Iterator[None]:
    """Storage trouble as the job queue takes it: an invalid object key (the settings' template)
    is :class:`PermanentError`, an unavailable storage :class:`RetryLater`."""
    try:
        yield
    except InvalidKey as exc:
        raise PermanentError(f"media.key_template gave an invalid object key: {exc}") from exc
    except StorageError as exc:
        raise RetryLater(f"storage unavailable: {exc}") from exc


def _log_abandoned(task: asyncio.Task[list[Stored]]) -> None:
    """Retrieve the outcome of an abandoned early ingest (:meth:`Ingestor.abandon`)."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, NotCommitted):
        log.info("media stored ahead of a webhook that was not committed: %s", exc)


async def _body_errors_as_fetch_errors(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Yield ``chunks``; a body that breaks or stalls part-way (aiohttp payload or connection
    error, ``TimeoutError``) raises a retryable :class:`FetchError` like any failed download,
    whichever provider plugin opened it (the shared reader already does so; this is the host's
    guarantee for every plugin)."""
    it = chunks.__aiter__()
    while True:
        try:
            chunk = await anext(it)
        except StopAsyncIteration:
            return
        except BODY_ERRORS as exc:
            raise FetchError(f"download broke off: {type(exc).__name__}: {exc}", reason="interrupted") from exc
        yield chunk
