"""Outbound sends through WAHA's ``/api/send{Image,Video,Voice,File}``
(https://waha.devlike.pro/docs/how-to/send-messages/).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp

from gateway.sdk import OutboundMedia, SendError, SendRefused, SendRequest, SendResult, relay
from plugins.whatsapp_waha.settings import WahaState

SEND_ENDPOINTS = {"image": "sendImage", "sticker": "sendImage", "video": "sendVideo", "voice": "sendVoice",
                  "audio": "sendFile", "document": "sendFile"}


class WahaSend(WahaState):
    """Outbound: ``send`` of the provider contract."""

    async def send(self, request: SendRequest) -> SendResult:
        """``POST /api/send{Image,Video,Voice,File}``. Raises :class:`SendRefused` (voice that is not
        Ogg/Opus without ``convert``) or :class:`SendError` (WAHA's status and body; 502 unreachable)."""
        assert self._http is not None
        record = request.media.record
        if self.settings.sessions and request.account not in self.settings.sessions:
            raise SendError(404, f"unknown account: no WAHA session {request.account!r} is configured")
        endpoint = SEND_ENDPOINTS.get(request.type)
        if endpoint is None:
            raise SendRefused(f"type {request.type!r} cannot be sent through WAHA")
        if request.type == "voice" and not request.convert and not await _is_ogg_opus(request.media):
            raise SendRefused(f"a voice note must be audio/ogg with the Opus codec (this is {record['mimetype']}); "
                              "ask for convert: true to let WAHA convert it")
        file: dict[str, Any] = {"mimetype": record["mimetype"],
                                "filename": request.filename or record["filename"]}
        if record["size"] <= self.settings.send_inline_max_bytes:
            opened = await request.media.open(None, None)
            try:
                file["data"] = base64.b64encode(b"".join([c async for c in opened.chunks])).decode()
            finally:
                await opened.close()
        else:
            file["url"] = request.media.link
        body: dict[str, Any] = {"session": request.account, "chatId": request.to, "file": file}
        if request.caption and endpoint != "sendVoice":
            body["caption"] = request.caption
        if request.convert and endpoint in ("sendVoice", "sendVideo"):
            body["convert"] = True
        status, raw, _ = await relay.forward(
            self._http, "POST", self.base.with_path(f"/api/{endpoint}"),
            {"Content-Type": "application/json", **self._api_headers()}, json.dumps(body).encode(),
            self._timeout or aiohttp.ClientTimeout(total=60))
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {"error": raw[:500].decode("utf-8", "replace")}
        if status >= 300:
            raise SendError(status, answer)
        return SendResult(provider_message_id=sent_message_id(answer) or "", response=answer)


def sent_message_id(answer: Any) -> str | None:
    """The sent message's id in WAHA's answer: ``id`` as a string (NOWEB, GOWS) or as
    ``{_serialized}`` (WEBJS), or ``key.id``."""
    if not isinstance(answer, dict):
        return None
    mid = answer.get("id")
    if isinstance(mid, str):
        return mid
    serialized = mid.get("_serialized") if isinstance(mid, dict) else None
    if isinstance(serialized, str):
        return serialized
    key = answer.get("key")
    key_id = key.get("id") if isinstance(key, dict) else None
    return key_id if isinstance(key_id, str) else None


async def _is_ogg_opus(media: OutboundMedia) -> bool:
    if media.record["mimetype"] != "audio/ogg":
        return False
    opened = await media.open(0, 4095)
    try:
        head = b"".join([c async for c in opened.chunks])
    finally:
        await opened.close()
    return b"OpusHead" in head
