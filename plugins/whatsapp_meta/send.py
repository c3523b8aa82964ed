"""Outbound sends through the Cloud API: Meta's type and size limits, the upload
(``POST /{version}/{phone-number-id}/media``) and the message (.../cloud-api/reference/messages).
"""

from __future__ import annotations

from typing import Any

import aiohttp
from yarl import URL

from gateway.sdk import SendError, SendRefused, SendRequest, SendResult
from plugins.whatsapp_meta.settings import MetaState

MB, KB = 1_000_000, 1_000  # Meta states its limits in MB and KB; decimal units are the safe reading
LIMITS: dict[str, tuple[tuple[str, ...], int]] = {
    "image": (("image/jpeg", "image/png"), 5 * MB),
    "video": (("video/mp4", "video/3gpp"), 16 * MB),
    "audio": (("audio/aac", "audio/amr", "audio/mpeg", "audio/mp4", "audio/ogg"), 16 * MB),
    "document": ((), 100 * MB),
    "sticker": (("image/webp",), 100 * KB),
}
ANIMATED_STICKER_LIMIT = 500 * KB


class MetaSend(MetaState):
    """Outbound: Meta's limits, the upload and ``send`` of the provider contract."""

    async def check_limits(self, request: SendRequest) -> None:
        """Raise :class:`SendRefused` when Meta would refuse the media (type, size, codec)."""
        kind = "audio" if request.type == "voice" else request.type
        if kind not in LIMITS:
            raise SendRefused(f"type {request.type!r} is not a Cloud API media type")
        mime, size = request.media.record["mimetype"], request.media.record["size"]
        types, limit = LIMITS[kind]
        if types and mime not in types:
            raise SendRefused(f"Meta accepts {kind} as {', '.join(types)}; this file is {mime}")
        head = b""
        if (kind == "audio" and mime == "audio/ogg") or kind == "sticker":
            obj = await request.media.open(0, 4095)
            try:
                head = b"".join([c async for c in obj.chunks])
            finally:
                await obj.close()
        if kind == "audio" and mime == "audio/ogg" and b"OpusHead" not in head:
            raise SendRefused("Meta accepts audio/ogg only with the Opus codec; this file is not Opus")
        if kind == "sticker" and _animated_webp(head):
            limit = ANIMATED_STICKER_LIMIT
        if size > limit:
            raise SendRefused(f"Meta's limit for {kind} ({mime}) is {limit} bytes; this file has {size} bytes")

    async def send(self, request: SendRequest) -> SendResult:
        """Check the limits, then upload and send by id, or send by link."""
        assert self._http is not None
        known = set(self.settings.access_tokens) | set(self.settings.phone_number_ids)
        token = self.token_for(request.account)
        if token is None or (known and request.account not in known):
            raise SendError(404, f"unknown account: no business number {request.account!r} is configured")
        await self.check_limits(request)
        kind = "audio" if request.type == "voice" else request.type
        by = request.by or self.settings.send_by
        obj: dict[str, Any] = ({"link": request.media.link} if by == "link"
                               else {"id": await self._upload(request, token)})
        if request.caption and kind in ("image", "video", "document"):
            obj["caption"] = request.caption
        if kind == "document":
            obj["filename"] = request.filename or request.media.record["filename"]
        body = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": request.to,
                "type": kind, kind: obj}
        answer = await self._post_json(self._endpoint(request.account, "messages"), token, json=body)
        messages = answer.get("messages") if isinstance(answer, dict) else None
        if not messages or not isinstance(messages[0], dict) or "id" not in messages[0]:
            raise SendError(502, {"error": "the Graph API answered without a message id", "answer": answer})
        return SendResult(provider_message_id=messages[0]["id"], response=answer)

    async def _upload(self, request: SendRequest, token: str) -> str:
        """``POST /{version}/{phone-number-id}/media``, the file streamed from storage."""
        record = request.media.record
        opened = await request.media.open(None, None)
        try:
            with aiohttp.MultipartWriter("form-data") as form:
                form.append("whatsapp").set_content_disposition("form-data", name="messaging_product")
                form.append(record["mimetype"]).set_content_disposition("form-data", name="type")
                part = form.append(opened.chunks, {"Content-Type": record["mimetype"]})
                part.set_content_disposition("form-data", name="file", filename=record["filename"])
                answer = await self._post_json(self._endpoint(request.account, "media"), token, data=form)
        finally:
            await opened.close()
        media_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(media_id, str):
            raise SendError(502, {"error": "the Graph API upload answered without an id", "answer": answer})
        return media_id

    async def _post_json(self, url: URL, token: str, **kwargs: Any) -> Any:
        assert self._http is not None
        try:
            async with self._http.post(url, headers=self._auth(token), timeout=self._timeout, **kwargs) as resp:
                try:
                    body = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    body = {"error": (await resp.text())[:500]}
                if resp.status >= 400:
                    raise SendError(resp.status, body)
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SendError(502, {"error": f"Graph API unreachable: {type(exc).__name__}: {exc}"}) from exc


def _animated_webp(head: bytes) -> bool:
    """RIFF/WEBP with a VP8X chunk whose animation flag (0x02) is set."""
    return (len(head) >= 21 and head[:4] == b"RIFF" and head[8:12] == b"WEBP"
            and head[12:16] == b"VP8X" and bool(head[20] & 0x02))
