"""The ``flat`` :class:`gateway.sdk.StorageBackend`: a flat directory and a JSON index (see the
package docstring for the layout)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

from gateway.sdk import (
    InvalidKey,
    ObjectNotFound,
    ObjectStat,
    OpenedObject,
    PutResult,
    StorageError,
    file_range,
)

READ_CHUNK = 256 * 1024  # bytes per read


def check_key(key: str) -> str:
    """``key`` if it is an allowed object key, else :class:`InvalidKey` (absolute, ``..``, NUL,
    empty segment)."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\x00" in key or any(p in ("", ".", "..") for p in parts):
        raise InvalidKey(f"invalid object key {key!r}")
    return key


class FlatStorage:
    """Objects under ``<root>/objects/<sha256(key)>``, described by ``<root>/index.json``."""

    name = "flat"

    def __init__(self, root: Path):
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.index_path = root / "index.json"
        self._index: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()  # one index writer at a time

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the directories and load the index. Raises :class:`StorageError`."""
        def _start() -> dict[str, dict[str, Any]]:
            self.objects.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
            if not self.index_path.exists():
                return {}
            index: dict[str, dict[str, Any]] = json.loads(self.index_path.read_text())
            return index
        try:
            self._index = await asyncio.to_thread(_start)
        except (OSError, ValueError) as exc:
            raise StorageError(f"flat storage at {self.root}: {exc}") from exc

    async def close(self) -> None:
        """Nothing stays open between calls."""

    async def check(self) -> None:
        """Raise :class:`StorageError` unless the directory is writable."""
        if not await asyncio.to_thread(os.access, self.objects, os.W_OK):
            raise StorageError(f"flat storage at {self.root} is not writable")

    # -- the index --------------------------------------------------------------------------
    def _file(self, key: str) -> Path:
        return self.objects / hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()

    def _entry(self, key: str) -> dict[str, Any]:
        entry = self._index.get(check_key(key))
        if entry is None:
            raise ObjectNotFound(key)
        return entry

    def _save_index(self, index: dict[str, dict[str, Any]]) -> None:
        """Write ``index`` atomically (a temporary file renamed over the old one)."""
        tmp = self.tmp / f"index.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(index))
        os.replace(tmp, self.index_path)

    # -- objects ----------------------------------------------------------------------------
    async def put(self, key: str, stream: AsyncIterator[bytes], content_type: str,
                  metadata: dict[str, str], category: str | None = None) -> PutResult:
        """Stream into a temporary file, then rename it into place and record it in the index.
        ``metadata`` is read once ``stream`` is exhausted. If ``stream`` raises, the temporary
        file is removed and the exception propagates. Raises :class:`InvalidKey`,
        :class:`StorageError`."""
        check_key(key)
        tmp = self.tmp / uuid.uuid4().hex
        size = 0
        try:
            fh: BinaryIO = await asyncio.to_thread(open, tmp, "wb")
        except OSError as exc:
            raise StorageError(f"flat storage: {exc}") from exc
        try:
            try:
                async for chunk in stream:
                    size += len(chunk)
                    await asyncio.to_thread(fh.write, chunk)
            finally:
                await asyncio.to_thread(fh.close)
            entry = {"size": size, "content_type": content_type, "modified": time.time(),
                     "metadata": dict(metadata), "file": self._file(key).name}
            async with self._lock:
                await asyncio.to_thread(os.replace, tmp, self._file(key))
                index = {**self._index, key: entry}
                await asyncio.to_thread(self._save_index, index)
                self._index = index
        except OSError as exc:
            raise StorageError(f"flat storage: {exc}") from exc
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
        return PutResult(key=key, size=size)

    async def open(self, key: str, start: int | None = None, end: int | None = None,
                   bucket: str | None = None) -> OpenedObject:
        """Stream bytes ``start``..``end`` (inclusive; default the whole object). Raises
        :class:`ObjectNotFound`, :class:`InvalidKey`, :class:`StorageError`."""
        entry = self._entry(key)
        size = int(entry["size"])
        first = start or 0
        last = size - 1 if end is None else min(end, size - 1)
        try:
            fh: BinaryIO = await asyncio.to_thread(open, self._file(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise StorageError(f"flat storage: {exc}") from exc
        return OpenedObject(key=key, size=size, start=first, end=last, content_type=entry["content_type"],
                            chunks=file_range(fh, first, last, READ_CHUNK))

    async def stat(self, key: str, bucket: str | None = None) -> ObjectStat:
        """Size, type, modification time and metadata from the index. Raises :class:`ObjectNotFound`."""
        entry = self._entry(key)
        return ObjectStat(key=key, size=entry["size"], content_type=entry["content_type"],
                          modified=entry["modified"], metadata=dict(entry["metadata"]))

    async def delete(self, key: str, bucket: str | None = None) -> bool:
        """Remove ``key`` from the index, then its file; ``True`` if it existed."""
        check_key(key)
        async with self._lock:
            if key not in self._index:
                return False
            index = {k: v for k, v in self._index.items() if k != key}
            try:
                await asyncio.to_thread(self._save_index, index)
                self._index = index
                await asyncio.to_thread(self._file(key).unlink, missing_ok=True)
            except OSError as exc:
                raise StorageError(f"flat storage: {exc}") from exc
        return True

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectStat]:
        """Every object whose key starts with ``prefix`` (from the index; no buckets)."""
        for key, entry in list(self._index.items()):
            if key.startswith(prefix):
                yield ObjectStat(key=key, size=entry["size"], content_type=entry["content_type"],
                                 modified=entry["modified"], metadata=dict(entry["metadata"]))

    async def url(self, key: str, expires: int, filename: str | None = None,
                  bucket: str | None = None, content_type: str | None = None) -> str | None:
        """No direct URLs: the gateway serves the files itself."""
        return None
