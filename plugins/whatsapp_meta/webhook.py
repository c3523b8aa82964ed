"""Cloud API webhooks: the verification handshake, ``X-Hub-Signature-256``, parsing into one
event per message or status, and the rewrite to stored links
(https://developers.facebook.com/docs/graph-api/webhooks/getting-started).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.sdk import (
    MediaOutcome,
    MediaRef,
    PayloadError,
    SignatureError,
    WebhookEvent,
    base_mime,
    copy_path,
    load_json,
    signature_matches,
)
from plugins.whatsapp_meta.settings import MEDIA_KINDS, MetaState

log = logging.getLogger("gateway.providers.meta")


def _b64_to_hex(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


class MetaWebhook(MetaState):
    """Inbound: the handshake, and ``verify``, ``parse`` and ``rewrite`` of the provider contract."""

    async def handshake(self, request: web.Request) -> web.Response:
        """Answer ``hub.challenge`` for ``hub.mode=subscribe`` with the right ``hub.verify_token``."""
        expected = self._secret(self.settings.verify_token)
        mode, token = request.query.get("hub.mode"), request.query.get("hub.verify_token", "")
        challenge = request.query.get("hub.challenge")
        if expected and mode == "subscribe" and challenge and signature_matches(expected, token):
            return web.Response(text=challenge, content_type="text/plain")
        log.warning("Meta verification handshake refused (mode=%r)", mode)
        return web.json_response({"error": "verification failed"}, status=403)

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Check ``X-Hub-Signature-256`` when ``app_secret`` is set."""
        secret = self._secret(self.settings.app_secret)
        if not secret:
            return
        given = headers.get("X-Hub-Signature-256")
        if not given:
            raise SignatureError("X-Hub-Signature-256 header missing")
        if not given.startswith("sha256="):
            raise SignatureError("X-Hub-Signature-256 must start with 'sha256='")
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if not signature_matches(expected, given[len("sha256="):].strip().lower()):
            raise SignatureError("X-Hub-Signature-256 does not match the body")

    def parse(self, body: bytes) -> list[WebhookEvent]:
        """Every message, status and other change of the batch, each its own event.

        The body is read with :func:`gateway.sdk.provider.load_json` (at most ``MAX_JSON_DEPTH``
        levels). Raises :class:`PayloadError` naming the bad field."""
        data = load_json(body)
        if not isinstance(data, dict):
            raise PayloadError("body must be a JSON object")
        entries = data.get("entry")
        if not isinstance(entries, list):
            raise PayloadError("field 'entry' is missing or not a list")
        events: list[WebhookEvent] = []
        for ei, entry in enumerate(entries):
            where = f"entry[{ei}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("changes", []), list):
                raise PayloadError(f"{where} must be an object with a 'changes' list")
            for ci, change in enumerate(entry.get("changes", [])):
                events.extend(self._parse_change(data, entry, change, f"{where}.changes[{ci}]"))
        return events

    def _parse_change(self, data: dict[str, Any], entry: dict[str, Any], change: Any,
                      where: str) -> list[WebhookEvent]:
        if not isinstance(change, dict) or not isinstance(change.get("value"), dict):
            raise PayloadError(f"{where}.value is missing or not an object")
        field, value = change.get("field"), change["value"]
        metadata = value.get("metadata") if isinstance(value.get("metadata"), dict) else {}
        pnid = str(metadata.get("phone_number_id") or "")

        def envelope(**items: Any) -> dict[str, Any]:
            rest = {k: v for k, v in value.items() if k not in ("messages", "statuses")}
            return {"object": data.get("object"),
                    "entry": [{"id": entry.get("id"),
                               "changes": [{"field": field, "value": {**rest, **items}}]}]}

        messages, statuses = value.get("messages", []), value.get("statuses", [])
        if not isinstance(messages, list) or not isinstance(statuses, list):
            raise PayloadError(f"{where}.value.messages and .statuses must be lists")
        events: list[WebhookEvent] = []
        for mi, msg in enumerate(messages):
            mwhere = f"{where}.value.messages[{mi}]"
            if not isinstance(msg, dict) or not isinstance(msg.get("id"), str) or not msg["id"]:
                raise PayloadError(f"{mwhere}.id is missing")
            if not isinstance(msg.get("type"), str):
                raise PayloadError(f"{mwhere}.type is missing")
            events.append(WebhookEvent(
                idempotency_key=f"meta:message:{msg['id']}", event="message", account=pnid,
                payload=envelope(messages=[msg]), media=self._media_refs(pnid, msg),
                chat=msg.get("from") if isinstance(msg.get("from"), str) else None,
                message_id=msg["id"]))
        for si, status in enumerate(statuses):
            if not isinstance(status, dict) or not isinstance(status.get("id"), str):
                raise PayloadError(f"{where}.value.statuses[{si}].id is missing")
            key = f"meta:status:{status['id']}:{status.get('status')}:{status.get('timestamp')}"
            events.append(WebhookEvent(
                idempotency_key=key, event="status", account=pnid, payload=envelope(statuses=[status]),
                chat=status.get("recipient_id") if isinstance(status.get("recipient_id"), str) else None,
                message_id=status["id"]))
        if not messages and not statuses:  # errors, account updates, other fields: as they came
            digest = hashlib.sha256(json.dumps(change, sort_keys=True).encode()).hexdigest()
            events.append(WebhookEvent(idempotency_key=f"meta:{field}:{digest}", event=str(field or "change"),
                                       account=pnid, payload=envelope()))
        return events

    def _media_refs(self, pnid: str, msg: dict[str, Any]) -> list[MediaRef]:
        kind = msg.get("type")
        obj = msg.get(kind) if kind in MEDIA_KINDS else None
        if not isinstance(obj, dict):
            return []
        path = f"entry.0.changes.0.value.messages.0.{kind}"
        media_id = obj.get("id")
        if not isinstance(media_id, str) or not media_id:
            return [MediaRef(path=path, url=None, source_key=f"meta:{pnid}:{msg['id']}:{kind}",
                             error=f"the {kind} object has no media id")]
        return [MediaRef(
            path=path, url=None, source_key=f"meta:{pnid}:{media_id}",
            mimetype=base_mime(obj.get("mime_type")) if isinstance(obj.get("mime_type"), str) else None,
            filename=obj.get("filename") if isinstance(obj.get("filename"), str) else None,
            sha256=_b64_to_hex(obj.get("sha256")),
            extra={"media_id": media_id, "phone_number_id": pnid},
        )]

    def rewrite(self, event: WebhookEvent, outcomes: list[MediaOutcome]) -> dict[str, Any]:
        """The one-message envelope with each stored media's ``url`` = its gateway link and
        ``gateway`` = ``{id, sha256, size, mimetype, category, original_id}``."""
        envelope = dict(event.payload)  # copy_path copies only what changes: no deep copy
        for outcome in outcomes:
            if outcome.record is None or outcome.link is None:
                continue
            kind = outcome.ref.path.rsplit(".", 1)[-1]
            envelope, obj = copy_path(envelope, ["entry", 0, "changes", 0, "value", "messages", 0, kind])
            if not isinstance(obj, dict):
                continue
            rec = outcome.record
            obj["url"] = outcome.link
            obj["gateway"] = {"id": rec["id"], "sha256": rec["sha256"], "size": rec["size"],
                              "mimetype": rec["mimetype"], "category": rec["category"],
                              "original_id": outcome.ref.extra.get("media_id")}
        return envelope
