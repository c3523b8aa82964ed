"""The storage-backend contract (DESIGN §4). Implementations live in ``plugins/storage_*``.

A backend stores opaque objects under object keys (``a/b/c.jpg``: ``/``-separated, no ``..``, no
leading ``/``). Every method streams: nothing holds a whole object in memory.

Errors. Every failure a backend raises is a :class:`StorageError`; the host decides what to do
by its class:

- :class:`StorageError` itself means *unavailable*: the backend is unreachable, out of space or
  answered an I/O error. The host retries later (the job is deferred, never dead) and the HTTP API
  answers 503.
- :class:`ObjectNotFound`: no object at that key (404; never retried).
- :class:`InvalidKey`: the key is not allowed: a bug or a bad ``media.key_template``, not an
  outage, so the host never retries it (the ingest job fails permanently). It is still a
  :class:`StorageError` (and a ``ValueError``) so that a caller catching every storage failure
  (``except StorageError``) cannot let one escape as a 5xx traceback; callers that retry catch
  :class:`InvalidKey` *before* :class:`StorageError`, as ``gateway.ingest`` does.

Backends are tested by the shared contract suite :mod:`gateway.sdk.testing` (a pytest plugin).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, runtime_checkable


class StorageError(Exception):
    """A backend operation failed (I/O error, backend unreachable, disk full): the storage is
    unavailable, retry later. The base of every storage error; see the module docstring for
    which subclasses are not retried."""


class ObjectNotFound(StorageError):
    """No object at that key (HTTP 404; not retried)."""


class InvalidKey(StorageError, ValueError):
    """The object key is not allowed (absolute, ``..``, NUL, empty segment). A bug, not an outage:
    never retried (callers catch it before :class:`StorageError`, its base; see the module
    docstring for why it is one)."""


@dataclass(frozen=True, slots=True)
class PutResult:
    """What :meth:`StorageBackend.put` stored: ``size`` in bytes; ``etag`` when the backend has one."""

    key: str
    size: int
    etag: str | None = None
    bucket: str | None = None


@dataclass(frozen=True, slots=True)
class IncompleteUpload:
    """An upload a backend began and neither completed nor aborted (a crash or an outage in the
    middle of a multipart upload): its object ``key``, the backend's ``upload_id``, when it
    ``started`` (epoch seconds) and its ``bucket``."""

    key: str
    upload_id: str
    started: float
    bucket: str | None = None


@dataclass(frozen=True, slots=True)
class ObjectStat:
    """An object's size in bytes, content type, modification time (epoch seconds) and metadata."""

    key: str
    size: int
    content_type: str | None
    modified: float
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class OpenedObject:
    """A readable object or byte range of it.

    ``start``/``end`` are the first and last byte (inclusive) of ``chunks``; ``size`` is the whole
    object's size. ``chunks`` yields ``bytes``; call :meth:`close` (or exhaust it) to release it.
    """

    key: str
    size: int
    start: int
    end: int
    content_type: str | None
    chunks: AsyncIterator[bytes]

    @property
    def length(self) -> int:
        """Bytes in this range."""
        return max(0, self.end - self.start + 1)

    async def close(self) -> None:
        """Release the underlying file or connection (idempotent)."""
        aclose = getattr(self.chunks, "aclose", None)
        if aclose is not None:
            await aclose()


FILE_READ_BYTES = 256 * 1024
"""Bytes :func:`file_range` reads at a time."""


async def file_range(fh: BinaryIO, first: int, last: int, chunk: int = FILE_READ_BYTES) -> AsyncIterator[bytes]:
    """Bytes ``first``..``last`` (inclusive) of the open file ``fh``, read ``chunk`` bytes at a
    time in worker threads (never on the event loop), for an :class:`OpenedObject`'s ``chunks``;
    closes ``fh`` when done or closed early. A file shorter than ``last`` ends early."""
    try:
        await asyncio.to_thread(fh.seek, first)
        left = last - first + 1
        while left > 0:
            data = await asyncio.to_thread(fh.read, min(chunk, left))
            if not data:
                break
            left -= len(data)
            yield data
    finally:
        await asyncio.to_thread(fh.close)


