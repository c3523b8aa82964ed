"""A WAHA emulator, written from the WAHA docs (https://waha.devlike.pro/docs/how-to/receive-messages/).

- ``GET /api/files/{session}/{file}`` serves a registered file; it needs ``X-Api-Key`` (401
  otherwise), and a file is deleted ``lifetime`` seconds after it was registered (404 then), as
  WAHA does with ``WHATSAPP_FILES_LIFETIME``.
- ``chunked=True`` streams without Content-Length; ``delay`` (seconds) slows every answer;
  ``fail_next`` makes the next N file requests answer 500.
- ``requests`` records ``(path, headers)`` of every request it got.

Run standalone for a manual walkthrough: ``python -m tests.emulators.waha --port 3000 --dir DIR``
(every file in DIR is served under session ``default``).
"""

from __future__ import annotations

import argparse
import asyncio
import mimetypes
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web


@dataclass
class _File:
    path: Path
    registered: float
    owned: bool  # a copy the emulator may delete


class WahaEmulator:
    """State and app of one emulated WAHA server."""

    def __init__(self, api_key: str = "waha-key", lifetime: float = 180.0, workdir: Path | None = None):
        self.api_key = api_key
        self.lifetime = lifetime
        self.workdir = workdir
        self.files: dict[tuple[str, str], _File] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.chunked = False
        self.delay = 0.0
        self.fail_next = 0
        self.base_url = ""  # set by the test once the server listens
        self.app = web.Application()
        self.app.router.add_get("/api/files/{session}/{file}", self._serve_file)

    def add_file(self, src: Path, session: str = "default", name: str | None = None,
                 copy: bool = True) -> str:
        """Register ``src`` as ``/api/files/{session}/{name}``; return its full URL.

        ``copy``: serve a copy in ``workdir`` (deleted at expiry) instead of ``src`` itself.
        """
        name = name or src.name
        path = src
        if copy:
            assert self.workdir is not None
            dest = self.workdir / session / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            path = dest
        self.files[(session, name)] = _File(path, time.time(), copy)
        return f"{self.base_url}/api/files/{session}/{name}"

    def served(self, name: str) -> int:
        """How many requests asked for a file called ``name``."""
        return sum(1 for p, _ in self.requests if p.endswith("/" + name))

    async def _serve_file(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, dict(request.headers)))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.api_key and request.headers.get("X-Api-Key") != self.api_key:
            return web.json_response({"statusCode": 401, "message": "Unauthorized"}, status=401)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"statusCode": 500, "message": "Internal"}, status=500)
        key = (request.match_info["session"], request.match_info["file"])
        entry = self.files.get(key)
        if entry is not None and time.time() - entry.registered > self.lifetime:
            del self.files[key]
            if entry.owned:
                entry.path.unlink(missing_ok=True)
            entry = None
        if entry is None or not entry.path.exists():
            return web.json_response({"statusCode": 404, "message": "Not Found"}, status=404)
        ctype = mimetypes.guess_type(entry.path.name)[0] or "application/octet-stream"
        if not self.chunked:
            return web.FileResponse(entry.path, headers={"Content-Type": ctype})
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with entry.path.open("rb") as fh:
            while chunk := fh.read(64 * 1024):
                await resp.write(chunk)
        await resp.write_eof()
        return resp


def main() -> None:
    """Serve every file of ``--dir`` under session ``default`` on ``--port``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--api-key", default="waha-key")
    parser.add_argument("--lifetime", type=float, default=180.0)
    args = parser.parse_args()
    emu = WahaEmulator(api_key=args.api_key, lifetime=args.lifetime)
    emu.base_url = f"http://{args.host}:{args.port}"
    for f in sorted(args.dir.iterdir()):
        if f.is_file():
            emu.add_file(f, copy=False)
    emu.lifetime = float("inf") if args.lifetime <= 0 else args.lifetime
    print(f"WAHA emulator on {emu.base_url}, X-Api-Key: {args.api_key}, files: "
          f"{', '.join(n for _, n in emu.files)}", flush=True)
    web.run_app(emu.app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
