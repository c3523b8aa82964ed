"""Reading a provider's media body (DESIGN §2, the fetch lane): one home for the timeouts and the
resume of an interrupted download, shared by every provider plugin.

- **Idle timeout** (``media.fetch_idle_timeout``): the longest wait for the next bytes, headers
  included (aiohttp's ``sock_read``). A provider that stalls fails after this, whatever the size.
- **Total timeout**: ``media.fetch_timeout`` plus the declared size (or ``media.max_bytes`` when
  the size is unknown) at ``media.fetch_min_rate`` bytes per second, so a large file over a slow
  but moving link is not cut off while a small one cannot hang for long.
- **Resume** (RFC 9110 §14): when the body breaks or stalls part-way, the same URL is asked again
  with ``Range: bytes=N-`` (and ``If-Range`` with the first answer's strong ``ETag`` or
  ``Last-Modified``), at most ``media.fetch_resumes`` times per attempt. Only a ``206`` whose
  ``Content-Range`` starts at ``N`` continues the stream; anything else ends the attempt. The
  bytes already yielded stay yielded, so the consumer's hash (``gateway.media.MediaStream``) goes
  on over the whole object and the declared digest is still checked.
- **A reader thread for large bodies** (``media.fetch_thread_min_bytes``): a body that declares
  at least that many bytes, over plain HTTP and without a content coding, is read by a thread of
  its own with blocking ``recv(MSG_WAITALL)`` calls on the connection's socket, once aiohttp has
  parsed the headers and the bytes that came with them. The event loop then only passes on whole
  :data:`CHUNK`-byte pieces: no per-``recv`` wake-up, parse, copy and flow-control switch. With
  TLS, a content coding or no ``Content-Length`` aiohttp reads the body as before. The connection
  is closed afterwards (aiohttp's parser is left part-way), never given back to the pool. The
  idle timeout is the kernel's (``SO_RCVTIMEO``), which bounds one whole ``recv``: a stall is
  noticed after one to two idle timeouts, then resumed as above. Measured with
  ``bench/stream_1gib.py`` (1 GiB from a local server): the event loop's CPU went from 0.8 to
  0.2 s and the daemon's from 2.2 to 1.6-1.8 s.

Every failure while reading the body is a :class:`gateway.sdk.provider.FetchError` (retryable), so the
ingest treats it as any other failed download: retried, then forwarded with a note.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from gateway.sdk.provider import FetchError

log = logging.getLogger("gateway.download")

CHUNK = 1024 * 1024  # bytes per read (bench/stream_1gib.py: best with the local WRITE_BATCH of 4 MiB)
RECV_BYTES = 1024 * 1024
"""Bytes asyncio's socket transport may take in one ``recv`` while a body is read (its default is
256 KiB): fewer, larger reads take about a third less of the event loop's CPU per byte
(bench/stream_1gib.py)."""
THREAD_CHUNKS = 8
"""Pieces of :data:`CHUNK` bytes a reader thread may have received ahead of the consumer; then it
waits, so memory stays bounded and backpressure reaches the socket."""
BODY_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)
"""What aiohttp raises when a body breaks (payload incomplete, connection reset) or stalls."""
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class DownloadPolicy:
    """Timeouts and resume limit for provider downloads.

    ``idle_timeout``, ``connect_timeout``, ``base_timeout``: seconds; ``min_rate``: bytes per
    second the total timeout allows for; ``max_bytes``: the size assumed when none is declared;
    ``max_resumes``: ``Range`` requests per attempt after a broken body (0: no resume);
    ``thread_min_bytes``: a body declaring at least this many bytes (plain HTTP, no content
    coding) is read by a thread of its own (0: never; see the module docstring).
    """

    idle_timeout: float = 30.0
    connect_timeout: float = 10.0
    base_timeout: float = 300.0
    min_rate: int = 100 * 1024
    max_bytes: int = 100 * 1024 * 1024
    max_resumes: int = 3
    thread_min_bytes: int = 8 * 1024 * 1024

    @property
    def timeout(self) -> aiohttp.ClientTimeout:
        """The ``ClientTimeout`` for a download request: connect and idle, no total (the total is
        enforced over the body by :func:`resumable_body`, across resumes)."""
        return aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=self.idle_timeout)

    def total_for(self, size: int | None) -> float:
        """Seconds a download of ``size`` bytes (``None``: unknown) may take in all."""
        return self.base_timeout + (size if size is not None else self.max_bytes) / self.min_rate


def _resume_start(resp: aiohttp.ClientResponse, length: int | None) -> int | None:
    """The first byte of a ``206`` answer's ``Content-Range``, or ``None`` (not a 206, or its
    complete length is not the first answer's ``length`` bytes: another file)."""
    if resp.status != 206:
        return None
    match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    if match is None or (length is not None and match.group(3) not in ("*", str(length))):
        return None
    return int(match.group(1))


