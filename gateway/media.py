"""Media rules (DESIGN §5): MIME sniffing, categories, safe filenames, object keys, and the
streaming wrapper that hashes, counts and limits bytes on their way to storage.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import mimetypes
import re
import secrets
import time
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

import magic  # python-magic, on top of the system's libmagic

SNIFF_BYTES = 8192
HASH_INLINE_BYTES = 256 * 1024
"""The first bytes of a :class:`MediaStream` hashed on the event loop (under a millisecond)."""
HASH_BATCH_BYTES = 1024 * 1024
"""The least a :class:`MediaStream` hands its hashing thread at once (fewer thread hand-offs)."""
HASH_MAX_PENDING_BYTES = 4 * 1024 * 1024
"""The most a :class:`MediaStream` lets wait for its hashing thread before the reader waits too."""
CATEGORIES = ("image", "video", "audio", "document", "other")

_DOCUMENT_TYPES = {
    "application/pdf",
    "application/msword",
    "application/rtf",
    "application/vnd.ms-excel",
    "application/vnd.ms-powerpoint",
    "application/epub+zip",
    "application/json",
    "application/xml",
}
_DOCUMENT_PREFIXES = (
    "text/",
    "application/vnd.openxmlformats-officedocument.",
    "application/vnd.oasis.opendocument.",
)
# Containers whose more specific subtypes libmagic cannot always tell from the first bytes.
_CONTAINERS = {
    "application/zip": (
        "application/vnd.openxmlformats-officedocument.",
        "application/vnd.oasis.opendocument.",
        "application/epub+zip",
        "application/java-archive",
        "application/vnd.android.package-archive",
    ),
    "application/x-ole-storage": ("application/msword", "application/vnd.ms-"),
    "application/cdfv2": ("application/msword", "application/vnd.ms-"),
    "application/ogg": ("audio/ogg", "video/ogg", "audio/opus"),
    "audio/ogg": ("audio/opus",),
    "video/mp4": ("audio/mp4", "audio/m4a", "audio/x-m4a", "audio/aac"),
    "video/quicktime": ("video/mp4",),
    "text/plain": ("text/", "application/json", "application/xml", "application/csv"),
    "application/octet-stream": (),
}
_EXTENSIONS = {
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "audio/ogg": ".ogg",
    "audio/mpeg": ".mp3",
    "video/mp4": ".mp4",
    "text/plain": ".txt",
    "text/csv": ".csv",
    "application/octet-stream": ".bin",
}
_FILENAME_BAD = re.compile(r'[\x00-\x1f\x7f"\\/:*?<>|]')
_MAX_FILENAME = 150


class MediaTooLarge(Exception):
    """The stream crossed the size limit. ``limit`` in bytes."""

    def __init__(self, limit: int):
        super().__init__(f"attachment exceeds the limit of {limit} bytes")
        self.limit = limit


class DigestMismatch(Exception):
    """The bytes' SHA-256 differs from the digest the provider declared."""


def base_mime(value: str | None) -> str | None:
    """``"audio/ogg; codecs=opus"`` -> ``"audio/ogg"``; lower-cased; ``None`` stays ``None``."""
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None


def category_for(mime: str | None) -> str:
    """One of :data:`CATEGORIES` for a MIME type (from the sniffed type, never the declared one)."""
    mime = base_mime(mime) or ""
    major = mime.split("/", 1)[0]
    if major in ("image", "video", "audio"):
        return major
    if mime in _DOCUMENT_TYPES or mime.startswith(_DOCUMENT_PREFIXES):
        return "document"
    return "other"


QUICK_SNIFF_PREFIXES = (b"\xff\xd8\xff",)
"""First bytes after which libmagic answers within tens of microseconds whatever follows (a JPEG
start-of-image marker: 16-30 µs for 8 KiB of image, text, zeros or random bytes, measured), less
than a hand-off to a thread costs: :func:`sniff_here` runs such a sniff on the calling thread."""


def sniff_here(head: bytes) -> bool:
    """Whether :func:`sniff` of ``head`` is quick enough for the event loop (see
    :data:`QUICK_SNIFF_PREFIXES`); other heads go to a thread (up to milliseconds for text)."""
    return head.startswith(QUICK_SNIFF_PREFIXES)


def sniff(head: bytes) -> str:
    """The MIME type libmagic reads from the first bytes (at least :data:`SNIFF_BYTES` when available)."""
    if not head:
        return "application/x-empty"
    return base_mime(magic.from_buffer(head, mime=True)) or "application/octet-stream"


@dataclass(frozen=True, slots=True)
class TypeDecision:
    """The type an object is stored under: ``mimetype``, ``category``; ``mismatch`` when the content
    contradicts the ``declared`` type."""

    mimetype: str
    category: str
    declared: str | None
    sniffed: str
    mismatch: bool