@runtime_checkable
class StorageBackend(Protocol):
    """A storage backend plugin object (returned by the ``register_storage`` hook).

    ``name`` is the value of ``storage.backend`` that selects it. ``bucket`` arguments name where
    :meth:`put` stored an object (its ``PutResult.bucket``, kept in the catalog); ``None`` means the
    backend's default, and backends without buckets ignore it. Resources are opened in
    :meth:`start` and released in :meth:`close` (the host calls both from the app's cleanup_ctx).
    """

    name: str

    async def start(self) -> None:
        """Open clients, create directories or buckets."""

    async def close(self) -> None:
        """Release what :meth:`start` opened."""

    async def put(
        self,
        key: str,
        stream: AsyncIterator[bytes],
        content_type: str,
        metadata: dict[str, str],
        category: str | None = None,
    ) -> PutResult:
        """Store ``stream`` atomically at ``key``: readers see the whole object or none.

        ``metadata`` (``filename``, ``media-id``, ...) is read only after ``stream`` is exhausted:
        the host adds ``sha256`` to it when the stream ends. ``category`` lets a backend route
        objects (e.g. a bucket per category). If ``stream`` raises, nothing is left behind and the
        exception propagates. Raises :class:`InvalidKey`, :class:`StorageError`.
        """

    async def open(self, key: str, start: int | None = None, end: int | None = None,
                   bucket: str | None = None) -> OpenedObject:
        """Open ``key`` for streaming, optionally bytes ``start``..``end`` (inclusive).

        Raises :class:`ObjectNotFound`, :class:`InvalidKey`, :class:`StorageError`.
        """

    async def stat(self, key: str, bucket: str | None = None) -> ObjectStat:
        """Size, type and metadata. Raises :class:`ObjectNotFound`."""

    async def delete(self, key: str, bucket: str | None = None) -> bool:
        """Delete ``key``; ``True`` if it existed."""

    def list(self, prefix: str = "") -> AsyncIterator[ObjectStat]:
        """Every object whose key starts with ``prefix``, in no particular order, across all the
        backend's buckets. Each :class:`ObjectStat`'s ``metadata`` holds the object's ``bucket``
        (``metadata["bucket"]``) when the backend has buckets, so the caller can pass it back to
        :meth:`open`, :meth:`stat` and :meth:`delete` (the retention sweep of orphans does).
        Raises :class:`StorageError`."""

    async def url(self, key: str, expires: int, filename: str | None = None,
                  bucket: str | None = None, content_type: str | None = None) -> str | None:
        """A direct (presigned) URL valid ``expires`` seconds, or ``None`` if the backend has none.
        ``filename`` and ``content_type`` shape the download's Content-Disposition."""

    async def check(self) -> None:
        """Raise :class:`StorageError` if the backend is not reachable or cannot take writes
        (e.g. a full disk; used by ``/readyz``)."""

    # Optional: ``async def free_bytes(self) -> int``, the free bytes where the backend writes
    # (raises StorageError if it cannot tell). The host exports it as gateway_storage_free_bytes;
    # backends that cannot tell (S3) leave it out. A full backend raises StorageError from put,
    # so that the job is deferred, never dead.


@runtime_checkable
class IncompleteUploads(Protocol):
    """Optional part of a storage backend whose uploads can be left half done by a crash or an
    outage and keep using space (multipart uploads): the retention cleanup lists them and
    aborts the gateway's once they are older than its grace period."""

    def incomplete_uploads(self, prefix: str = "") -> AsyncIterator[IncompleteUpload]:
        """Every upload under ``prefix`` neither completed nor aborted. Raises :class:`StorageError`."""

    async def abort_upload(self, upload: IncompleteUpload) -> None:
        """Abort ``upload`` and free what it holds (already gone is fine). Raises :class:`StorageError`."""


@runtime_checkable
class LocalFiles(Protocol):
    """Optional part of a storage backend whose objects are plain files on a local filesystem
    (DESIGN §5: ``open`` streams, "or gives a file path the web layer can sendfile"). The host
    then serves an object with the kernel's ``sendfile`` from that file, sending its own headers
    (ETag, Range, Content-Type from the catalog row) instead of calling :meth:`StorageBackend.open`."""

    def local_path(self, key: str, bucket: str | None = None) -> str | None:
        """The absolute path of the file holding exactly the bytes of ``key`` (no sidecar, no
        encoding), or ``None`` when this object is not a local file (the host then uses
        :meth:`StorageBackend.open`). Called once per request on the event loop, so it does no
        slow I/O (no sidecar read, no path resolution per call) and does not check that the
        file exists: the host opens it without following a symlink at its last component, and
        a missing file is a missing object (404). Raises :class:`InvalidKey` for a key that
        could leave the backend's root."""
