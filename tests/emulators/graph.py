"""A WhatsApp Cloud API (Graph) emulator, written from Meta's docs: WhatsApp Cloud API reference,
"Media" (retrieve media URL, download media, upload media) and "Messages" (send media by id or
link), and the Graph API "Handling Errors" guide (developers.facebook.com/docs/graph-api).

Endpoints (every one needs ``Authorization: Bearer <token>``; 401 + OAuthException code 190 otherwise):

- ``GET /{version}/{media_id}[?phone_number_id=]`` -> ``{url, mime_type, sha256, file_size, id,
  messaging_product}``; each call mints a new download URL valid ``url_ttl`` seconds. An unknown
  id answers 400 GraphMethodException code 100, subcode 33.
- ``GET /whatsapp_business/attachments/?mid=&ext=&hash=`` serves the bytes; an unknown or expired
  ``hash`` answers 404 (ask ``GET /{media_id}`` for a new URL).
- ``POST /{version}/{phone_number_id}/media`` (multipart: ``messaging_product``, ``type``, ``file``)
  stores the file as a new media id -> ``{id}``; a missing field answers 400 code 100.
- ``POST /{version}/{phone_number_id}/messages`` (JSON; image/video/audio/document/sticker by ``id``
  or ``link``, or text) -> ``{messaging_product, contacts, messages: [{id: "wamid..."}]}``. A
  ``link`` is fetched with a plain GET (no auth), as Meta does; a failed fetch answers 400 code
  131053 "Media upload error". Bad bodies answer 400 code 100 (unknown id: subcode 33).

Failure knobs: ``expire_next_urls`` (the next N minted URLs are born expired), ``alter_bytes``
(media ids served with byte 0 flipped: digest mismatch), ``fail_next`` (next N downloads answer 500),
``body_fault`` (:class:`tests.emulators.faults.BodyFault`: the next downloads break or stall
part-way) and ``ranges`` (default true: downloads honour ``Range: bytes=N-``).
Records: ``requests`` ``(method, path, headers)`` of every request, ``retrievals``
``(media_id, phone_number_id)``, ``downloads`` (media ids served), ``uploads``, ``messages``.
Any ``vX.Y`` version is accepted; ``graph_url`` is ``{base_url}/{api_version}``.

Run standalone for a manual walkthrough:
``python -m tests.emulators.graph --port 8090 --dir DIR --token graph-token``.
"""

from __future__ import annotations

import argparse
import hashlib
import mimetypes
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
from aiohttp import web

from tests.emulators.faults import BodyFault, serve_media

MEDIA_TYPES = ("image", "video", "audio", "document", "sticker")
_VERSION = r"{version:v\d+\.\d+}"


@dataclass
class _Media:
    path: Path
    mime_type: str
    sha256: str  # lower-case hex
    size: int
    file_size_as_string: bool


class Upload(NamedTuple):
    """One accepted ``POST /{phone_number_id}/media``."""

    phone_number_id: str
    type: str
    filename: str | None
    sha256: str
    size: int


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 16):
            digest.update(chunk)
    return digest.hexdigest()


def _graph_error(status: int, message: str, code: int, type_: str = "OAuthException",
                 subcode: int | None = None, details: str | None = None) -> web.Response:
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    if details is not None:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    error["fbtrace_id"] = "A" + secrets.token_urlsafe(16)
    return web.json_response({"error": error}, status=status)


def _unknown_object(object_id: str) -> web.Response:
    """Meta's answer for an unknown or expired media id (media_retrieval_error_100_33.json)."""
    return _graph_error(
        400, f"Unsupported get request. Object with ID '{object_id}' does not exist, cannot be "
        "loaded due to missing permissions, or does not support this operation. Please read the "
        "Graph API documentation at https://developers.facebook.com/docs/graph-api",
        100, "GraphMethodException", subcode=33)


def _invalid(details: str) -> web.Response:
    return _graph_error(400, "(#100) Invalid parameter", 100, details=details)


