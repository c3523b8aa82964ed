"""Thumbnails of stored images and stickers, served at ``GET /media/{id}/thumbnail?size=`` (DESIGN §12).

A thumbnail is made with Pillow on its first request, in a worker thread, and stored as a derived
object beside the original (key ``{original key}.thumb-{size}.webp``, same bucket), so later requests
read it back; :meth:`MediaStore.delete <gateway.store.MediaStore.delete>` and the retention cleanup
delete it with the original (:func:`delete_thumbnails`).

A hostile image cannot hurt the daemon: the source is read only up to :data:`MAX_SOURCE_BYTES`, Pillow
is given only the raster formats a chat sends, an image over :data:`MAX_PIXELS` is refused from its
header before any pixel is decoded (a decompression bomb), JPEG decoding is drafted down to the
thumbnail's scale, at most :data:`CONCURRENCY` renderings run at once, and a request waits at most
:data:`RENDER_SECONDS` for one (the thread then finishes on its own; the semaphore stays held until it
does, so a stuck rendering cannot multiply).
"""

from __future__ import annotations

import asyncio
import io
import logging
import warnings
import weakref
from collections.abc import AsyncIterator, Mapping
from typing import Any

from PIL import Image, UnidentifiedImageError

from gateway.sdk.storage import ObjectNotFound, StorageBackend

log = logging.getLogger("gateway.thumbnails")

SIZES = (128, 256, 512)
"""The thumbnail sizes offered, in pixels (the longer side)."""
DEFAULT_SIZE = 256
CATEGORIES = ("image", "sticker")
"""The media categories that have thumbnails."""
MAX_SOURCE_BYTES = 32 * 1024 * 1024
"""An original larger than this (bytes) gets no thumbnail."""
MAX_PIXELS = 50_000_000
"""An original with more pixels than this (width x height, from its header) gets no thumbnail."""
RENDER_SECONDS = 10.0
"""How long a request waits for one rendering (seconds)."""
CONCURRENCY = 2
"""Renderings running at once, in worker threads."""
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The formats Pillow may open (no EPS or other formats that run external programs)."""
MIMETYPE = "image/webp"

# the renderings' semaphore, one per event loop (a semaphore belongs to the loop it first waits on)
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


class ThumbnailRefused(Exception):
    """The object has no thumbnail: not an image, not decodable, too large, too many pixels, or
    too slow to render. The message says which (HTTP 415/422 for the caller)."""


def thumbnail_key(key: str, size: int) -> str:
    """The object key of ``key``'s thumbnail of ``size`` pixels."""
    return f"{key}.thumb-{size}.webp"


def original_key(key: str) -> str | None:
    """The original's object key if ``key`` is a thumbnail's (:func:`thumbnail_key`), else None."""
    stem, dot, suffix = key.rpartition(".thumb-")
    if dot and suffix.endswith(".webp") and suffix[:-5].isdigit() and int(suffix[:-5]) in SIZES:
        return stem
    return None


def has_thumbnail(record: Mapping[str, Any]) -> bool:
    """True if the catalog row's category is one with thumbnails (:data:`CATEGORIES`)."""
    return record.get("category") in CATEGORIES


def render(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> bytes:
    """A WebP thumbnail of the image ``data`` whose longer side is at most ``size`` pixels
    (aspect kept; the first frame of an animation). Raises :class:`ThumbnailRefused`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ThumbnailRefused(f"{width}x{height} pixels is over the limit of {max_pixels}")
                image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
                image.thumbnail((size, size))
                out = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P", "PA") else "RGB")
                buffer = io.BytesIO()
                out.save(buffer, "WEBP", quality=80)
                return buffer.getvalue()
    except ThumbnailRefused:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ThumbnailRefused(f"not a decodable image: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # what Pillow raises for broken files
        raise ThumbnailRefused(f"the image could not be decoded: {exc}") from None


async def _read_all(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise ThumbnailRefused(f"the original is over {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def thumbnail(storage: StorageBackend, record: Mapping[str, Any], size: int) -> bytes:
    """The stored thumbnail of catalog ``record`` (made and stored on first request).

    Raises :class:`ThumbnailRefused`, :class:`gateway.sdk.storage.ObjectNotFound` when the original
    is missing, and storage errors."""
    if not has_thumbnail(record):
        raise ThumbnailRefused(f"a {record.get('category')} has no thumbnail")
    key, bucket = thumbnail_key(record["key"], size), record.get("bucket")
    try:
        opened = await storage.open(key, bucket=bucket)
    except ObjectNotFound:
        pass
    else:
        try:
            return await _read_all(opened.chunks, MAX_SOURCE_BYTES)
        finally:
            await opened.close()
    if record["size"] > MAX_SOURCE_BYTES:
        raise ThumbnailRefused(f"the original is over {MAX_SOURCE_BYTES} bytes")
    opened = await storage.open(record["key"], bucket=bucket)
    try:
        data = await _read_all(opened.chunks, MAX_SOURCE_BYTES)
    finally:
        await opened.close()
    slots = _slots.setdefault(asyncio.get_running_loop(), asyncio.Semaphore(CONCURRENCY))
    await slots.acquire()
    task = asyncio.ensure_future(asyncio.to_thread(render, data, size))
    task.add_done_callback(lambda _: slots.release())
    try:
        made = await asyncio.wait_for(asyncio.shield(task), RENDER_SECONDS)
    except TimeoutError:
        raise ThumbnailRefused(f"rendering took over {RENDER_SECONDS:g} s") from None

    async def body() -> AsyncIterator[bytes]:
        yield made

    await storage.put(key, body(), MIMETYPE, {"media-id": record["id"], "thumbnail-of": record["key"]},
                      category=record["category"])
    log.info("made a %d px thumbnail of %s (%d bytes)", size, record["id"], len(made),
             extra={"media_id": record["id"]})
    return made


async def delete_thumbnails(storage: StorageBackend, record: Mapping[str, Any]) -> None:
    """Delete every thumbnail of catalog ``record`` (those never made are skipped). Raises storage errors."""
    if has_thumbnail(record):
        for size in SIZES:
            await storage.delete(thumbnail_key(record["key"], size), bucket=record.get("bucket"))
