"""The drop-in relay of ``POST /{version}/{phone-number-id}/messages`` under ``relay_prefix``: a
media ``link`` is stored and replaced by a gateway link before the request goes to Meta.
"""

from __future__ import annotations

import json
import logging

import aiohttp
from aiohttp import web

from gateway.sdk import MediaUnavailable, Origin, PayloadError, load_json, relay, signature_matches
from plugins.whatsapp_meta.settings import MEDIA_KINDS, MetaState

log = logging.getLogger("gateway.providers.meta")


class MetaRelay(MetaState):
    """The relay's request handler."""

    async def relay_messages(self, request: web.Request) -> web.Response:
        """Drop-in ``POST {relay_prefix}/{version}/{phone-number-id}/messages``: a media ``link`` is
        stored and replaced by a signed gateway link, then the body goes to the Graph API with the
        caller's bearer token; the Graph API's status and body are answered unchanged (when the
        link could not be stored and went through as it was, with ``X-Gateway-Relay-Fallback``). The caller's
        token must be one of the configured access tokens (when any is configured)."""
        assert self._http is not None
        auth = request.headers.get("Authorization", "")
        known = [t for t in [self._secret(self.settings.access_token),
                             *(v.get_secret_value() for v in self.settings.access_tokens.values())] if t]
        if known and not any(signature_matches(f"Bearer {t}", auth) for t in known):
            log.warning("relay: refused a send without a configured access token (from %s)", request.remote,
                        extra={"provider": self.name})
            return web.json_response({"error": {"message": "Invalid OAuth access token", "type": "OAuthException",
                                                "code": 190}}, status=401)
        pnid, version = request.match_info["phone_number_id"], request.match_info["version"]
        try:
            raw = await relay.read_body(request, 1024 * 1024)
            body = load_json(raw)
        except relay.BodyTooLarge as exc:
            return web.json_response({"error": {"message": str(exc), "code": 100}}, status=413)
        except PayloadError:  # not JSON, or nested too deep: passed through for the Graph API to judge
            body = None
        kind = body.get("type") if isinstance(body, dict) else None
        obj = body.get(kind) if isinstance(body, dict) and kind in MEDIA_KINDS else None
        record = fallback = None
        if isinstance(obj, dict) and isinstance(obj.get("link"), str):
            origin = Origin(provider=self.name, account=pnid, chat=str(body.get("to") or "") or None,
                            filename=obj.get("filename") if isinstance(obj.get("filename"), str) else None)
            try:
                record = await self.outbound.store_url(obj["link"], origin)
                obj["link"] = self.outbound.outbound_media(record).link
            except MediaUnavailable as exc:
                log.warning("relay: could not store %s (%s); forwarding the original link", obj["link"][:200], exc,
                            extra={"provider": self.name})
                self.outbound.count_fallback(self.name)
                fallback = str(exc)
        data = json.dumps(body).encode() if record is not None else raw
        status, answer, ctype = await relay.forward(
            self._http, "POST", self.graph.joinpath(version, pnid, "messages"),
            {"Authorization": auth, "Content-Type": "application/json"}, data,
            self._timeout or aiohttp.ClientTimeout(total=60))
        self.outbound.count_send(self.name, kind if isinstance(kind, str) and kind in MEDIA_KINDS else "other",
                                  status)
        if record is not None and status < 300:
            try:
                sent = json.loads(answer)["messages"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                sent = None
            await self.outbound.mark_sent(record["id"], body.get("to") and str(body["to"]), sent)
        elif record is not None:
            await self.outbound.discard_refused(record, status)
        return relay.answer(status, answer, ctype, fallback)
