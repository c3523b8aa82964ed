"""Settings ``[providers.waha]`` and the state the WAHA provider's parts share.
"""

from __future__ import annotations

import aiohttp
from pydantic import AnyHttpUrl, Field, SecretStr
from yarl import URL

from gateway.sdk import DownloadPolicy, OutboundService, PluginSection


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


def origin_of(url: URL) -> tuple[str, str, int | None]:
    return (url.scheme, (url.host or "").lower(), url.port)


class WahaState:
    """What every part of the WAHA provider shares: its settings and, once started, the host's
    shared HTTP session, download policy and outbound service."""

    name = "waha"

    def __init__(self, settings: WahaSettings):
        self.settings = settings
        self.base = URL(str(settings.base_url))
        self._waha_origins = {origin_of(self.base)} | {
            origin_of(URL(str(u))) for u in settings.media_url_origins}
        self._http: aiohttp.ClientSession | None = None
        self._timeout: aiohttp.ClientTimeout | None = None
        self._download = DownloadPolicy()
        self._outbound: OutboundService | None = None
        self._max_bytes = 0

    @property
    def outbound(self) -> OutboundService:
        """The host's outbound service (set by ``start``). Raises RuntimeError before it."""
        if self._outbound is None:
            raise RuntimeError("provider not started")
        return self._outbound

    def _api_headers(self) -> dict[str, str]:
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else ""
        return {"X-Api-Key": key} if key else {}
