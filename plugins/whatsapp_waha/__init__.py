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

from gateway.sdk import DownloadPolicy, ProviderContext, RouteDef, Settings, hookimpl, plugin_settings
from plugins.whatsapp_waha.download import WahaDownload
from plugins.whatsapp_waha.relay import WahaRelay
from plugins.whatsapp_waha.send import WahaSend
from plugins.whatsapp_waha.settings import WahaSettings
from plugins.whatsapp_waha.webhook import WahaWebhook

__all__ = ["WahaProvider", "WahaSettings", "register_providers", "settings_sections"]


class WahaProvider(WahaWebhook, WahaDownload, WahaSend, WahaRelay):
    """The WAHA :class:`gateway.sdk.Provider`: webhook parsing (:mod:`.webhook`), downloads
    (:mod:`.download`), sends (:mod:`.send`) and the drop-in relay (:mod:`.relay`)."""

    name = "waha"

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
