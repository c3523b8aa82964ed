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

import logging

from gateway.sdk import DownloadPolicy, ProviderContext, RouteDef, Settings, hookimpl, plugin_settings
from plugins.whatsapp_meta.download import MetaDownload
from plugins.whatsapp_meta.relay import MetaRelay
from plugins.whatsapp_meta.send import MetaSend
from plugins.whatsapp_meta.settings import MetaSettings
from plugins.whatsapp_meta.webhook import MetaWebhook

__all__ = ["MetaProvider", "MetaSettings", "register_providers", "settings_sections"]

log = logging.getLogger("gateway.providers.meta")


class MetaProvider(MetaWebhook, MetaDownload, MetaSend, MetaRelay):
    """The Cloud API :class:`gateway.sdk.Provider`: webhooks (:mod:`.webhook`), downloads
    (:mod:`.download`), sends (:mod:`.send`) and the drop-in relay (:mod:`.relay`)."""

    name = "meta"

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
