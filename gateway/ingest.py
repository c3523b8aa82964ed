"""The inbound pipeline (DESIGN §2): for each media reference of an event, fetch from the provider,
hash, count and sniff while streaming into storage, write the catalog row, rewrite the payload and
enqueue one delivery per bot target.

Idempotent: a reference whose ``source_key`` is already in the catalog is not fetched again, so a
retried job, a redelivered webhook or the same message in two events stores one object.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pluggy

from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.jobs import Job, JobResult, PermanentError, RetryLater
from gateway.links import LinkSigner
from gateway.media import (
    DigestMismatch,
    MediaStream,
    MediaTooLarge,
    decide_type,
    extension_for,
    new_media_id,
    object_key,
    safe_filename,
    sniff,
)
from gateway.metrics import Metrics
from gateway.plugins import await_me_maybe
from gateway.providers import FetchError, MediaOutcome, MediaRef, Provider, WebhookEvent
from gateway.storage import InvalidKey, StorageBackend, StorageError

log = logging.getLogger("gateway.ingest")


class MediaRefused(Exception):
    """Policy refused the attachment (type mismatch under ``reject``, or a ``check_media`` hook)."""


class Ingestor:
    """Handler of ``ingest`` jobs (payload ``{"event_id": ...}``)."""

    def __init__(self, settings: Settings, catalog: Catalog, storage: StorageBackend,
                 providers: dict[str, Provider], links: LinkSigner, metrics: Metrics,
                 pm: pluggy.PluginManager):
        self.settings = settings
        self.catalog = catalog
        self.storage = storage
        self.providers = providers
        self.links = links
        self.metrics = metrics
        self.pm = pm
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

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
        row = await self.catalog.get_event(event_id)
        if row is None:
            raise PermanentError(f"event {event_id} is not in the catalog")
        provider = self.providers.get(row["provider"])
        if provider is None:
            raise PermanentError(f"provider {row['provider']!r} is not enabled")
        event = WebhookEvent(
            idempotency_key=row["idempotency_key"], event=row["event"], account=row["account"] or "",
            payload=row["payload"], media=[MediaRef.from_dict(m) for m in row["media"] or []],
            chat=row["chat"], message_id=row["message_id"],
        )
        try:
            outcomes = [await self._ingest_ref(provider, event, event_id, ref, job.last_attempt)
                        for ref in event.media]
        except InvalidKey as exc:
            raise PermanentError(f"media.key_template gave an invalid object key: {exc}") from exc
        except StorageError as exc:
            raise RetryLater(f"storage unavailable: {exc}") from exc
        forward = provider.rewrite(event, outcomes)
        forward = {**forward, "gateway": {
            "event_id": event_id,
            "notes": [{"path": o.ref.path, "error": o.error} for o in outcomes if o.error],
        }}
        followups = [
            ("deliver", f"deliver:{event_id}:{t.name}", {"event_id": event_id, "target": t.name})
            for t in self.settings.targets if not t.events or event.event in t.events
        ]
        notes = [o.error for o in outcomes if o.error]
        return JobResult(followups, (event_id, {"forward": forward, "state": "ingested",
                                                "notes": notes or None}))

    async def _ingest_ref(self, provider: Provider, event: WebhookEvent, event_id: str,
                          ref: MediaRef, last_attempt: bool) -> MediaOutcome:
        extra = {"event_id": event_id, "provider": provider.name}
        if ref.error:
            log.info("media at %s not fetched: %s", ref.path, ref.error, extra=extra)
            return MediaOutcome(ref, error=ref.error)
        async with self._locked(ref.source_key):
            existing = await self.catalog.media_by_source(ref.source_key)
            if existing is not None:
                return self._outcome(ref, existing)
            try:
                record = await self._store(provider, event, event_id, ref)
            except (MediaTooLarge, MediaRefused) as exc:
                reason = "too_large" if isinstance(exc, MediaTooLarge) else "refused"
                self.metrics.media_failures.labels(provider.name, reason).inc()
                log.warning("media at %s not stored: %s", ref.path, exc, extra=extra)
                return MediaOutcome(ref, error=str(exc))
            except (FetchError, DigestMismatch) as exc:
                reason = "digest_mismatch" if isinstance(exc, DigestMismatch) else exc.reason
                self.metrics.media_failures.labels(provider.name, reason).inc()
                final = last_attempt or (isinstance(exc, FetchError) and not exc.retryable)
                if final:
                    log.error("media at %s given up: %s; forwarding with the original link",
                              ref.path, exc, extra=extra)
                    return MediaOutcome(ref, error=str(exc))
                raise
            return self._outcome(ref, record)

    def _outcome(self, ref: MediaRef, record: dict[str, Any]) -> MediaOutcome:
        return MediaOutcome(ref, record=record, link=self.links.link(record["id"], record["filename"]))

    async def _store(self, provider: Provider, event: WebhookEvent, event_id: str,
                     ref: MediaRef) -> dict[str, Any]:
        """Fetch ``ref`` and stream it into storage; return the catalog row.

        Raises :class:`FetchError`, :class:`MediaTooLarge`, :class:`DigestMismatch`,
        :class:`MediaRefused`, or a storage error.
        """
        max_bytes = self.settings.media.max_bytes
        started = time.monotonic()
        async with provider.fetch(ref) as src:
            if src.size is not None and src.size > max_bytes:
                raise MediaTooLarge(max_bytes)
            stream = MediaStream(src.chunks, max_bytes, expected_sha256=ref.sha256 or src.sha256)
            head = await stream.read_head()
            sniffed = await asyncio.to_thread(sniff, head)
            declared = ref.mimetype or src.mimetype
            decision = decide_type(sniffed, declared, ref.filename or src.filename)
            if decision.mismatch:
                log.warning("media at %s declared %s but the content is %s", ref.path, declared,
                            sniffed, extra={"event_id": event_id, "provider": provider.name})
                if self.settings.media.type_mismatch == "reject":
                    raise MediaRefused(f"content is {sniffed}, declared {declared}: refused by policy")
            media_id = new_media_id()
            ext = extension_for(decision.mimetype)
            filename = safe_filename(ref.filename or src.filename, fallback=f"{media_id}{ext}")
            info = {"provider": provider.name, "account": event.account, "mimetype": decision.mimetype,
                    "declared_mimetype": decision.declared, "category": decision.category,
                    "filename": filename, "type_mismatch": decision.mismatch, "head": head}
            for reason in self.pm.hook.check_media(info=info):
                if reason:
                    raise MediaRefused(f"refused by policy: {reason}")
            key = object_key(self.settings.media.key_template, provider=provider.name,
                             account=event.account or "_", category=decision.category,
                             media_id=media_id, ext=ext)
            metadata = {"media-id": media_id, "filename": filename}
            put = await self.storage.put(key, _sealing(stream, metadata), decision.mimetype, metadata,
                                         category=decision.category)
        record = {
            "id": media_id, "sha256": stream.sha256, "size": stream.size,
            "mimetype": decision.mimetype, "declared_mimetype": decision.declared,
            "category": decision.category, "filename": filename, "backend": self.storage.name,
            "bucket": put.bucket, "key": key, "provider": provider.name, "account": event.account,
            "chat": event.chat, "message_id": event.message_id, "direction": "inbound",
            "source_key": ref.source_key, "source_url": ref.url, "event_id": event_id,
            "created_at": time.time(), "expires_at": None, "tenant": None, "is_public": 0,
            "extra": {"type_mismatch": True, "sniffed": decision.sniffed} if decision.mismatch else None,
        }
        record, inserted = await self.catalog.insert_media(record)
        if not inserted:  # another worker stored the same attachment first: keep one object
            await self.storage.delete(key, bucket=put.bucket)
            return record
        self.metrics.media_stored.labels(provider.name, decision.category).inc()
        self.metrics.media_stored_bytes.labels(provider.name, decision.category).inc(stream.size)
        self.metrics.fetch_duration.labels(provider.name).observe(time.monotonic() - started)
        log.info("stored %s (%s, %d bytes) at %s", media_id, decision.mimetype, stream.size, key,
                 extra={"event_id": event_id, "provider": provider.name, "media_id": media_id})
        for result in self.pm.hook.media_stored(record=record):
            await await_me_maybe(result)
        return record


async def _sealing(stream: MediaStream, metadata: dict[str, str]):
    """Yield ``stream``; once it ends (digest checked), add ``sha256`` to ``metadata``.

    Backends read ``metadata`` after the stream is exhausted (see ``StorageBackend.put``).
    """
    async for chunk in stream:
        yield chunk
    metadata["sha256"] = stream.sha256 or ""
