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

Settings ``[providers.waha]``: ``enabled``, ``base_url``, ``api_key``, ``hmac_key``,
``media_events``, ``media_url_origins``, ``media_hosts``.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from pydantic import AnyHttpUrl, Field, SecretStr
from yarl import URL

from gateway import hookimpl
from gateway.config import PluginSection, Settings, plugin_settings
from gateway.media import base_mime
from gateway.providers import (
    FetchError,
    MediaOutcome,
    MediaRef,
    MediaSource,
    PayloadError,
    ProviderContext,
    RouteDef,
    SignatureError,
    WebhookEvent,
)

FETCH_CHUNK = 1024 * 1024  # bytes per read from WAHA (bench/stream_1gib.py: best with WRITE_BATCH 4 MiB)


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


def _origin(url: URL) -> tuple[str, str, int | None]:
    return (url.scheme, (url.host or "").lower(), url.port)


class WahaProvider:
    """The WAHA :class:`gateway.providers.Provider`."""

    name = "waha"

    def __init__(self, settings: WahaSettings):
        self.settings = settings
        self.base = URL(str(settings.base_url))
        self._waha_origins = {_origin(self.base)} | {
            _origin(URL(str(u))) for u in settings.media_url_origins}
        self._http: aiohttp.ClientSession | None = None
        self._timeout: aiohttp.ClientTimeout | None = None

    async def start(self, ctx: ProviderContext) -> None:
        """Keep the shared HTTP session and the download timeout."""
        self._http = ctx.http
        self._timeout = ctx.fetch_timeout

    async def close(self) -> None:
        """Nothing of its own to close."""

    def routes(self) -> list[RouteDef]:
        """WAHA needs only ``POST /webhooks/waha`` (added by the host)."""
        return []

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
        if not hmac.compare_digest(expected, given.strip().lower()):
            raise SignatureError("X-Webhook-Hmac does not match the body")

    def parse(self, body: bytes) -> list[WebhookEvent]:
        """One event per body. Raises :class:`PayloadError` naming the missing or bad field."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PayloadError(f"body is not JSON: {exc}") from None
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
            resp = await self._http.get(target, headers=headers, timeout=self._timeout,
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
            yield MediaSource(chunks=resp.content.iter_chunked(FETCH_CHUNK),
                              mimetype=base_mime(resp.headers.get("Content-Type")),
                              size=resp.content_length)

    def rewrite(self, event: WebhookEvent, outcomes: list[MediaOutcome]) -> dict[str, Any]:
        """The envelope with each stored media's ``url`` replaced by its gateway link and
        ``gateway`` = ``{id, sha256, size, mimetype, category, original_url}``."""
        envelope = copy.deepcopy(event.payload)
        payload = envelope.get("payload") if isinstance(envelope.get("payload"), dict) else {}
        for outcome in outcomes:
            if outcome.record is None or outcome.link is None:
                continue
            rec, original = outcome.record, outcome.ref.url
            if outcome.ref.path == "payload.mediaUrl":
                payload["mediaUrl"] = outcome.link
                continue
            node = payload.get("media") if outcome.ref.path == "payload.media" else \
                (payload.get("replyTo") or {}).get("media")
            if not isinstance(node, dict):
                continue
            node["url"] = outcome.link
            node["gateway"] = {"id": rec["id"], "sha256": rec["sha256"], "size": rec["size"],
                               "mimetype": rec["mimetype"], "category": rec["category"],
                               "original_url": original}
            if outcome.ref.path == "payload.media" and payload.get("mediaUrl") == original:
                payload["mediaUrl"] = outcome.link
        return envelope


@hookimpl
def register_providers(settings: Settings) -> list[WahaProvider] | None:
    """Offer the WAHA provider when ``[providers.waha]`` is present and enabled."""
    if "waha" not in settings.providers:
        return None
    cfg = plugin_settings(settings, ("providers", "waha"), WahaSettings)
    return [WahaProvider(cfg)] if cfg.enabled else None
