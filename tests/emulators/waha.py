"""A WAHA emulator, written from the WAHA docs (https://waha.devlike.pro/docs/how-to/receive-messages/).

- ``GET /api/files/{session}/{file}`` serves a registered file; it needs ``X-Api-Key`` (401
  otherwise), and a file is deleted ``lifetime`` seconds after it was registered (404 then), as
  WAHA does with ``WHATSAPP_FILES_LIFETIME``.
- ``chunked=True`` streams without Content-Length; ``delay`` (seconds) slows every answer;
  ``fail_next`` makes the next N file requests answer 500.
- ``requests`` records ``(path, headers)`` of every request it got.
- ``body_fault`` (:class:`tests.emulators.faults.BodyFault`): the next file downloads send the
  headers and part of the body, then drop the connection or stall; ``ranges`` (default true):
  honour ``Range: bytes=N-`` with ``206``, or always send the whole body.
- ``POST /api/sendImage|sendFile|sendVoice|sendVideo`` (https://waha.devlike.pro/docs/how-to/send-messages/)
  need ``X-Api-Key``; ``{session, chatId, file: {mimetype, filename, url | data}, caption?, convert?}``.
  ``file.url`` is fetched with a plain GET (no headers), as WAHA does; ``file.data`` is base64.
  Each accepted send is recorded in ``sent`` (with the sha256 and size of the bytes WAHA got) and
  answered 201 with the message (``id`` = ``true_<chatId>_<random>``). ``send_error`` =
  ``(status, body)`` makes the next send answer that instead.
- ``GET /api/sessions`` and ``POST /api/sendText``: for pass-through tests (``texts`` records).
- ``delete_after`` (seconds; ``--delete-after``): per-message files, each deleted that long after
  its webhook was first sent, as WAHA deletes a received file 180 s after writing it. Their URLs
  (:meth:`WahaEmulator.message_file_url`) name a file registered with :meth:`add_file` (or, from
  the command line, a file of ``--dir``), the message and the time its webhook was first sent, so
  every message has its own clock and no state is shared with the sender: the file is served
  until ``sent + delete_after``, then answers 404 (counted in ``deleted_hits``; a file served in
  time is counted in ``message_files_served``). ``GET /_emulator/stats`` gives both counts as JSON.

Run standalone for a manual walkthrough: ``python -m tests.emulators.waha --port 3000 --dir DIR``
(every file in DIR is served under session ``default``; they never expire unless ``--lifetime``
says so, and an expired file's 404 says that it expired).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import mimetypes
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.emulators.faults import BodyFault, serve_media


MESSAGE_FILE = re.compile(r"^(?P<message>[A-Za-z0-9_.-]+)~(?P<sent_ms>\d+)~(?P<name>[^/~]+)$")
"""A per-message file's name: ``{message id}~{first send, epoch milliseconds}~{registered file}``."""


@dataclass
class _File:
    path: Path
    registered: float
    owned: bool  # a copy the emulator may delete


