"""Provider plugin ``waha``: WAHA (WhatsApp HTTP API) webhooks and media.

Follows the WAHA docs (https://waha.devlike.pro/docs/how-to/events/,
https://waha.devlike.pro/docs/how-to/receive-messages/, .../security/ for the HMAC):

- ``POST /webhooks/waha`` receives one event per request: ``{id?, timestamp?, event, session,
  me?, payload, engine?, environment?}``. ``id`` (``evt_`` + ULID) exists since 2025.
- With ``hmac_key`` set, ``X-Webhook-Hmac`` must be the hex HMAC-SHA512 of the raw body
  (``X-Webhook-Hmac-Algorithm: sha512``); otherwise 401.
- Media is stored for the ``media_events`` (default ``message`` and ``message.any``) at
  ``payload.media``, ``payload.replyTo.media`` and the deprecated ``payload.mediaUrl``.
  ``media.url`` null or ``media.error`` set: nothing to fetch, the event is forwarded with a note.
  Other events are forwarded unchanged.
- Files are fetched from ``{base_url}/api/files/...`` with ``X-Api-Key``. Only URLs on the WAHA
  host (``base_url``, or an origin listed in ``media_url_origins``, which is fetched from
  ``base_url``) get the key; other hosts are refused unless listed in ``media_hosts`` (WAHA's S3
  storage hands out presigned URLs), and those never get the key.

Outbound (https://waha.devlike.pro/docs/how-to/send-messages/): :meth:`WahaProvider.send` posts
``{session, chatId, file: {mimetype, filename, url | data}, caption}`` to ``/api/sendImage``
(image, sticker), ``/api/sendVideo``, ``/api/sendVoice`` or ``/api/sendFile`` (audio, document)
with ``X-Api-Key``; ``file.url`` is a signed gateway link WAHA fetches with a plain GET (so
``server.public_url`` must be reachable from WAHA), or ``file.data`` (base64) for files up to
``send_inline_max_bytes``. A voice note must be Ogg/Opus unless ``convert`` is asked for (then WAHA
converts it). WAHA answers 201 with the sent message.

Drop-in relay: a bot that calls WAHA's ``/api/sendImage``, ``/api/sendFile``, ``/api/sendVoice``,
``/api/sendVideo`` can call the same paths under ``relay_prefix`` (``/waha/api/sendImage``) with the
same body and ``X-Api-Key``: the gateway stores the file (from ``file.url`` under the
upload-from-URL rules, or ``file.data``), puts its own signed link in ``file.url``, forwards to WAHA
and answers WAHA's status and body unchanged. If storing fails, the original body is forwarded (a
fallback, logged, counted, and announced in the answer's ``X-Gateway-Relay-Fallback`` header).
Every other path under the prefix is passed through untouched.

Settings ``[providers.waha]``: ``enabled``, ``base_url``, ``api_key``, ``hmac_key``,
``media_events``, ``media_url_origins``, ``media_hosts``, ``send_inline_max_bytes``,
``relay_prefix``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import AnyHttpUrl, Field, SecretStr
from yarl import URL

from gateway import hookimpl, relay
from gateway.config import PluginSection, Settings, plugin_settings
from gateway.sdk.download import DownloadPolicy, resumable_body
from gateway.media import base_mime
from gateway.sdk.provider import (
    FetchError,
    MediaOutcome,
    MediaRef,
    MediaSource,
    PayloadError,
    ProviderContext,
    RouteDef,
    SendError,
    SendRefused,
    SendRequest,
    SendResult,
    SignatureError,
    WebhookEvent,
    copy_path,
    load_json,
    signature_matches,
)
from gateway.outbound import MediaUnavailable
from gateway.store import Origin

log = logging.getLogger("gateway.sdk.provider.waha")


class WahaSettings(PluginSection):
    """``[providers.waha]``."""

    enabled: bool = True
    base_url: AnyHttpUrl = Field(AnyHttpUrl("http://localhost:3000"),
                                 description="where the gateway reaches WAHA's API")
    api_key: SecretStr | None = Field(None, description="WAHA's WHATSAPP_API_KEY, sent as X-Api-Key")
    hmac_key: SecretStr | None = Field(None, description="the webhook's hmac.key; empty: unsigned")
    media_events: list[str] = Field(default_factory=lambda: ["message", "message.any"])
    media_url_origins: list[AnyHttpUrl] = Field(
        default_factory=list,
        description="other origins WAHA writes into media URLs (its WAHA_BASE_URL); fetched via base_url")
    media_hosts: list[str] = Field(
        default_factory=list, description="extra hosts media may come from (no API key sent), e.g. S3")
    sessions: list[str] = Field(
        default_factory=list, description="the sessions sends may use; empty: any (WAHA decides)")
    send_inline_max_bytes: int = Field(
        0, ge=0, description="outbound files up to this size go as file.data (base64); larger as file.url")
    relay_prefix: str = Field(
        "/waha", pattern=r"^(/[A-Za-z0-9_.-]+)*$",
        description="drop-in relay of WAHA's API under this path ('' disables it)")


def _origin(url: URL) -> tuple[str, str, int | None]:
    return (url.scheme, (url.host or "").lower(), url.port)


class WahaProvider:
    """The WAHA :class:`gateway.sdk.provider.Provider`."""

    name = "waha"

    def __init__(self, settings: WahaSettings):
        self.settings = settings
        self.base = URL(str(settings.base_url))
        self._waha_origins = {_origin(self.base)} | {
            _origin(URL(str(u))) for u in settings.media_url_origins}
        self._http: aiohttp.ClientSession | None = None
        self._timeout: aiohttp.ClientTimeout | None = None
        self._outbound: Any = None
        self._max_bytes = 0

    async def start(self, ctx: ProviderContext) -> None:
        """Keep the shared HTTP session, the download timeout and the outbound service."""
        self._http = ctx.http
        self._timeout = ctx.fetch_timeout
        self._download = ctx.download or DownloadPolicy()
        self._outbound = ctx.outbound
        self._max_bytes = ctx.max_bytes

    async def close(self) -> None:
        """Nothing of its own to close."""

    def routes(self) -> list[RouteDef]:
        """The drop-in relay under ``relay_prefix`` (the webhook route is the host's)."""
        prefix = self.settings.relay_prefix
        summary = ("WAHA's API, relayed: sendImage, sendFile, sendVoice and sendVideo store the file "
                   "and send a gateway link; every other path is passed through untouched")
        return [RouteDef("*", f"{prefix}/api/{{tail:.*}}", self.relay_request, summary)] if prefix else []

    # -- inbound --------------------------------------------------------------------------
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

    # -- media ----------------------------------------------------------------------------
    def _target(self, url: str) -> tuple[URL, dict[str, str]]:
        """Where to fetch ``url`` from and with which headers. Raises FetchError for other hosts."""
        try:
            u = URL(url)
        except ValueError:
            raise FetchError(f"media URL {url!r} is not a URL", retryable=False) from None
        if u.scheme not in ("http", "https") or not u.host:
            raise FetchError(f"media URL {url!r} is not http(s)", retryable=False)
        if _origin(u) in self._waha_origins:
            target = self.base.with_path(u.path, encoded=False).with_query(u.query)
            headers = {}
            if self.settings.api_key is not None and self.settings.api_key.get_secret_value():
                headers["X-Api-Key"] = self.settings.api_key.get_secret_value()
            return target, headers
        if u.host.lower() in {h.lower() for h in self.settings.media_hosts}:
            return u, {}
        raise FetchError(f"media host {u.host!r} is not the configured WAHA host "
                         f"(add it to providers.waha.media_hosts to allow it)", retryable=False)

    @asynccontextmanager
    async def fetch(self, ref: MediaRef) -> AsyncIterator[MediaSource]:
        """Stream ``ref.url`` from WAHA. Raises :class:`FetchError` (404: the file expired or is
        not there yet; 401/403: wrong API key; both retryable)."""
        if self._http is None:
            raise RuntimeError("provider not started")
        if not ref.url:
            raise FetchError("no media URL", retryable=False)
        target, headers = self._target(ref.url)
        try:
            resp = await self._http.get(target, headers=headers, timeout=self._download.timeout,
                                        allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchError(f"cannot reach WAHA at {target.origin()}: {type(exc).__name__}: {exc}") from exc
        async with resp:
            if resp.status != 200:
                if resp.status in (404, 410):
                    msg = f"WAHA answered {resp.status} for {target.path}: the file is gone (WHATSAPP_FILES_LIFETIME)"
                elif resp.status in (401, 403):
                    msg = f"WAHA answered {resp.status}: check providers.waha.api_key"
                else:
                    msg = f"WAHA answered {resp.status} for {target.path}"
                raise FetchError(msg, retryable=not (300 <= resp.status < 400), status=resp.status)
            yield MediaSource(chunks=resumable_body(self._http, resp, target, headers, self._download),
                              mimetype=base_mime(resp.headers.get("Content-Type")),
                              size=resp.content_length)

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

    # -- outbound -------------------------------------------------------------------------
    def _api_headers(self) -> dict[str, str]:
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else ""
        return {"X-Api-Key": key} if key else {}

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
        return SendResult(provider_message_id=_message_id(answer) or "", response=answer)

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
        self._outbound.count_send(self.name, RELAYED_SENDS[tail], status)
        if record is not None and status < 300:
            try:
                sent_id = _message_id(json.loads(answer))
            except ValueError:
                sent_id = None
            await self._outbound.mark_sent(record["id"], body.get("chatId"), sent_id)
        elif record is not None:
            await self._outbound.discard_refused(record, status)
        return relay.answer(status, answer, ctype, fallback)

    async def _store_relayed(self, raw: bytes, media_type: str
                             ) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
        """Store ``file`` of a relayed send body; ``(body with our link, record, None)``, or
        ``(body, None, None)`` when there is nothing to store, or ``(body, None, why)`` when
        storing failed (the fallback)."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return {}, None, None  # not JSON: WAHA will say so
        file = body.get("file") if isinstance(body, dict) else None
        if not isinstance(file, dict) or not (file.get("url") or file.get("data")):
            return body if isinstance(body, dict) else {}, None, None
        origin = Origin(provider=self.name, account=str(body.get("session") or "default"),
                        chat=body.get("chatId") if isinstance(body.get("chatId"), str) else None,
                        declared_mimetype=base_mime(file.get("mimetype")) if isinstance(file.get("mimetype"), str) else None,
                        filename=file.get("filename") if isinstance(file.get("filename"), str) else None)
        try:
            if isinstance(file.get("url"), str) and file["url"]:
                record = await self._outbound.store_url(file["url"], origin)
            elif isinstance(file.get("data"), str):
                record = await self._outbound.store_base64(file["data"], origin)
            else:
                return body, None, None
        except MediaUnavailable as exc:
            log.warning("relay: could not store the %s of a WAHA send (%s); forwarding the original",
                        media_type, exc, extra={"provider": self.name})
            self._outbound.count_fallback(self.name)
            return body, None, str(exc)
        link = self._outbound.outbound_media(record).link
        body["file"] = {"mimetype": file.get("mimetype") or record["mimetype"],
                        "filename": file.get("filename") or record["filename"], "url": link}
        return body, record, None


SEND_ENDPOINTS = {"image": "sendImage", "sticker": "sendImage", "video": "sendVideo", "voice": "sendVoice",
                  "audio": "sendFile", "document": "sendFile"}
RELAYED_SENDS = {"sendImage": "image", "sendVideo": "video", "sendVoice": "voice", "sendFile": "document"}


def _message_id(answer: Any) -> str | None:
    """The sent message's id in WAHA's answer: ``id`` as a string (NOWEB, GOWS) or as
    ``{_serialized}`` (WEBJS), or ``key.id``."""
    if not isinstance(answer, dict):
        return None
    mid = answer.get("id")
    if isinstance(mid, str):
        return mid
    if isinstance(mid, dict) and isinstance(mid.get("_serialized"), str):
        return mid["_serialized"]
    key = answer.get("key")
    if isinstance(key, dict) and isinstance(key.get("id"), str):
        return key["id"]
    return None


async def _is_ogg_opus(media: Any) -> bool:
    if media.record["mimetype"] != "audio/ogg":
        return False
    opened = await media.open(0, 4095)
    try:
        head = b"".join([c async for c in opened.chunks])
    finally:
        await opened.close()
    return b"OpusHead" in head


@hookimpl
def settings_sections() -> dict[str, type[WahaSettings]]:
    """``[providers.waha]`` is this plugin's section."""
    return {"providers.waha": WahaSettings}


@hookimpl
def register_providers(settings: Settings) -> list[WahaProvider] | None:
    """Offer the WAHA provider when ``[providers.waha]`` is present and enabled."""
    if "waha" not in settings.providers:
        return None
    cfg = plugin_settings(settings, ("providers", "waha"), WahaSettings)
    return [WahaProvider(cfg)] if cfg.enabled else None
