"""The drop-in relay of WAHA's API under ``relay_prefix``: the send endpoints store the file and
send a gateway link; every other path is passed through untouched.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from gateway.sdk import MediaUnavailable, Origin, PayloadError, base_mime, load_json, relay, signature_matches
from plugins.whatsapp_waha.send import sent_message_id
from plugins.whatsapp_waha.settings import WahaState

log = logging.getLogger("gateway.providers.waha")


RELAYED_SENDS = {"sendImage": "image", "sendVideo": "video", "sendVoice": "voice", "sendFile": "document"}


class WahaRelay(WahaState):
    """The relay's request handler."""

    async def relay_request(self, request: web.Request) -> web.StreamResponse:
        """The drop-in relay: the send endpoints store and rewrite ``file``; the rest pass through."""
        assert self._http is not None
        tail = request.match_info["tail"]
        target = self.base.with_path(f"/api/{tail}").with_query(request.query)
        timeout = self._timeout or aiohttp.ClientTimeout(total=300)
        if request.method != "POST" or tail not in RELAYED_SENDS:
            return await relay.proxy(self._http, request, target, timeout)
        expected = self._api_headers().get("X-Api-Key")
        if expected and not signature_matches(expected, request.headers.get("X-Api-Key", "")):
            log.warning("relay: refused a %s without the right X-Api-Key (from %s)", tail, request.remote,
                        extra={"provider": self.name})
            return web.json_response({"statusCode": 401, "message": "Unauthorized"}, status=401)
        try:
            raw = await relay.read_body(request, self._max_bytes * 4 // 3 + 1024 * 1024)
        except relay.BodyTooLarge as exc:
            return web.json_response({"error": str(exc)}, status=413)
        body, record, fallback = await self._store_relayed(raw, RELAYED_SENDS[tail])
        data = json.dumps(body).encode() if record is not None else raw
        headers = {**relay.forwardable(request.headers), "Content-Type": "application/json"}
        status, answer, ctype = await relay.forward(self._http, "POST", target, headers, data, timeout)
        self.outbound.count_send(self.name, RELAYED_SENDS[tail], status)
        if record is not None and status < 300:
            try:
                sent_id = sent_message_id(json.loads(answer))
            except ValueError:
                sent_id = None
            await self.outbound.mark_sent(record["id"], body.get("chatId"), sent_id)
        elif record is not None:
            await self.outbound.discard_refused(record, status)
        return relay.answer(status, answer, ctype, fallback)

    async def _store_relayed(self, raw: bytes, media_type: str
                             ) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
        """Store ``file`` of a relayed send body; ``(body with our link, record, None)``, or
        ``(body, None, None)`` when there is nothing to store, or ``(body, None, why)`` when
        storing failed (the fallback)."""
        try:
            body = load_json(raw)
        except PayloadError:
            return {}, None, None  # not JSON, or nested too deep: passed through, WAHA will say so
        file = body.get("file") if isinstance(body, dict) else None
        if not isinstance(file, dict) or not (file.get("url") or file.get("data")):
            return body if isinstance(body, dict) else {}, None, None
        origin = Origin(provider=self.name, account=str(body.get("session") or "default"),
                        chat=body.get("chatId") if isinstance(body.get("chatId"), str) else None,
                        declared_mimetype=base_mime(file.get("mimetype")) if isinstance(file.get("mimetype"), str) else None,
                        filename=file.get("filename") if isinstance(file.get("filename"), str) else None)
        try:
            if isinstance(file.get("url"), str) and file["url"]:
                record = await self.outbound.store_url(file["url"], origin)
            elif isinstance(file.get("data"), str):
                record = await self.outbound.store_base64(file["data"], origin)
            else:
                return body, None, None
        except MediaUnavailable as exc:
            log.warning("relay: could not store the %s of a WAHA send (%s); forwarding the original",
                        media_type, exc, extra={"provider": self.name})
            self.outbound.count_fallback(self.name)
            return body, None, str(exc)
        link = self.outbound.outbound_media(record).link
        body["file"] = {"mimetype": file.get("mimetype") or record["mimetype"],
                        "filename": file.get("filename") or record["filename"], "url": link}
        return body, record, None
