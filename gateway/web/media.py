"""Serving stored objects: ``/media/{id}/{filename}`` (signed links), ``/public/{id}/{filename}``
(public files) and, through :func:`serve_object`, the files API's ``/content``."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from stat import S_ISREG
from typing import Any, BinaryIO

from aiohttp import web

from gateway.catalog.rows import MediaRow
from gateway.keys import LINKS, MEDIA_STORE, SETTINGS, STORAGE
from gateway.links import LinkError
from gateway.media import content_disposition
from gateway.sdk.storage import ObjectNotFound, StorageError
from gateway.thumbnails import DEFAULT_SIZE, MIMETYPE, SIZES, ThumbnailRefused
from gateway.thumbnails import thumbnail as make_thumbnail
from gateway.web.errors import ApiError

log = logging.getLogger("gateway.http")

SMALL_OBJECT = 128 * 1024
"""Ranges up to this many bytes are sent with one read and one write instead of sendfile."""


async def media(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD /media/{id}/{filename}?exp=&sig=``: a stored object, streamed.

    403 wrong/expired signature; 404 unknown id; 304 on a matching ``If-None-Match``; 206 with
    ``Content-Range`` for a satisfiable single ``Range`` (RFC 9110 §14); 416 otherwise.
    """
    return await serve_object(request, await _signed_record(request, request.match_info["filename"]))


async def _signed_record(request: web.Request, signed_name: str) -> MediaRow:
    """The catalog row of ``{id}`` if the query's ``exp`` and ``sig`` sign ``signed_name``. Raises
    :class:`ApiError` 403 or 404."""
    media_id = request.match_info["id"]
    try:
        request.app[LINKS].verify(media_id, signed_name, request.query.get("exp"), request.query.get("sig"))
    except LinkError as exc:
        raise ApiError(403, str(exc))
    record = await request.app[MEDIA_STORE].rows.get(media_id)
    if record is None or record.get("state") == "deleting":
        raise ApiError(404, "no such media")
    return record


