"""Provider plugin ``meta``: the WhatsApp Cloud API (Meta Graph API).

Follows Meta's docs: webhooks (https://developers.facebook.com/docs/graph-api/webhooks/getting-started,
payload reference .../whatsapp/cloud-api/webhooks/components), media
(.../whatsapp/cloud-api/reference/media: retrieve URL, download, upload) and messages
(.../whatsapp/cloud-api/reference/messages).

Inbound:

- ``GET /webhooks/meta``: the verification handshake; ``hub.mode=subscribe`` with the configured
  ``verify_token`` answers ``hub.challenge`` as text/plain, anything else 403.
- ``POST /webhooks/meta``: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body with the
  app secret>`` is required when ``app_secret`` is set. One POST may carry many entries, changes,
  messages and statuses: each message and each status becomes its own event (``message``,
  ``status``), forwarded as a one-message envelope of the same shape; other change fields are
  forwarded whole (event name = the field). A message's idempotency key is its ``wamid``: Meta
  retries for days, and a duplicate stores and forwards nothing new.
- Media (image, video, audio/voice, document, sticker) is fetched in two steps:
  ``GET {graph_url}/{api_version}/{media-id}?phone_number_id=...`` with the bearer token answers
  ``url``, ``mime_type``, ``sha256`` (hex) and ``file_size`` (int or string); then that ``url`` is
  downloaded with the same bearer token. The bytes must match both the retrieval's hex digest and
  the webhook's base64 digest. A 404 on the download URL means it expired: a fresh one is
  retrieved. Graph error 100/33 (unknown or expired media id) is final: the message is forwarded
  with a note. 401 or error 190 (token) is retried and counted as reason ``auth``.
- The token goes only to ``graph_url``'s host and to ``download_hosts``.

Outbound (:meth:`MetaProvider.send`): Meta's type and size limits are checked first (a violation
raises :class:`gateway.sdk.provider.SendRefused`, HTTP 422, and nothing is sent); then the object is
uploaded (``POST /{version}/{phone-number-id}/media``, multipart, streamed from storage) and sent
by id, or sent by ``link`` (a signed gateway link) when ``send_by = "link"``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

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

log = logging.getLogger("gateway.sdk.provider.meta")

MEDIA_KINDS = ("image", "video", "audio", "document", "sticker")
MB, KB = 1_000_000, 1_000  # Meta states its limits in MB and KB; decimal units are the safe reading
LIMITS: dict[str, tuple[tuple[str, ...], int]] = {
    "image": (("image/jpeg", "image/png"), 5 * MB),
    "video": (("video/mp4", "video/3gpp"), 16 * MB),
    "audio": (("audio/aac", "audio/amr", "audio/mpeg", "audio/mp4", "audio/ogg"), 16 * MB),
    "document": ((), 100 * MB),
    "sticker": (("image/webp",), 100 * KB),
}
ANIMATED_STICKER_LIMIT = 500 * KB


class MetaSettings(PluginSection):
    """``[providers.meta]``."""

    enabled: bool = True
    app_secret: SecretStr | None = Field(None, description="checks X-Hub-Signature-256; empty: unsigned")
    verify_token: SecretStr | None = Field(None, description="the handshake's hub.verify_token")
    access_token: SecretStr | None = Field(None, description="bearer token for every business number")
    access_tokens: dict[str, SecretStr] = Field(
        default_factory=dict, description="phone_number_id -> bearer token (wins over access_token)")
    phone_number_ids: list[str] = Field(
        default_factory=list,
        description="the business numbers sends may use (with access_tokens' keys); empty: any")
    graph_url: AnyHttpUrl = AnyHttpUrl("https://graph.facebook.com")
    api_version: str = Field("v23.0", pattern=r"^v\d+\.\d+$")
    download_hosts: list[str] = Field(default_factory=lambda: ["lookaside.fbsbx.com"],
                                      description="hosts media download URLs may point at")
    send_by: Literal["id", "link"] = Field("id", description="outbound: upload and send by id, or by link")
    relay_prefix: str = Field("/meta", pattern=r"^(/[A-Za-z0-9_.-]+)*$",
                              description="drop-in relay of POST /{version}/{phone-number-id}/messages ('' disables)")


def _graph_error(body: Any) -> tuple[int | None, int | None, str]:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None, None, str(body)[:300]
    return err.get("code"), err.get("error_subcode"), str(err.get("message", ""))[:300]


def _b64_to_hex(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


class MetaProvider:
    """The Cloud API :class:`gateway.sdk.provider.Provider`."""

    name = "meta"

    def __init__(self, settings: MetaSettings):
        self.settings = settings
        self.graph = URL(str(settings.graph_url))
        self._token_hosts = {(self.graph.host or "").lower()} | {h.lower() for h in settings.download_hosts}
        self._http: aiohttp.ClientSession | None = None
        self._timeout: aiohttp.ClientTimeout | None = None
        self._outbound: Any = None

    async def start(self, ctx: ProviderContext) -> None:
        """Keep the shared HTTP session; warn about a setup that accepts unsigned webhooks."""
        self._http = ctx.http
        self._timeout = ctx.fetch_timeout
        self._download = ctx.download or DownloadPolicy()
        self._outbound = ctx.outbound
        if not self._secret(self.settings.app_secret):
            log.warning("providers.meta.app_secret is empty: webhooks are accepted unsigned")

    async def close(self) -> None:
        """Nothing of its own to close."""

    @staticmethod
    def _secret(value: SecretStr | None) -> str:
        return value.get_secret_value() if value is not None else ""

    def token_for(self, phone_number_id: str | None) -> str | None:
        """The bearer token of a business number, or the shared one, or None."""
        if phone_number_id and phone_number_id in self.settings.access_tokens:
            return self.settings.access_tokens[phone_number_id].get_secret_value()
        return self._secret(self.settings.access_token) or None

    def _endpoint(self, *parts: str) -> URL:
        return self.graph.joinpath(self.settings.api_version, *parts)

    # -- inbound --------------------------------------------------------------------------
    def routes(self) -> list[RouteDef]:
        """The verification handshake ``GET /webhooks/meta`` and the drop-in messages relay."""
        routes = [RouteDef("GET", "/webhooks/meta", self.handshake,
                           "Meta's webhook verification handshake: hub.challenge for the right hub.verify_token")]
        if self.settings.relay_prefix:
            routes.append(RouteDef("POST", f"{self.settings.relay_prefix}/{{version:v\\d+\\.\\d+}}/"
                                            "{phone_number_id}/messages", self.relay_messages,
                                   "The Graph API's messages endpoint, relayed: media links are stored "
                                   "and replaced by gateway links"))
        return routes

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

    # -- media ----------------------------------------------------------------------------
    def _auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def _allowed(self, url: URL) -> bool:
        return url.scheme in ("http", "https") and (url.host or "").lower() in self._token_hosts

    async def _retrieve(self, media_id: str, pnid: str | None, token: str) -> dict[str, Any]:
        """Step 1: ``GET /{version}/{media-id}``. Raises :class:`FetchError`."""
        assert self._http is not None
        params = {"phone_number_id": pnid} if pnid else {}
        try:
            async with self._http.get(self._endpoint(media_id), params=params, headers=self._auth(token),
                                      timeout=self._timeout) as resp:
                status = resp.status
                try:
                    body = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    body = None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchError(f"cannot reach the Graph API: {type(exc).__name__}: {exc}") from exc
        code, subcode, message = _graph_error(body)
        if status == 200 and isinstance(body, dict) and isinstance(body.get("url"), str):
            return body
        if code == 100 and subcode == 33:
            raise FetchError(f"media id {media_id} is unknown or expired (Graph error 100/33): {message}",
                             retryable=False, status=status, reason="unknown_media")
        if status == 401 or code == 190:
            log.error("Meta refused the access token for phone_number_id %s (HTTP %s, code %s): %s",
                      pnid or "-", status, code, message, extra={"provider": self.name})
            raise FetchError(f"Graph API refused the access token (HTTP {status}, code {code}): {message}",
                             status=status, reason="auth")
        raise FetchError(f"Graph API answered HTTP {status} for media {media_id}: {message}", status=status)

    @asynccontextmanager
    async def fetch(self, ref: MediaRef) -> AsyncIterator[MediaSource]:
        """Retrieve a fresh download URL, then stream it. Raises :class:`FetchError`."""
        if self._http is None:
            raise RuntimeError("provider not started")
        media_id, pnid = ref.extra.get("media_id"), ref.extra.get("phone_number_id") or None
        if not media_id:
            raise FetchError("no media id", retryable=False)
        token = self.token_for(pnid)
        if token is None:
            raise FetchError(f"no access token configured for phone_number_id {pnid} "
                             "(providers.meta.access_token or access_tokens)", retryable=False, reason="no_token")
        for _ in range(2):  # a URL that expired between the two steps gets one fresh retrieval
            info = await self._retrieve(media_id, pnid, token)
            digest = str(info.get("sha256") or "").lower() or None
            if ref.sha256 and digest and digest != ref.sha256:
                raise FetchError(f"the webhook's sha256 ({ref.sha256}) and the Graph API's ({digest}) differ",
                                 reason="digest_mismatch")
            url = URL(info["url"])
            if not self._allowed(url):
                raise FetchError(f"download host {url.host!r} is not in providers.meta.download_hosts",
                                 retryable=False, reason="host_not_allowed")
            try:
                resp = await self._http.get(url, headers=self._auth(token), timeout=self._download.timeout,
                                            allow_redirects=False)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise FetchError(f"cannot download media {media_id}: {type(exc).__name__}: {exc}") from exc
            async with resp:
                if resp.status == 404:
                    log.info("download URL of media %s expired; retrieving a fresh one", media_id)
                    continue
                if resp.status == 401:
                    raise FetchError("the download URL refused the access token", status=401, reason="auth")
                if resp.status != 200:
                    raise FetchError(f"media download answered HTTP {resp.status}", status=resp.status)
                try:
                    size = int(info["file_size"]) if info.get("file_size") is not None else None
                except (TypeError, ValueError):
                    size = None
                yield MediaSource(chunks=resumable_body(self._http, resp, url, self._auth(token),
                                                        self._download, size=size),
                                  mimetype=base_mime(info.get("mime_type")) or ref.mimetype,
                                  size=size, sha256=digest)
                return
        raise FetchError(f"the download URL of media {media_id} expired twice", status=404, reason="url_expired")

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

    # -- outbound -------------------------------------------------------------------------
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
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str):
            raise SendError(502, {"error": "the Graph API upload answered without an id", "answer": answer})
        return answer["id"]

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
            body = json.loads(raw)
        except relay.BodyTooLarge as exc:
            return web.json_response({"error": {"message": str(exc), "code": 100}}, status=413)
        except (ValueError, UnicodeDecodeError):
            body, raw = None, raw
        kind = body.get("type") if isinstance(body, dict) else None
        obj = body.get(kind) if isinstance(body, dict) and kind in MEDIA_KINDS else None
        record = fallback = None
        if isinstance(obj, dict) and isinstance(obj.get("link"), str):
            origin = Origin(provider=self.name, account=pnid, chat=str(body.get("to") or "") or None,
                            filename=obj.get("filename") if isinstance(obj.get("filename"), str) else None)
            try:
                record = await self._outbound.store_url(obj["link"], origin)
                obj["link"] = self._outbound.outbound_media(record).link
            except MediaUnavailable as exc:
                log.warning("relay: could not store %s (%s); forwarding the original link", obj["link"][:200], exc,
                            extra={"provider": self.name})
                self._outbound.count_fallback(self.name)
                fallback = str(exc)
        data = json.dumps(body).encode() if record is not None else raw
        status, answer, ctype = await relay.forward(
            self._http, "POST", self.graph.joinpath(version, pnid, "messages"),
            {"Authorization": auth, "Content-Type": "application/json"}, data,
            self._timeout or aiohttp.ClientTimeout(total=60))
        self._outbound.count_send(self.name, kind if isinstance(kind, str) and kind in MEDIA_KINDS else "other",
                                  status)
        if record is not None and status < 300:
            try:
                sent = json.loads(answer)["messages"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                sent = None
            await self._outbound.mark_sent(record["id"], body.get("to") and str(body["to"]), sent)
        elif record is not None:
            await self._outbound.discard_refused(record, status)
        return relay.answer(status, answer, ctype, fallback)


def _animated_webp(head: bytes) -> bool:
    """RIFF/WEBP with a VP8X chunk whose animation flag (0x02) is set."""
    return (len(head) >= 21 and head[:4] == b"RIFF" and head[8:12] == b"WEBP"
            and head[12:16] == b"VP8X" and bool(head[20] & 0x02))


@hookimpl
def settings_sections() -> dict[str, type[MetaSettings]]:
    """``[providers.meta]`` is this plugin's section."""
    return {"providers.meta": MetaSettings}


@hookimpl
def register_providers(settings: Settings) -> list[MetaProvider] | None:
    """Offer the Cloud API provider when ``[providers.meta]`` is present and enabled."""
    if "meta" not in settings.providers:
        return None
    cfg = plugin_settings(settings, ("providers", "meta"), MetaSettings)
    return [MetaProvider(cfg)] if cfg.enabled else None