def _validator(resp: aiohttp.ClientResponse) -> str | None:
    """An ``If-Range`` value: a strong ``ETag``, else ``Last-Modified`` (RFC 9110 §13.1.5)."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified")


async def resumable_body(http: aiohttp.ClientSession, resp: aiohttp.ClientResponse, url: URL | str,
                         headers: Mapping[str, str], policy: DownloadPolicy,
                         size: int | None = None) -> AsyncIterator[bytes]:
    """Yield the body of ``resp`` (a ``200`` to ``GET url`` with ``headers``), resuming with
    ``Range`` when it breaks or stalls part-way (see the module docstring).

    ``size``: the declared size in bytes (default: ``resp``'s Content-Length), for the total
    timeout. Raises :class:`FetchError` (retryable; ``reason`` ``interrupted``, ``stalled`` or
    ``too_slow``) when the body cannot be completed in this attempt. ``resp`` is released by its
    owner; responses opened here for resumes are closed here.
    """
    loop = asyncio.get_running_loop()
    total = policy.total_for(size if size is not None else resp.content_length)
    deadline = loop.time() + total
    validator = _validator(resp)
    received = 0
    resumes = 0
    current = resp
    try:
        while True:
            body = _threaded_body(current, policy) if _threadable(current, policy) else None
            restore = _widen_reads(current) if body is None else (lambda: None)
            chunks: AsyncIterator[bytes] = body if body is not None else current.content.iter_chunked(CHUNK)
            try:
                while True:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks, None)
                    if chunk is None:
                        return
                    received += len(chunk)
                    yield chunk
            except BODY_ERRORS as exc:
                if loop.time() >= deadline:
                    raise FetchError(f"download took longer than {total:.0f}s (media.fetch_timeout plus "
                                     f"the size at media.fetch_min_rate); {received} bytes read",
                                     reason="too_slow") from exc
                reason = "stalled" if isinstance(exc, TimeoutError) else "interrupted"
                what = (f"no bytes for {policy.idle_timeout:g}s" if reason == "stalled"
                        else f"{type(exc).__name__}: {exc}")
                if resumes >= policy.max_resumes:
                    raise FetchError(f"download {reason} after {received} bytes ({what})",
                                     reason=reason) from exc
                resumes += 1
                log.info("download %s after %d bytes (%s); resuming with Range (%d/%d)",
                         reason, received, what, resumes, policy.max_resumes)
                nxt = await _resume(http, url, headers, policy, received, validator, reason,
                                    resp.content_length)
                if current is not resp:
                    current.release()
                current = nxt
            finally:
                restore()  # before a pooled connection serves anything else
                if body is not None:
                    await body.aclose()  # its thread stops and the connection is closed
    finally:
        if current is not resp:
            current.release()


def _threadable(resp: aiohttp.ClientResponse, policy: DownloadPolicy) -> bool:
    """Whether :func:`_threaded_body` may read ``resp``'s body: ``policy.thread_min_bytes`` or more
    declared, no content coding or chunked transfer, and a plain socket under it (not TLS)."""
    length = resp.content_length
    if policy.thread_min_bytes <= 0 or length is None or length < policy.thread_min_bytes:
        return False
    if resp.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return False
    if "Transfer-Encoding" in resp.headers or resp.connection is None:
        return False
    transport = resp.connection.transport
    return (transport is not None and resp.connection.protocol is not None
            and transport.get_extra_info("sslcontext") is None
            and transport.get_extra_info("socket") is not None)


async def _threaded_body(resp: aiohttp.ClientResponse, policy: DownloadPolicy) -> AsyncGenerator[bytes, None]:
    """Yield ``resp``'s body (see :func:`_threadable`), read by a thread of its own.

    First the bytes aiohttp already parsed are taken from ``resp.content`` (without waiting), and
    reading is paused on the connection's protocol, which also stops aiohttp's ``sock_read`` timer.
    Then a thread reads the rest of the declared length from a duplicate of the socket's file
    descriptor in pieces of :data:`CHUNK` bytes (``recv`` with ``MSG_WAITALL``; ``SO_RCVTIMEO`` is
    ``policy.idle_timeout``), at most :data:`THREAD_CHUNKS` ahead of the consumer. Raises
    ``TimeoutError`` when no byte comes for ``policy.idle_timeout`` seconds and
    ``aiohttp.ClientPayloadError`` when the connection breaks or ends early (both in
    :data:`BODY_ERRORS`, so :func:`resumable_body` resumes). The response is closed at the end,
    and the thread stops when the consumer stops or the response is released by its owner.
    """
    content = resp.content
    while True:  # each read may let the parser feed what it held back while paused
        head = content.read_nowait(-1)
        if not head:
            break
        yield head
    got, length = content.total_bytes, resp.content_length or 0
    if content.is_eof() or got >= length:
        return
    connection, loop = resp.connection, asyncio.get_running_loop()
    assert connection is not None and connection.transport is not None and connection.protocol is not None
    connection.protocol.pause_reading()  # no other reader of the socket from here on
    sock = socket.socket(fileno=os.dup(connection.transport.get_extra_info("socket").fileno()))
    reader = _SocketReader(sock, length - got, policy.idle_timeout, loop)
    connection.add_callback(reader.stop)  # released or closed by its owner: the thread stops too
    try:
        while True:
            chunk = await reader.next()
            if chunk is None:
                return
            yield chunk
    finally:
        reader.stop()
        resp.close()


class _SocketReader:
    """The thread of :func:`_threaded_body`: reads ``length`` bytes from ``sock`` (which it owns
    and closes) and hands them to ``loop`` in order, then ``None``, or the error that ended it."""

    def __init__(self, sock: socket.socket, length: int, idle_timeout: float,
                 loop: asyncio.AbstractEventLoop):
        self._sock, self._left, self._idle, self._loop = sock, length, idle_timeout, loop
        self._ready: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._slots = threading.Semaphore(THREAD_CHUNKS)
        self._stopped = threading.Event()
        # blocking (the flag is shared with aiohttp's descriptor, which reads no more and is
        # closed after); the idle timeout is the kernel's
        sock.settimeout(None)
        seconds = max(idle_timeout, 0.001)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("@ll", int(seconds), int(seconds % 1 * 1_000_000)))
        threading.Thread(target=self._run, name="gateway-download", daemon=True).start()

    async def next(self) -> bytes | None:
        """The next piece (``None``: the whole length was read). Raises what ended the thread."""
        item = await self._ready.get()
        if isinstance(item, BaseException):
            raise item
        if item is not None:
            self._slots.release()
        return item

    def stop(self) -> None:
        """End the thread soon (a blocked ``recv`` returns at once); idempotent."""
        if not self._stopped.is_set():
            self._stopped.set()
            self._slots.release()
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by the thread, or the peer
                pass

    def _hand(self, item: bytes | BaseException | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._ready.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self._stopped.set()

    def _run(self) -> None:
        try:
            while self._left > 0:
                self._slots.acquire()  # stop() releases one too
                if self._stopped.is_set():
                    return
                try:
                    piece = self._sock.recv(min(CHUNK, self._left), socket.MSG_WAITALL)
                except BlockingIOError:  # SO_RCVTIMEO passed without a byte
                    raise TimeoutError(f"no bytes for {self._idle:g}s") from None
                if not piece:
                    raise aiohttp.ClientPayloadError(
                        f"the connection ended with {self._left} bytes of the body still to come")
                self._left -= len(piece)
                self._hand(piece)
            self._hand(None)
        except (OSError, aiohttp.ClientPayloadError) as exc:
            if not self._stopped.is_set():  # after stop(), nobody waits for the outcome
                broken = isinstance(exc, OSError) and not isinstance(exc, TimeoutError)
                self._hand(aiohttp.ClientPayloadError(f"{type(exc).__name__}: {exc}") if broken else exc)
        finally:
            self._sock.close()


def _widen_reads(resp: aiohttp.ClientResponse) -> Callable[[], None]:
    """Let the transport under ``resp`` take up to :data:`RECV_BYTES` per ``recv`` (asyncio's
    selector transports read ``max_size`` bytes at most, 256 KiB by default); return the callable
    that puts the old size back before the pooled connection serves anything else. A transport
    without that attribute (another event loop) is left as it is."""
    transport = resp.connection.transport if resp.connection is not None else None
    old = getattr(transport, "max_size", None)
    if transport is None or not isinstance(old, int) or old >= RECV_BYTES:
        return lambda: None
    transport.max_size = RECV_BYTES  # type: ignore[attr-defined]

    def restore() -> None:
        transport.max_size = old  # type: ignore[attr-defined]
    return restore


async def _resume(http: aiohttp.ClientSession, url: URL | str, headers: Mapping[str, str],
                  policy: DownloadPolicy, offset: int, validator: str | None,
                  reason: str, length: int | None) -> aiohttp.ClientResponse:
    """``GET url`` from byte ``offset``; the ``206`` answer that continues at ``offset`` the same
    ``length``-byte object. Raises :class:`FetchError` when the provider does not honour the range."""
    ranged = {**headers, "Range": f"bytes={offset}-"}
    if validator:
        ranged["If-Range"] = validator
    try:
        nxt = await http.get(url, headers=ranged, timeout=policy.timeout, allow_redirects=False)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise FetchError(f"download {reason} after {offset} bytes; resuming failed: "
                         f"{type(exc).__name__}: {exc}", reason=reason) from exc
    if _resume_start(nxt, length) != offset:
        nxt.release()
        raise FetchError(f"download {reason} after {offset} bytes; the provider answered "
                         f"HTTP {nxt.status} to Range: bytes={offset}- (no resume)", reason=reason)
    return nxt
