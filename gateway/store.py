"""Storing one media stream (DESIGN §5): the single path every inbound and outbound file takes.

Hash, count and limit while streaming; sniff the first bytes; reconcile the declared type; ask
the policy hooks; render the object key; ``storage.put``; then write the catalog row (after the
object, so a row never points at nothing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pluggy

from gateway.catalog import CatalogContract, exact_time
from gateway.catalog.rows import MediaRow
from gateway.config import Settings
from gateway.media import (
    MediaStream,
    MediaTooLarge,
    decide_type,
    extension_for,
    new_media_id,
    object_key,
    safe_filename,
    sniff,
    sniff_here,
)
from gateway.plugins import check_media, notify
from gateway.sdk.hooks import MediaInfo
from gateway.sdk.outbound import Origin
from gateway.sdk.storage import StorageBackend
from gateway.thumbnails import delete_thumbnails

log = logging.getLogger("gateway.store")


class MediaRefused(Exception):
    """Policy refused the attachment (type mismatch under ``reject``, or a ``check_media`` hook)."""


class NotCommitted(Exception):
    """The object was stored ahead of its webhook's commit, and the webhook was not committed (a
    duplicate, or the catalog failed): the object was deleted again and has no row."""


SERVED_ROWS = 4096
"""Media rows :class:`MediaRows` keeps at most."""
SERVED_ROW_TTL = 5.0
"""Seconds :class:`MediaRows` keeps a row: how long another replica sharing the catalog may still
serve an object this one changed or deleted."""


class MediaRows:
    """The catalog rows of recently served media, so that serving a hot object (``/media``,
    ``/public``) costs no catalog round-trip: at most ``size`` rows, each for ``ttl`` seconds
    (``clock``: monotonic seconds), the least recently used dropped first. Unknown ids are not
    kept. This process forgets a row as it changes or deletes it (:meth:`MediaStore.update`,
    :meth:`MediaStore.delete`, the retention cleanup); another replica sharing the catalog sees
    the change at most ``ttl`` seconds later. The rows returned are shared: never change them."""

    def __init__(self, catalog: CatalogContract, size: int = SERVED_ROWS, ttl: float = SERVED_ROW_TTL,
                 clock: Callable[[], float] = time.monotonic):
        self.catalog = catalog
        self.size = size
        self.ttl = ttl
        self.clock = clock
        self._rows: OrderedDict[str, tuple[float, MediaRow]] = OrderedDict()
        self._forgotten = 0  # bumped by forget(): a lookup that overlapped one keeps nothing

    async def get(self, media_id: str) -> MediaRow | None:
        """The row of ``media_id`` (``None``: no such row), from memory while it is fresh."""
        hit = self._rows.get(media_id)
        if hit is not None:
            if hit[0] > self.clock():
                self._rows.move_to_end(media_id)
                return hit[1]
            del self._rows[media_id]
        forgotten = self._forgotten
        record = await self.catalog.get_media(media_id)
        if record is not None and forgotten == self._forgotten:
            self._rows[media_id] = (self.clock() + self.ttl, record)
            if len(self._rows) > self.size:
                self._rows.popitem(last=False)
        return record

    def forget(self, media_ids: Iterable[str]) -> None:
        """Drop these rows: call it right after changing them in the catalog (or claiming them
        for deletion), so that no lookup that overlapped the change keeps the old row."""
        self._forgotten += 1
        for media_id in media_ids:
            self._rows.pop(media_id, None)


HOT_FILES = 256
"""Small local files :class:`HotFiles` keeps open at most (fewer under a low open-files limit:
:func:`hot_files_for_limit`)."""
HOT_FILE_BYTES = 128 * 1024
"""The largest file :class:`HotFiles` keeps (its bytes in memory: 32 MiB at most in all)."""


def hot_files_for_limit() -> int:
    """How many files :class:`HotFiles` may keep open in this process: :data:`HOT_FILES`, but at
    most an eighth of the soft open-files limit (``RLIMIT_NOFILE``), so that kept files never take
    the descriptors connections need (128 under the common default of 1024)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return HOT_FILES
    return HOT_FILES if soft == resource.RLIM_INFINITY else max(0, min(HOT_FILES, soft // 8))


class HotFiles:
    """The small local files served lately (up to ``size_limit`` bytes each, at most ``count``;
    default :func:`hot_files_for_limit`),
    kept open with their bytes for ``ttl`` seconds after their last use (``clock``: monotonic
    seconds), so that serving a hot object costs one ``fstat`` instead of an ``open`` (a path
    walk), a read and a ``close``: three quarters of the file system work of a 50 KiB answer
    (nginx's ``open_file_cache`` does the same). An entry is used only while its file is still the
    object: not deleted or replaced (a link count above 0) and its size and modification time
    unchanged; else it is dropped and the path opened again, so a deleted object answers 404 at
    once. Expired entries are closed by a timer, so a deleted file's space is not held longer.
    Use on the event loop only."""

    def __init__(self, count: int | None = None, size_limit: int = HOT_FILE_BYTES, ttl: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.count = hot_files_for_limit() if count is None else count
        self.size_limit = size_limit
        self.ttl = ttl
        self.clock = clock
        #: path -> (fd, size, mtime in ns, bytes, expiry), least recently used first
        self._files: OrderedDict[str, tuple[int, int, int, bytes, float]] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None

    def get(self, path: str) -> bytes | None:
        """The bytes of the file at ``path`` if kept and still current, else None."""
        entry = self._files.get(path)
        if entry is None:
            return None
        fd, size, mtime_ns, body, expires = entry
        now = self.clock()
        try:
            st = os.fstat(fd)
        except OSError:
            st = None
        if expires <= now or st is None or st.st_nlink == 0 or st.st_size != size or st.st_mtime_ns != mtime_ns:
            self._drop(path)
            return None
        self._files[path] = (fd, size, mtime_ns, body, now + self.ttl)
        self._files.move_to_end(path)
        return body

    def keep(self, path: str, fd: int, st: os.stat_result, body: bytes) -> bool:
        """Keep the open file ``fd`` at ``path`` (``st``: its ``fstat``) with its whole ``body``:
        True if kept (the caller must not close ``fd`` then), False if it is too big."""
        if len(body) > self.size_limit or len(body) != st.st_size or self.count <= 0:
            return False
        if path in self._files:
            self._drop(path)
        self._files[path] = (fd, st.st_size, st.st_mtime_ns, body, self.clock() + self.ttl)
        while len(self._files) > self.count:
            self._drop(next(iter(self._files)))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.ttl, self._expire)
        return True

    def close(self) -> None:
        """Close every kept file (at shutdown)."""
        for path in list(self._files):
            self._drop(path)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __len__(self) -> int:
        return len(self._files)

    def _expire(self) -> None:
        self._timer = None
        now = self.clock()
        while self._files:
            path, entry = next(iter(self._files.items()))
            if entry[4] > now:  # least recently used first: the rest are younger
                break
            self._drop(path)
        if self._files:
            self._timer = asyncio.get_running_loop().call_later(self.ttl, self._expire)

    def _drop(self, path: str) -> None:
        fd = self._files.pop(path)[0]
        try:
            os.close(fd)
        except OSError:
            pass


class MediaStore:
    """Streams media into the storage backend and the catalog, and changes and deletes its rows
    (keeping :attr:`rows`, the rows the serving path reads, current). Counting is the caller's
    (ingest counts ingested media, outbound counts sends)."""

    def __init__(self, settings: Settings, catalog: CatalogContract, storage: StorageBackend,
                 pm: pluggy.PluginManager):
        self.settings = settings
        self.catalog = catalog
        self.storage = storage
        self.pm = pm
        self.rows = MediaRows(catalog)
        #: The small local files served lately, kept open (the serving path's; closed at shutdown).
        self.files = HotFiles()

    async def store(self, chunks: AsyncIterator[bytes], origin: Origin) -> tuple[MediaRow, bool]:
        """Store ``chunks`` (:meth:`put_object`) and insert its catalog row; return ``(catalog row,
        created)``. ``created`` is False when ``origin.source_key`` was stored meanwhile by someone
        else: then that row is returned and the new object deleted again. The ``media_stored``
        hooks run for a created row (:meth:`stored`).

        Raises as :meth:`put_object`.
        """
        ours = await self.put_object(chunks, origin)
        record, inserted = await self.catalog.insert_media(ours)
        if not inserted:  # another worker stored the same attachment first: keep one object
            await self.drop(ours)
            return record, False
        await self.stored(record)
        return record, True

    async def put_object(self, chunks: AsyncIterator[bytes], origin: Origin,
                         committed: asyncio.Future[bool] | None = None) -> MediaRow:
        """Stream ``chunks`` into storage (hashed, counted, limited, sniffed, checked by the policy
        hooks) and return the catalog row for the new object, not inserted: the caller inserts it
        (:meth:`CatalogContract.insert_media`, or with its job's completion), then calls
        :meth:`stored`, or calls :meth:`drop` for the object. ``committed``: the object is stored while
        its webhook's commit runs, and the row waits for this future: on False the object is
        deleted again and :class:`NotCommitted` raised.

        Raises :class:`gateway.media.MediaTooLarge`, :class:`gateway.media.DigestMismatch`
        (``declared_sha256`` hex differs), :class:`MediaRefused`, and storage errors.
        """
        max_bytes = self.settings.media.max_bytes
        if origin.declared_size is not None and origin.declared_size > max_bytes:
            raise MediaTooLarge(max_bytes)
        stream = MediaStream(chunks, max_bytes, expected_sha256=origin.declared_sha256)
        head = await stream.read_head()
        sniffed = sniff(head) if sniff_here(head) else await asyncio.to_thread(sniff, head)
        decision = decide_type(sniffed, origin.declared_mimetype, origin.filename)
        if decision.mismatch:
            log.warning("media declared %s but the content is %s", origin.declared_mimetype, sniffed,
                        extra={"event_id": origin.event_id, "provider": origin.provider})
            if self.settings.media.type_mismatch == "reject":
                raise MediaRefused(f"content is {sniffed}, declared {origin.declared_mimetype}: refused by policy")
        category_mismatch = origin.declared_category not in (None, decision.category)
        if category_mismatch:
            log.warning("media declared category %s but the content is %s (category %s)",
                        origin.declared_category, sniffed, decision.category,
                        extra={"event_id": origin.event_id, "provider": origin.provider})
            if self.settings.media.type_mismatch == "reject":
                raise MediaRefused(f"content is {sniffed} (category {decision.category}), declared category "
                                   f"{origin.declared_category}: refused by policy")
        media_id = new_media_id()
        ext = extension_for(decision.mimetype)
        filename = safe_filename(origin.filename, fallback=f"{media_id}{ext}")
        info: MediaInfo = {"provider": origin.provider, "account": origin.account, "mimetype": decision.mimetype,
                "declared_mimetype": decision.declared, "category": decision.category,
                "filename": filename, "type_mismatch": decision.mismatch, "head": head}
        reason = await check_media(self.pm, info)
        if reason:
            raise MediaRefused(f"refused by policy: {reason}")
        key = object_key(self.settings.media.key_template, provider=origin.provider,
                         account=origin.account or "_", category=decision.category,
                         media_id=media_id, ext=ext)
        metadata = {"media-id": media_id, "filename": filename}
        put = await self.storage.put(key, _sealing(stream, metadata), decision.mimetype, metadata,
                                     category=decision.category)
        assert stream.sha256 is not None  # the stream was read to its end by put()
        record: MediaRow = {
            "id": media_id, "sha256": stream.sha256, "size": stream.size,
            "mimetype": decision.mimetype, "declared_mimetype": decision.declared,
            "category": decision.category, "filename": filename, "backend": self.storage.name,
            "bucket": put.bucket, "key": key, "provider": origin.provider, "account": origin.account,
            "chat": origin.chat, "message_id": origin.message_id, "direction": origin.direction,
            "source_key": origin.source_key, "source_url": origin.source_url, "event_id": origin.event_id,
            "created_at": exact_time(time.time()), "expires_at": exact_time(origin.expires_at),
            "tenant": origin.tenant, "is_public": int(origin.is_public),
            "extra": _extra(decision, origin.declared_category if category_mismatch else None, origin.metadata),
        }
        if committed is not None and not await committed:
            await self.drop(record)
            raise NotCommitted(f"the webhook of event {origin.event_id} was not committed")
        return record

    async def stored(self, record: MediaRow) -> None:
        """Log the row inserted for a new object and run the ``media_stored`` hooks (once its
        insert is committed)."""
        log.info("stored %s (%s, %d bytes) at %s", record["id"], record["mimetype"], record["size"], record["key"],
                 extra={"event_id": record.get("event_id"), "provider": record.get("provider"),
                        "media_id": record["id"]})
        await notify(self.pm, "media_stored", record=record)

    async def drop(self, record: MediaRow) -> None:
        """Delete the object of a row that was not inserted (a copy of an attachment already
        recorded). Raises storage errors."""
        await self.storage.delete(record["key"], bucket=record.get("bucket"))

    async def update(self, media_id: str, values: dict[str, Any]) -> MediaRow | None:
        """Change columns ``values`` of a media row (none: just read it); return the row as it is
        now, or ``None`` if there is none. The caller notifies ``media_updated``."""
        if values:
            await self.catalog.update_media(media_id, values)
            self.rows.forget([media_id])  # after the change: a lookup overlapping it keeps nothing
        return await self.catalog.get_media(media_id)

    async def delete(self, media_id: str) -> MediaRow | None:
        """Delete a stored object and its thumbnails, then its catalog row (``media_deleted`` hooks run); return the
        row, or ``None`` when there is no such row or another deletion has it.

        Raises storage errors: the row then stays marked ``deleting`` for the next cleanup."""
        claimed = await self.catalog.claim_media_for_delete(media_id, time.time())
        self.rows.forget([media_id])  # after the claim: a lookup overlapping it keeps nothing
        if claimed is None:
            return None
        await self.storage.delete(claimed["key"], bucket=claimed["bucket"])
        await delete_thumbnails(self.storage, claimed)
        await self.catalog.forget_media([claimed["id"]])
        await notify(self.pm, "media_deleted", record=claimed)
        return claimed


def _extra(decision: Any, declared_category: str | None, metadata: dict[str, Any] | None
           ) -> dict[str, Any] | None:
    extra: dict[str, Any] = {}
    if decision.mismatch or declared_category:
        extra.update(type_mismatch=True, sniffed=decision.sniffed)
    if declared_category:
        extra["declared_category"] = declared_category
    if metadata:
        extra["metadata"] = metadata
    return extra or None


async def _sealing(stream: MediaStream, metadata: dict[str, str]) -> AsyncIterator[bytes]:
    """Yield ``stream``; once it ends (digest checked), add ``sha256`` to ``metadata``.

    Backends read ``metadata`` after the stream is exhausted (see ``StorageBackend.put``).
    """
    async for chunk in stream:
        yield chunk
    metadata["sha256"] = stream.sha256 or ""