class GraphEmulator:
    """State and app of one emulated Graph API host (graph.facebook.com + lookaside)."""

    def __init__(self, token: str = "graph-token", url_ttl: float = 300.0, api_version: str = "v23.0"):
        self.token = token
        self.url_ttl = url_ttl
        self.api_version = api_version
        self.base_url = ""  # set by the test once the server listens
        self.media: dict[str, _Media] = {}
        self.urls: dict[str, tuple[str, float]] = {}  # hash -> (media id, expiry epoch)
        self.expire_next_urls = 0
        self.alter_bytes: set[str] = set()
        self.fail_next = 0
        self.body_fault: BodyFault | None = None
        self.ranges = True
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.retrievals: list[tuple[str, str | None]] = []
        self.downloads: list[str] = []
        self.uploads: list[Upload] = []
        self.messages: list[dict[str, Any]] = []
        self._tmpdir: Path | None = None

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.requests.append((request.method, request.path, dict(request.headers)))
            return await handler(request)

        self.app = web.Application(middlewares=[record])
        self.app.router.add_get("/whatsapp_business/attachments/", self._download)
        self.app.router.add_get(f"/{_VERSION}/{{media_id}}", self._retrieve)
        self.app.router.add_post(f"/{_VERSION}/{{phone_number_id}}/media", self._upload)
        self.app.router.add_post(f"/{_VERSION}/{{phone_number_id}}/messages", self._send)
        self.app.on_cleanup.append(self._cleanup)

    @property
    def graph_url(self) -> str:
        """``{base_url}/{api_version}``: what the gateway uses as its Graph base URL."""
        return f"{self.base_url}/{self.api_version}"

    def add_media(self, path: Path, mime_type: str, media_id: str | None = None,
                  file_size_as_string: bool = False) -> str:
        """Register ``path`` (served from disk, not copied) as a media id; return the id.

        ``file_size_as_string``: answer ``file_size`` as a string, as the docs show it.
        """
        media_id = media_id or str(secrets.randbelow(9 * 10**15) + 10**15)
        self.media[media_id] = _Media(path, mime_type, _sha256_file(path), path.stat().st_size,
                                      file_size_as_string)
        return media_id

    def _authorized(self, request: web.Request) -> web.Response | None:
        """None if the bearer token is right, else the 401 Graph answer."""
        header = request.headers.get("Authorization", "")
        if header == f"Bearer {self.token}":
            return None
        message = ("Invalid OAuth access token - Cannot parse access token" if header
                   else "An active access token must be used to query information about the current user.")
        resp = _graph_error(401, message, 190)
        resp.headers["WWW-Authenticate"] = f'OAuth "Facebook Platform" "invalid_token" "{message}"'
        return resp

    async def _retrieve(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        media_id = request.match_info["media_id"]
        self.retrievals.append((media_id, request.query.get("phone_number_id")))
        media = self.media.get(media_id)
        if media is None:
            return _unknown_object(media_id)
        expiry = time.time() + self.url_ttl
        if self.expire_next_urls > 0:
            self.expire_next_urls -= 1
            expiry = time.time() - 1
        url_hash = secrets.token_urlsafe(32)
        self.urls[url_hash] = (media_id, expiry)
        return web.json_response({
            "url": f"{self.base_url}/whatsapp_business/attachments/?mid={media_id}"
                   f"&ext={int(expiry)}&hash={url_hash}",
            "mime_type": media.mime_type,
            "sha256": media.sha256,
            "file_size": str(media.size) if media.file_size_as_string else media.size,
            "id": media_id,
            "messaging_product": "whatsapp",
        })

    async def _download(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._authorized(request)) is not None:
            return denied
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=500, text="Internal Server Error")
        minted = self.urls.get(request.query.get("hash", ""))
        if minted is None or minted[0] != request.query.get("mid") or time.time() > minted[1]:
            return web.Response(status=404, text="URL signature expired or unknown")
        media_id = minted[0]
        media = self.media.get(media_id)
        if media is None or not media.path.exists():
            return web.Response(status=404, text="Not Found")
        self.downloads.append(media_id)
        headers = {"Content-Type": media.mime_type}
        if media_id not in self.alter_bytes:
            return await serve_media(request, media.path, headers, self.body_fault, self.ranges)
        data = bytearray(media.path.read_bytes())
        if data:
            data[0] ^= 0xFF
        return web.Response(body=bytes(data), headers=headers)

    async def _upload(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="graph-emulator-"))
        fields: dict[str, str] = {}
        dest = self._tmpdir / secrets.token_hex(8)
        filename: str | None = None
        got_file = False
        if request.content_type == "application/x-www-form-urlencoded":  # a form without a file
            fields = {k: str(v) for k, v in (await request.post()).items()}
        elif request.content_type != "multipart/form-data":
            return _graph_error(400, "(#100) The parameter file is required", 100)
        else:
            async for part in await request.multipart():
                if not isinstance(part, aiohttp.BodyPartReader):
                    continue
                if part.name == "file":
                    got_file, filename = True, part.filename
                    with dest.open("wb") as fh:
                        while chunk := await part.read_chunk():
                            fh.write(chunk)
                elif part.name:
                    fields[part.name] = await part.text()
        missing = [n for n in ("messaging_product", "type") if not fields.get(n)]
        if not got_file:
            missing.append("file")
        if missing or fields["messaging_product"] != "whatsapp":
            dest.unlink(missing_ok=True)
            if missing:
                return _graph_error(400, f"(#100) The parameter {missing[0]} is required", 100)
            return _graph_error(400, "(#100) Param messaging_product must be one of {WHATSAPP}", 100)
        media_id = self.add_media(dest, fields["type"])
        media = self.media[media_id]
        self.uploads.append(Upload(request.match_info["phone_number_id"], fields["type"], filename,
                                   media.sha256, media.size))
        return web.json_response({"id": media_id})

    async def _send(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # the Graph API answers any unparsable body with 400
            return _invalid("Request body is not valid JSON")
        if not isinstance(body, dict):
            return _invalid("Request body must be a JSON object")
        if body.get("messaging_product") != "whatsapp":
            return _invalid("Param messaging_product must be 'whatsapp'")
        if not body.get("to"):
            return _invalid("The parameter to is required")
        mtype = body.get("type")
        if mtype not in (*MEDIA_TYPES, "text"):
            return _invalid(f"Unsupported message type: {mtype!r}")
        obj = body.get(mtype)
        if not isinstance(obj, dict):
            return _invalid(f"The parameter {mtype} is required")
        record: dict[str, Any] = {"phone_number_id": request.match_info["phone_number_id"],
                                  "to": str(body["to"]), "type": mtype, mtype: obj}
        if mtype == "text":
            if not obj.get("body"):
                return _invalid("The parameter text['body'] is required")
        elif ("id" in obj) == ("link" in obj):
            return _invalid(f"Param {mtype} must have exactly one of {mtype}['id'] or {mtype}['link']")
        elif "id" in obj:
            media = self.media.get(str(obj["id"]))
            if media is None:
                return _unknown_object(str(obj["id"]))
            record.update(sha256=media.sha256, size=media.size)
        else:
            fetched = await self._fetch_link(str(obj["link"]))
            if isinstance(fetched, str):
                return _graph_error(400, "(#131053) Media upload error", 131053, details=fetched)
            record.update(sha256=fetched[0], size=fetched[1])
        self.messages.append(record)
        return web.json_response({
            "messaging_product": "whatsapp",
            "contacts": [{"input": str(body["to"]), "wa_id": str(body["to"])}],
            "messages": [{"id": "wamid." + secrets.token_urlsafe(30)}],
        })

    async def _fetch_link(self, link: str) -> tuple[str, int] | str:
        """GET ``link`` without auth, as Meta does: ``(sha256 hex, size)``, or why it failed."""
        digest, size = hashlib.sha256(), 0
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                async with session.get(link) as resp:
                    if resp.status != 200:
                        return (f"Downloading media from weblink failed with http code {resp.status}, "
                                f"status message {resp.reason}")
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        digest.update(chunk)
                        size += len(chunk)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return f"Downloading media from weblink failed: {exc!r}"
        return digest.hexdigest(), size

    async def _cleanup(self, app: web.Application) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


def main() -> None:
    """Register every file of ``--dir`` (sorted) as media ids 1000000000000001, ...2, ... and
    serve on ``--port``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--token", default="graph-token")
    parser.add_argument("--url-ttl", type=float, default=300.0)
    parser.add_argument("--api-version", default="v23.0")
    args = parser.parse_args()
    emu = GraphEmulator(token=args.token, url_ttl=args.url_ttl, api_version=args.api_version)
    emu.base_url = f"http://{args.host}:{args.port}"
    rows = []
    files = [f for f in sorted(args.dir.iterdir()) if f.is_file()]
    for number, f in enumerate(files, start=1):  # stable ids, so a walkthrough can name them
        mime = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
        rows.append((emu.add_media(f, mime, media_id=str(1000000000000000 + number)), f.name, mime))
    print(f"Graph emulator on {emu.graph_url}, Authorization: Bearer {args.token}", flush=True)
    print(f"{'media_id':<18}{'filename':<28}mime")
    for row in rows:
        print(f"{row[0]:<18}{row[1]:<28}{row[2]}", flush=True)
    web.run_app(emu.app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
