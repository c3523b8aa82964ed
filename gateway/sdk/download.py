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

Every failure while reading the body is a :class:`gateway.sdk.provider.FetchError` (retryable), so the
ingest treats it as any other failed download: retried, then forwarded with a note.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
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
BODY_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)
"""What aiohttp raises when a body breaks (payload incomplete, connection reset) or stalls."""
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class DownloadPolicy:
    """Timeouts and resume limit for provider downloads.

    ``idle_timeout``, ``connect_timeout``, ``base_timeout``: seconds; ``min_rate``: bytes per
    second the total timeout allows for; ``max_bytes``: the size assumed when none is declared;
    ``max_resumes``: ``Range`` requests per attempt after a broken body (0: no resume).
    """

    idle_timeout: float = 30.0
    connect_timeout: float = 10.0
    base_timeout: float = 300.0
    min_rate: int = 100 * 1024
    max_bytes: int = 100 * 1024 * 1024
    max_resumes: int = 3

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
            restore = _widen_reads(current)
            chunks = current.content.iter_chunked(CHUNK)
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
    finally:
        if current is not resp:
            current.release()


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
