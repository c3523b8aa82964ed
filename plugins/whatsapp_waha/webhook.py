"""WAHA webhooks: signature check (``X-Webhook-Hmac``), parsing into events and media
references, and the rewrite to stored links (https://waha.devlike.pro/docs/how-to/events/).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

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
from plugins.whatsapp_waha.settings import WahaState


class WahaWebhook(WahaState):
    """Inbound: ``verify``, ``parse`` and ``rewrite`` of the provider contract."""

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Check ``X-Webhook-Hmac`` (hex HMAC-SHA512 of ``body``) when ``hmac_key`` is set."""
        if self.settings.hmac_key is None or not self.settings.hmac_key.get_secret_value():
            return
        given = headers.get("X-Webhook-Hmac")
        if not given:
            raise SignatureError("X-Webhook-Hmac header missing")
        algorithm = headers.get("X-Webhook-Hmac-Algorithm", "sha512").lower()
        if algorithm != "sha512":
            raise SignatureError(f"X-Webhook-Hmac-Algorithm {algorithm!r} is not sha512")
        expected = hmac.new(self.settings.hmac_key.get_secret_value().encode(), body,
                            hashlib.sha512).hexdigest()
        if not signature_matches(expected, given.strip().lower()):
            raise SignatureError("X-Webhook-Hmac does not match the body")

    def parse(self, body: bytes) -> list[WebhookEvent]:
        """One event per body (:func:`gateway.sdk.provider.load_json`: at most ``MAX_JSON_DEPTH``
        levels). Raises :class:`PayloadError` naming the missing or bad field."""
        data = load_json(body)
        if not isinstance(data, dict):
            raise PayloadError("body must be a JSON object")
        event, session = data.get("event"), data.get("session")
        if not isinstance(event, str) or not event:
            raise PayloadError("field 'event' is missing or not a string")
        if not isinstance(session, str) or not session:
            raise PayloadError("field 'session' is missing or not a string")
        payload = data.get("payload")
        is_media_event = event in self.settings.media_events
        if is_media_event and not isinstance(payload, dict):
            raise PayloadError(f"field 'payload' must be an object for event {event!r}")
        message_id = payload.get("id") if isinstance(payload, dict) else None
        if not isinstance(message_id, str):
            message_id = None
        # Idempotency key: the envelope id when WAHA sends one; else the message id per event for
        # media events; else the body's digest (WAHA redelivers the same bytes).
        if isinstance(data.get("id"), str) and data["id"]:
            key = f"waha:{session}:{data['id']}"
        elif is_media_event and message_id:
            key = f"waha:{session}:{event}:{message_id}"
        else:
            key = f"waha:{session}:sha256:{hashlib.sha256(body).hexdigest()}"
        chat = None
        media: list[MediaRef] = []
        if isinstance(payload, dict):
            chat_field = payload.get("to") if payload.get("fromMe") else payload.get("from")
            chat = chat_field if isinstance(chat_field, str) else None
            if is_media_event:
                media = self._media_refs(session, key, payload)
        return [WebhookEvent(idempotency_key=key, event=event, account=session, payload=data,
                             media=media, chat=chat, message_id=message_id)]

    def _media_refs(self, session: str, event_key: str, payload: dict[str, Any]) -> list[MediaRef]:
        refs: list[MediaRef] = []
        message_id = payload.get("id") if isinstance(payload.get("id"), str) else None

        def add(path: str, media: dict[str, Any], owner_id: str | None, owner_path: str) -> None:
            url = media.get("url") if isinstance(media.get("url"), str) and media.get("url") else None
            error = None
            if media.get("error"):
                error = f"WAHA could not download the media: {json.dumps(media['error'])[:300]}"
            elif url is None:
                error = "WAHA did not download the media (media.url is null)"
            if owner_id:
                source_key = f"waha:{session}:{owner_id}:{owner_path}"
            elif url:
                source_key = f"waha:{session}:url:{url}"
            else:
                source_key = f"{event_key}:{path}"
            filename = media.get("filename") if isinstance(media.get("filename"), str) else None
            mimetype = media.get("mimetype") if isinstance(media.get("mimetype"), str) else None
            refs.append(MediaRef(path=path, url=url, source_key=source_key, mimetype=base_mime(mimetype),
                                 filename=filename, error=error))

        if isinstance(payload.get("media"), dict):
            add("payload.media", payload["media"], message_id, "payload.media")
        elif isinstance(payload.get("mediaUrl"), str) and payload["mediaUrl"]:
            add("payload.mediaUrl", {"url": payload["mediaUrl"]}, message_id, "payload.media")
        reply = payload.get("replyTo")
        if isinstance(reply, dict) and isinstance(reply.get("media"), dict):
            reply_id = reply.get("id") if isinstance(reply.get("id"), str) else None
            # the quoted message's media is the same file that message carried: share its object
            add("payload.replyTo.media", reply["media"], reply_id, "payload.media")
        return refs

    def rewrite(self, event: WebhookEvent, outcomes: list[MediaOutcome]) -> dict[str, Any]:
        """The envelope with each stored media's ``url`` replaced by its gateway link and
        ``gateway`` = ``{id, sha256, size, mimetype, category, original_url}``."""
        envelope = dict(event.payload)  # copy_path copies only what changes: no deep copy
        for outcome in outcomes:
            if outcome.record is None or outcome.link is None:
                continue
            rec, original = outcome.record, outcome.ref.url
            if outcome.ref.path == "payload.mediaUrl":
                envelope, payload = copy_path(envelope, ["payload"])
                if isinstance(payload, dict):
                    payload["mediaUrl"] = outcome.link
                continue
            where = ["payload", "media"] if outcome.ref.path == "payload.media" else ["payload", "replyTo", "media"]
            envelope, node = copy_path(envelope, where)
            if not isinstance(node, dict):
                continue
            node["url"] = outcome.link
            node["gateway"] = {"id": rec["id"], "sha256": rec["sha256"], "size": rec["size"],
                               "mimetype": rec["mimetype"], "category": rec["category"],
                               "original_url": original}
            payload = envelope["payload"]
            if outcome.ref.path == "payload.media" and payload.get("mediaUrl") == original:
                payload["mediaUrl"] = outcome.link
        return envelope