async def thumbnail(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD /media/{id}/thumbnail?size=&exp=&sig=``: a WebP thumbnail of a stored image or
    sticker, its longer side at most ``size`` px (128, 256 or 512; default 256), made on the first
    request (:mod:`gateway.thumbnails`). Signed as :meth:`gateway.links.LinkSigner.thumbnail_link`
    makes it. Without ``size`` and with a plain media signature it is the media link of an object
    named ``thumbnail``.

    403 wrong/expired signature; 404 unknown id or original missing; 422 a size not offered, or an
    object with no thumbnail (not an image, undecodable, over the pixel or byte bounds); 503 storage."""
    raw = request.query.get("size")
    if raw is None and "sig" in request.query:
        try:
            request.app[LINKS].verify(request.match_info["id"], "thumbnail", request.query.get("exp"),
                                      request.query.get("sig"))
        except LinkError:
            pass
        else:  # a stored file named "thumbnail", by its own media link
            return await serve_object(request, await _signed_record(request, "thumbnail"))
    size = DEFAULT_SIZE if raw is None else (int(raw) if raw.isdigit() else -1)
    record = await _signed_record(request, f"thumbnail:{raw if raw is not None else DEFAULT_SIZE}")
    if size not in SIZES:
        raise ApiError(422, f"one of {', '.join(map(str, SIZES))}", field="size")
    etag = f'"{record["sha256"]}-{size}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    try:
        body = await make_thumbnail(request.app[STORAGE], record, size)
    except ThumbnailRefused as exc:
        log.info("no thumbnail for %s: %s", record["id"], exc, extra={"media_id": record["id"]})
        raise ApiError(422, f"no thumbnail: {exc}")
    except ObjectNotFound:
        raise ApiError(404, "object missing from storage")
    except StorageError as exc:
        raise ApiError(503, f"storage unavailable: {exc}")
    return web.Response(body=body, content_type=MIMETYPE, headers=headers)


async def serve_object(request: web.Request, record: Mapping[str, Any]) -> web.StreamResponse:
    """Send the object of catalog ``record`` with ETag, Range and conditional support: with the
    kernel's sendfile from a backend whose objects are local files
    (:class:`gateway.sdk.storage.LocalFiles`), else streamed from ``storage.open``; or, with
    ``storage.serving = "redirect"`` and a backend that has direct URLs, answer 302 to a fresh
    presigned URL (valid for the link TTL, at most an hour)."""
    size = record["size"]
    etag = f'"{record["sha256"]}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, max-age=3600",
        "X-Content-Type-Options": "nosniff",
        "Content-Disposition": content_disposition(record["filename"], record["mimetype"]),
    }
    inm = request.headers.get("If-None-Match")
    if inm and (inm.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in inm.split(",")]):
        return web.Response(status=304, headers=headers)
    start, end, status = 0, size - 1, 200
    if "Range" in request.headers and request.headers.get("If-Range", etag) == etag:
        try:
            rng = request.http_range
        except ValueError:
            rng = None  # malformed or multi-range: RFC 9110 lets us ignore it and send it all
        if rng is not None and (rng.start is not None or rng.stop is not None):
            if rng.start is None:  # cannot happen with aiohttp's parser; be safe
                rng = slice(0, rng.stop)
            if rng.start < 0:  # suffix range: the last N bytes
                start = max(0, size + rng.start)
            else:
                start = rng.start
            if rng.stop is not None:
                end = min(size - 1, rng.stop - 1)
            if start >= size or start > end:
                return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    storage = request.app[STORAGE]
    if request.app[SETTINGS].storage.serving == "redirect":
        ttl = min(request.app[SETTINGS].media.link_ttl, 3600)
        direct = await storage.url(record["key"], ttl, filename=record["filename"],
                                   bucket=record["bucket"], content_type=record["mimetype"])
        if direct is not None:
            return web.Response(status=302, headers={"Location": direct, "Cache-Control": "no-store"})
    local_path = getattr(storage, "local_path", None)  # LocalFiles, optional (no isinstance: it is slow)
    path = local_path(record["key"], bucket=record["bucket"]) if local_path is not None else None
    if path is not None:
        return await _send_file(request, record, path, start, end, status, headers)
    try:
        obj = await storage.open(record["key"], start, end if size else None, bucket=record["bucket"])
    except ObjectNotFound:
        raise await _missing(request, record)
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = record["mimetype"]
    response.content_length = obj.length if size else 0
    sent = 0
    try:
        await response.prepare(request)
        if request.method != "HEAD":
            async for chunk in obj.chunks:
                await response.write(chunk)
                sent += len(chunk)
        await response.write_eof()
    except ConnectionError:
        _hung_up(request, record, sent, response)
        raise
    finally:
        await obj.close()
    return response


async def _send_file(request: web.Request, record: Mapping[str, Any], path: str, start: int, end: int,
                     status: int, headers: dict[str, str]) -> web.StreamResponse:
    """Send bytes ``start``..``end`` (inclusive) of the file at ``path`` with ``loop.sendfile``
    (the kernel's sendfile(2) on a plain socket; asyncio falls back to reads in a thread where it
    cannot). The headers are ours (aiohttp's ``FileResponse`` would answer with its own ETag and
    conditionals). Up to :data:`SMALL_OBJECT` bytes are read with one ``pread`` instead and go out
    with the headers in one write: sendfile's own round trips through the loop cost more than
    the copy. The file is opened and read on the loop, as sendfile reads it there: a hot
    object is in the page cache, and a cold one blocks no longer either way. A small file stays
    open with its bytes for the next request (:class:`gateway.store.HotFiles`: then one ``fstat``
    and no read)."""
    hot = request.app[MEDIA_STORE].files
    if request.method != "HEAD" and (kept := hot.get(path)) is not None:
        length = max(0, min(end, len(kept) - 1) - start + 1)
        if 0 < length:
            return await _send_bytes(request, record, status, headers, kept[start:start + length])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        raise await _missing(request, record)
    except OSError as exc:  # ELOOP (a symlink: never followed), EACCES, EIO
        log.error("cannot open %s for %s: %s", record["key"], record["id"], exc, extra={"media_id": record["id"]})
        raise ApiError(503, f"storage unavailable: {exc.strerror}")
    try:
        st = os.fstat(fd)
        if not S_ISREG(st.st_mode):
            raise await _missing(request, record)
        length = max(0, min(end, st.st_size - 1) - start + 1)  # a short file: what it has, as open() sends
        if request.method == "HEAD" or not 0 < length <= SMALL_OBJECT:
            with open(fd, "rb", buffering=0, closefd=False) as file:
                return await _sendfile(request, record, file, start, length, status, headers)
        if st.st_size <= hot.size_limit:  # read it all, and keep it open for the next request
            body = os.pread(fd, st.st_size, 0)
            if hot.keep(path, fd, st, body):
                fd = -1
            body = body[start:start + length]  # the whole of it: the same bytes object, no copy
        else:
            body = os.pread(fd, length, start)
    finally:
        if fd >= 0:
            os.close(fd)
    return await _send_bytes(request, record, status, headers, body)


async def _send_bytes(request: web.Request, record: Mapping[str, Any], status: int, headers: dict[str, str],
                      body: bytes) -> web.StreamResponse:
    """Answer with ``body`` (a small object, or part of one), headers and body in one write."""
    response = web.Response(status=status, headers={**headers, "Content-Type": record["mimetype"]}, body=body)
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        _hung_up(request, record, 0, response)
        raise
    return response


async def _sendfile(request: web.Request, record: Mapping[str, Any], file: BinaryIO, start: int, length: int,
                    status: int, headers: dict[str, str]) -> web.StreamResponse:
    """Headers, then ``length`` bytes of ``file`` from ``start`` by ``loop.sendfile`` (none for HEAD)."""
    response = web.StreamResponse(status=status, headers={**headers, "Content-Type": record["mimetype"]})
    response.content_length = length
    try:
        await response.prepare(request)
        if request.method != "HEAD" and length:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("connection lost")
            await asyncio.get_running_loop().sendfile(transport, file, start, length)
        await response.write_eof()
    except ConnectionError:
        # asyncio's sendfile leaves the file position after the last byte it sent
        _hung_up(request, record, max(0, file.tell() - start), response)
        raise
    return response


async def _missing(request: web.Request, record: Mapping[str, Any]) -> ApiError:
    """The 404 to raise for ``record``'s object gone from storage. A row served from memory
    (:class:`gateway.store.MediaRows`) may be older than a delete by another process (a serving
    worker's rows, another replica's): the row is read again, and a deleted one is simply gone
    (one INFO line); a row that is still there points at nothing, an ERROR."""
    rows = request.app[MEDIA_STORE].rows
    rows.forget([record["id"]])
    current = await rows.catalog.get_media(record["id"])
    if current is None or current.get("state") == "deleting":
        log.info("%s was deleted meanwhile", record["id"], extra={"media_id": record["id"]})
        return ApiError(404, "no such media")
    log.error("catalog row %s points at a missing object %s", record["id"], record["key"],
              extra={"media_id": record["id"]})
    return ApiError(404, "object missing from storage")


def _hung_up(request: web.Request, record: Mapping[str, Any], sent: int, response: web.StreamResponse) -> None:
    """The one INFO line of a client that hung up mid-download (players and Range probes do)."""
    log.info("client hung up after %d of %d bytes of %s (%s %s)", sent, response.content_length,
             record["id"], request.method, request.path, extra={"media_id": record["id"]})


async def public_media(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD /public/{id}/{filename}``: a stable, unsigned link to an object marked public
    (``is_public``); 404 for any other object."""
    record = await request.app[MEDIA_STORE].rows.get(request.match_info["id"])
    if record is None or not record.get("is_public") or record.get("state", "stored") != "stored":
        raise ApiError(404, "no such public file")
    return await serve_object(request, record)