def decide_type(sniffed: str, declared: str | None, filename: str | None = None) -> TypeDecision:
    """Reconcile the sniffed type with the declared one (DESIGN §5).

    The content wins: a declared type is used only when it refines the sniffed one (a ``.docx``
    declared as such and sniffed as ``application/zip``; ``text/csv`` sniffed as ``text/plain``).
    A declared type that the content contradicts sets ``mismatch``.
    """
    declared_b = base_mime(declared)
    if declared_b in (None, "application/octet-stream", "binary/octet-stream"):
        guessed = mimetypes.guess_type(filename or "")[0] if filename else None
        if guessed and _refines(sniffed, guessed):
            return TypeDecision(guessed, category_for(guessed), declared_b, sniffed, False)
        return TypeDecision(sniffed, category_for(sniffed), declared_b, sniffed, False)
    if declared_b == sniffed:
        return TypeDecision(sniffed, category_for(sniffed), declared_b, sniffed, False)
    if _refines(sniffed, declared_b):
        return TypeDecision(declared_b, category_for(declared_b), declared_b, sniffed, False)
    if _refines(declared_b, sniffed) or _same_family(sniffed, declared_b):
        # e.g. declared application/ogg, sniffed audio/ogg; or image/jpg vs image/jpeg
        return TypeDecision(sniffed, category_for(sniffed), declared_b, sniffed, False)
    return TypeDecision(sniffed, category_for(sniffed), declared_b, sniffed, True)


def _refines(container: str, specific: str) -> bool:
    prefixes = _CONTAINERS.get(container)
    if prefixes is None:
        return False
    if container == "application/octet-stream":
        return False
    return any(specific.startswith(p) for p in prefixes)


def _same_family(sniffed: str, declared: str) -> bool:
    """Aliases that name one format (``image/jpg``/``image/jpeg``, ``audio/mp3``/``audio/mpeg``)."""
    aliases = {
        "image/jpg": "image/jpeg",
        "image/pjpeg": "image/jpeg",
        "audio/mp3": "audio/mpeg",
        "audio/x-mpeg": "audio/mpeg",
        "audio/x-wav": "audio/wav",
        "audio/vnd.wave": "audio/wav",
        "audio/x-m4a": "audio/mp4",
        "video/x-m4v": "video/mp4",
        "application/x-pdf": "application/pdf",
    }
    return aliases.get(declared, declared) == aliases.get(sniffed, sniffed)


def extension_for(mime: str) -> str:
    """File extension (with the dot) for a MIME type; ``.bin`` when unknown."""
    if mime in _EXTENSIONS:
        return _EXTENSIONS[mime]
    return mimetypes.guess_extension(mime, strict=False) or ".bin"


def safe_filename(name: str | None, fallback: str) -> str:
    """A filename safe for Content-Disposition and URLs: no path, no control or bidi characters,
    at most 150 characters (extension kept). Empty results become ``fallback``."""
    if name:
        name = unicodedata.normalize("NFC", str(name))
        name = name.replace("\\", "/").rsplit("/", 1)[-1]
        name = "".join(
            ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn")
        )
        name = _FILENAME_BAD.sub("_", name).strip(" .")
    if not name:
        return fallback
    if len(name) > _MAX_FILENAME:
        stem, dot, ext = name.rpartition(".")
        if dot and 0 < len(ext) <= 16:
            name = stem[: _MAX_FILENAME - len(ext) - 1] + "." + ext
        else:
            name = name[:_MAX_FILENAME]
    return name


def new_media_id() -> str:
    """A random, URL-safe media id (``m_`` + 26 characters, time-ordered prefix)."""
    return f"m_{int(time.time() * 1000):011x}{secrets.token_hex(8)}"


_KEY_SEGMENT_BAD = re.compile(r"[^A-Za-z0-9._@+=-]")


def object_key(template: str, *, provider: str, account: str, category: str, media_id: str,
               ext: str, now: float | None = None) -> str:
    """Render the object-key template (DESIGN §5). User-controlled values are reduced to
    ``[A-Za-z0-9._@+=-]`` so that a key never escapes its prefix."""
    t = time.gmtime(now if now is not None else time.time())

    def clean(value: str) -> str:
        value = _KEY_SEGMENT_BAD.sub("_", value).strip(".") or "_"
        return value[:100]

    return template.format(
        provider=clean(provider),
        account=clean(account),
        yyyy=f"{t.tm_year:04d}",
        mm=f"{t.tm_mon:02d}",
        dd=f"{t.tm_mday:02d}",
        category=category,
        id=media_id,
        ext=ext,
    )


