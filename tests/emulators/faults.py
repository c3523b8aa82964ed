"""Media bodies that break part-way, shared by the WAHA and Graph emulators.

A :class:`BodyFault` on an emulator makes its next ``times`` full-body downloads (requests without
``Range``) send the headers (``200``, the whole ``Content-Length``, ``Accept-Ranges: bytes``, a
strong ``ETag``) and the first ``at`` bytes, then either

- ``mode="drop"``: close the connection (the client sees an incomplete payload), or
- ``mode="stall"``: send nothing more for ``stall`` seconds (the client's idle timeout fires).

``ranges`` (default true) says whether the emulator honours ``Range: bytes=N-`` with a ``206`` and
``Content-Range`` (RFC 9110 §14); false serves the whole body with ``200`` whatever the request
asks, as a server without range support does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web


@dataclass
class BodyFault:
    """Break the next ``times`` full-body responses after ``at`` bytes (see the module docstring)."""

    mode: str = "drop"  # "drop" | "stall"
    at: int = 64 * 1024
    times: int = 1
    stall: float = 3600.0


def _etag(path: Path) -> str:
    """The strong ETag aiohttp's FileResponse gives the same file, so ``If-Range`` matches."""
    st = path.stat()
    return f'"{st.st_mtime_ns:x}-{st.st_size:x}"'


async def serve_media(request: web.Request, path: Path, headers: dict[str, str],
                      fault: BodyFault | None, ranges: bool = True) -> web.StreamResponse:
    """Serve ``path`` for a download request, applying ``fault`` (decremented when used) and the
    ``ranges`` behaviour."""
    size = path.stat().st_size
    headers = {**headers, "ETag": _etag(path)}
    if fault is not None and fault.times > 0 and "Range" not in request.headers:
        fault.times -= 1
        resp = web.StreamResponse(headers={**headers, "Accept-Ranges": "bytes"})
        resp.content_length = size
        await resp.prepare(request)
        with path.open("rb") as fh:
            await resp.write(fh.read(min(fault.at, size)))
        transport = request.transport
        assert transport is not None
        while transport.get_write_buffer_size():  # the client gets exactly ``at`` bytes
            await asyncio.sleep(0.005)
        if fault.mode == "stall":
            await asyncio.sleep(fault.stall)
        transport.close()
        return resp
    if ranges:
        return web.FileResponse(path, headers=headers)
    resp = web.StreamResponse(headers=headers)  # no range support: always the whole body
    resp.content_length = size
    await resp.prepare(request)
    with path.open("rb") as fh:
        while chunk := fh.read(64 * 1024):
            await resp.write(chunk)
    await resp.write_eof()
    return resp