class WahaEmulator:
    """State and app of one emulated WAHA server."""

    def __init__(self, api_key: str = "waha-key", lifetime: float = 180.0, workdir: Path | None = None,
                 delete_after: float | None = None):
        self.api_key = api_key
        self.lifetime = lifetime
        self.delete_after = delete_after
        self.deleted_hits = 0
        self.message_files_served = 0
        self.workdir = workdir
        self.files: dict[tuple[str, str], _File] = {}
        self.expired: set[tuple[str, str]] = set()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.chunked = False
        self.delay = 0.0
        self.fail_next = 0
        self.body_fault: BodyFault | None = None
        self.ranges = True
        self.base_url = ""  # set by the test once the server listens
        self.sent: list[dict] = []
        self.texts: list[dict] = []
        self.send_error: tuple[int, dict] | None = None
        self.app = web.Application(client_max_size=256 * 1024 * 1024)
        self.app.router.add_get("/api/files/{session}/{file}", self._serve_file)
        for endpoint in ("sendImage", "sendFile", "sendVoice", "sendVideo"):
            self.app.router.add_post(f"/api/{endpoint}", self._send)
        self.app.router.add_get("/api/sessions", self._sessions)
        self.app.router.add_post("/api/sendText", self._send_text)
        self.app.router.add_get("/_emulator/stats", self._stats)

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

    @staticmethod
    def message_file_url(base_url: str, message_id: str, sent_at: float, name: str,
                         session: str = "default") -> str:
        """The URL of message ``message_id``'s own copy of the registered file ``name``, whose
        webhook was first sent at ``sent_at`` (epoch seconds): with ``delete_after`` set, it
        answers 404 from ``sent_at + delete_after`` on."""
        file = f"{message_id}~{int(sent_at * 1000)}~{name}"
        assert MESSAGE_FILE.match(file), file
        return f"{base_url}/api/files/{session}/{file}"

    def _message_file(self, session: str, file: str) -> _File | None | bool:
        """A per-message file's registered file; False once it was deleted; None: not one."""
        match = MESSAGE_FILE.match(file) if self.delete_after is not None else None
        if match is None:
            return None
        assert self.delete_after is not None
        if time.time() >= int(match["sent_ms"]) / 1000 + self.delete_after:
            self.deleted_hits += 1
            return False
        entry = self.files.get((session, match["name"]))
        self.message_files_served += entry is not None
        return entry

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"deleted_hits": self.deleted_hits,
                                  "message_files_served": self.message_files_served})

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
        own = self._message_file(*key)
        if own is False:
            return web.json_response({"statusCode": 404, "message": f"Not Found (deleted {self.delete_after:g} s "
                                      "after the webhook was sent, as WAHA does)"}, status=404)
        entry = own if own is not None else self.files.get(key)
        if entry is not None and time.time() - entry.registered > self.lifetime:
            del self.files[key]
            self.expired.add(key)
            if entry.owned:
                entry.path.unlink(missing_ok=True)
            entry = None
        if entry is None and key in self.expired:
            return web.json_response({"statusCode": 404, "message": f"Not Found (the file expired: "
                                      f"files live {self.lifetime:g} s, WHATSAPP_FILES_LIFETIME)"}, status=404)
        if entry is None or not entry.path.exists():
            return web.json_response({"statusCode": 404, "message": "Not Found"}, status=404)
        ctype = mimetypes.guess_type(entry.path.name)[0] or "application/octet-stream"
        if not self.chunked:
            return await serve_media(request, entry.path, {"Content-Type": ctype}, self.body_fault, self.ranges)
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with entry.path.open("rb") as fh:
            while chunk := fh.read(64 * 1024):
                await resp.write(chunk)
        await resp.write_eof()
        return resp


    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("X-Api-Key") != self.api_key:
            return web.json_response({"statusCode": 401, "message": "Unauthorized"}, status=401)
        return None

    async def _send(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.headers)))
        if (denied := self._unauthorized(request)) is not None:
            return denied
        if self.send_error is not None:
            status, body = self.send_error
            self.send_error = None
            return web.json_response(body, status=status)
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # as NestJS answers any body it cannot parse
            return web.json_response({"statusCode": 400, "message": "body is not JSON"}, status=400)
        file = body.get("file") if isinstance(body, dict) else None
        if not isinstance(file, dict) or not body.get("chatId") or not (file.get("url") or file.get("data")):
            return web.json_response({"statusCode": 400, "message": "chatId and file.url or file.data are required"},
                                     status=400)
        if file.get("url"):
            async with aiohttp.ClientSession() as http:  # a plain GET, no auth headers
                async with http.get(file["url"]) as r:
                    if r.status != 200:
                        return web.json_response({"statusCode": 500, "message": f"fetching file.url: {r.status}"},
                                                 status=500)
                    data = await r.read()
        else:
            data = base64.b64decode(file["data"])
        record = {"endpoint": request.path.rsplit("/", 1)[1], "session": body.get("session"),
                  "chatId": body["chatId"], "file": {k: v for k, v in file.items() if k != "data"},
                  "via": "url" if file.get("url") else "data", "sha256": hashlib.sha256(data).hexdigest(),
                  "size": len(data), "caption": body.get("caption"), "convert": body.get("convert")}
        self.sent.append(record)
        message_id = f"true_{body['chatId']}_{secrets.token_hex(10).upper()}"
        return web.json_response({"id": message_id, "timestamp": int(time.time()), "fromMe": True,
                                  "to": body["chatId"], "hasMedia": True}, status=201)

    async def _sessions(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        return web.json_response([{"name": "default", "status": "WORKING"}])

    async def _send_text(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        body = await request.json()
        self.texts.append(body)
        return web.json_response({"id": f"true_{body.get('chatId')}_TEXT", "body": body.get("text")}, status=201)


def main() -> None:
    """Serve every file of ``--dir`` under session ``default`` on ``--port``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--api-key", default="waha-key")
    parser.add_argument("--lifetime", type=float, default=0.0,
                        help="seconds after start when the files answer 404, as WAHA's "
                             "WHATSAPP_FILES_LIFETIME (180 there); default 0: never")
    parser.add_argument("--delete-after", type=float, default=None,
                        help="serve per-message files ({message}~{sent ms}~{file of --dir}) until this "
                             "many seconds after their webhook was first sent, then 404 (WAHA: 180)")
    args = parser.parse_args()
    emu = WahaEmulator(api_key=args.api_key, lifetime=args.lifetime, delete_after=args.delete_after)
    emu.base_url = f"http://{args.host}:{args.port}"
    for f in sorted(args.dir.iterdir()):
        if f.is_file():
            emu.add_file(f, copy=False)
    emu.lifetime = float("inf") if args.lifetime <= 0 else args.lifetime
    expiry = "never expire" if emu.lifetime == float("inf") else f"answer 404 after {emu.lifetime:g} s"
    if emu.delete_after is not None:
        expiry += f"; per-message copies deleted {emu.delete_after:g} s after their webhook"
    print(f"WAHA emulator on {emu.base_url}, X-Api-Key: {args.api_key}, files ({expiry}): "
          f"{', '.join(n for _, n in emu.files)}", flush=True)
    web.run_app(emu.app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