class MediaStream:
    """Wraps a provider's byte stream on its way to storage.

    Computes SHA-256 (``sha256`` hex) and ``size`` (bytes), raises :class:`MediaTooLarge` at the
    chunk that crosses ``max_bytes`` (having passed on no byte beyond the limit), and, when
    ``expected_sha256`` (hex) is given, raises :class:`DigestMismatch` at the end of the stream,
    before the storage backend commits the object.

    The first :data:`HASH_INLINE_BYTES` are hashed on the event loop (a small attachment costs
    no thread hand-off); past them the SHA-256 runs in a worker thread (``hashlib`` releases the
    GIL) over batches of at least :data:`HASH_BATCH_BYTES`, overlapped with the reading of the
    next chunks and the consumer's work on them. At most :data:`HASH_MAX_PENDING_BYTES` wait for
    that thread: past them the reader waits too, so memory stays bounded and backpressure
    reaches the socket. The digest is final (and checked) before the end of the stream.

    Use: ``head = await ms.read_head()`` to sniff, then hand ``ms`` (an async iterator) to
    ``StorageBackend.put``; it yields the head first.
    """

    def __init__(self, chunks: AsyncIterator[bytes], max_bytes: int,
                 expected_sha256: str | None = None):
        self._it = chunks.__aiter__()
        self._max = max_bytes
        self._expected = expected_sha256.lower() if expected_sha256 else None
        self._hash = hashlib.sha256()
        self._unhashed: list[bytes] = []  # in stream order, after everything given to the thread
        self._unhashed_bytes = 0
        self._hashing: asyncio.Future[None] | None = None  # the thread's current batch
        self._pending: list[bytes] = []
        self._done = False
        self.size = 0
        self.sha256: str | None = None

    async def _next(self) -> bytes | None:
        try:
            chunk = await self._it.__anext__()
        except StopAsyncIteration:
            return None
        if self.size + len(chunk) > self._max:
            raise MediaTooLarge(self._max)
        self.size += len(chunk)
        if self.size <= HASH_INLINE_BYTES:
            self._hash.update(chunk)
        else:
            await self._hash_in_thread(chunk)
        return chunk

    async def _hash_in_thread(self, chunk: bytes) -> None:
        """Queue ``chunk`` for the hashing thread; hand over a batch when the thread is free."""
        self._unhashed.append(chunk)
        self._unhashed_bytes += len(chunk)
        if self._hashing is not None and (self._hashing.done() or self._unhashed_bytes >= HASH_MAX_PENDING_BYTES):
            await self._hashing  # re-raises nothing: hashlib's update does not fail on bytes
            self._hashing = None
        if self._hashing is None and self._unhashed_bytes >= HASH_BATCH_BYTES:
            batch, self._unhashed, self._unhashed_bytes = self._unhashed, [], 0
            self._hashing = asyncio.get_running_loop().run_in_executor(None, self._update, batch)

    def _update(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self._hash.update(chunk)

    async def _hexdigest(self) -> str:
        """The SHA-256 hex of every byte read, once the thread has hashed what it was given."""
        if self._hashing is not None:
            await self._hashing
            self._hashing = None
        if self._unhashed:
            batch, self._unhashed, self._unhashed_bytes = self._unhashed, [], 0
            await asyncio.get_running_loop().run_in_executor(None, self._update, batch)
        return self._hash.hexdigest()

    async def read_head(self, n: int = SNIFF_BYTES) -> bytes:
        """Read until ``n`` bytes (or the end) are buffered; return them for sniffing."""
        have = sum(len(c) for c in self._pending)
        while have < n and not self._done:
            chunk = await self._next()
            if chunk is None:
                self._done = True
                break
            self._pending.append(chunk)
            have += len(chunk)
        return b"".join(self._pending)[:n]

    def __aiter__(self) -> MediaStream:
        return self

    async def __anext__(self) -> bytes:
        if self._pending:
            return self._pending.pop(0)
        chunk = None if self._done else await self._next()
        if chunk is None:
            self._done = True
            if self.sha256 is None:
                self.sha256 = await self._hexdigest()
                if self._expected and self.sha256 != self._expected:
                    raise DigestMismatch(
                        f"sha256 of the bytes is {self.sha256}, the provider declared {self._expected}"
                    )
            raise StopAsyncIteration
        return chunk


@functools.lru_cache(maxsize=4096)  # a pure function, on every served object
def content_disposition(filename: str, mimetype: str) -> str:
    """A ``Content-Disposition`` header value (RFC 6266, RFC 8187 ``filename*``).

    Images, audio, video (but not SVG) and PDF are ``inline``; everything else ``attachment``.
    ``filename`` should already be :func:`safe_filename`; it is quoted again here regardless.
    """
    mime = base_mime(mimetype) or ""
    inline = (mime.split("/", 1)[0] in ("image", "audio", "video") and mime != "image/svg+xml") \
        or mime == "application/pdf"
    fallback = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode()
    fallback = re.sub(r'[^A-Za-z0-9._ ()+-]', "_", fallback).strip() or "download"
    encoded = quote(filename, safe="")
    return f"{'inline' if inline else 'attachment'}; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"
