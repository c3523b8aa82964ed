"""HTTP plumbing for the providers' drop-in relays: read a bounded body, forward a request and
return the upstream's status and body unchanged, or stream any other request straight through.

Hop-by-hop headers (RFC 9110 §7.6.1) are not forwarded; neither is ``Host``. When a relay could
not store the media and forwarded the original instead (the fallback), its answer says so in
:data:`FALLBACK_HEADER`.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web
from yarl import URL

log = logging.getLogger("gateway.relay")

FALLBACK_HEADER = "X-Gateway-Relay-Fallback"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "host", "content-length"}


class BodyTooLarge(Exception):
    """The request body is over the relay's limit (HTTP 413)."""


def forwardable(headers: "aiohttp.typedefs.LooseHeaders") -> dict[str, str]:
    """``headers`` without hop-by-hop ones."""
    return {k: v for k, v in dict(headers).items() if k.lower() not in HOP_BY_HOP}


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes. Raises :class:`BodyTooLarge` past it."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body over the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1024 * 1024):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body over the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def forward(http: aiohttp.ClientSession, method: str, url: URL, headers: dict[str, str],
                  body: bytes | None, timeout: aiohttp.ClientTimeout) -> tuple[int, bytes, str]:
    """Send the request upstream; ``(status, body, content type)`` as the upstream answered, or
    ``502`` with a JSON error when it was unreachable."""
    try:
        async with http.request(method, url, headers=headers, data=body, allow_redirects=False,
                                timeout=timeout) as resp:
            return resp.status, await resp.read(), resp.headers.get("Content-Type", "application/json")
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.error("relay: %s unreachable: %s", url.origin(), exc)
        message = f'{{"error": "upstream {url.host} unreachable: {type(exc).__name__}"}}'
        return 502, message.encode(), "application/json"


def answer(status: int, body: bytes, content_type: str, fallback: str | None = None) -> web.Response:
    """A response carrying the upstream's status, body and content type unchanged; with
    ``fallback`` (why the media could not be stored, so the original went upstream), also
    :data:`FALLBACK_HEADER` with that reason (one line of printable ASCII, at most 300 characters)."""
    headers = {"Content-Type": content_type}
    if fallback is not None:
        reason = " ".join(fallback.split()).encode("ascii", "replace").decode()
        headers[FALLBACK_HEADER] = reason[:300] or "not stored"
    return web.Response(status=status, body=body, headers=headers)


async def proxy(http: aiohttp.ClientSession, request: web.Request, target: URL,
                timeout: aiohttp.ClientTimeout) -> web.StreamResponse:
    """Stream ``request`` to ``target`` and the answer back, both untouched (any method)."""
    try:
        upstream = await http.request(request.method, target, headers=forwardable(request.headers),
                                      data=request.content if request.body_exists else None,
                                      allow_redirects=False, timeout=timeout)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.error("relay: %s unreachable: %s", target.origin(), exc)
        return web.json_response({"error": f"upstream {target.host} unreachable: {type(exc).__name__}"},
                                 status=502)
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=forwardable(upstream.headers))
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(256 * 1024):
            await response.write(chunk)
        await response.write_eof()
        return response
