"""Settings ``[providers.meta]`` and the state the Cloud API provider's parts share.
"""

from __future__ import annotations

from typing import Any, Literal

import aiohttp
from pydantic import AnyHttpUrl, Field, SecretStr
from yarl import URL

from gateway.sdk import DownloadPolicy, OutboundService, PluginSection

MEDIA_KINDS = ("image", "video", "audio", "document", "sticker")


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


def graph_error(body: Any) -> tuple[int | None, int | None, str]:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None, None, str(body)[:300]
    return err.get("code"), err.get("error_subcode"), str(err.get("message", ""))[:300]


class MetaState:
    """What every part of the Cloud API provider shares: its settings, the Graph API's endpoints
    and tokens and, once started, the host's shared HTTP session, download policy and outbound
    service."""

    name = "meta"

    def __init__(self, settings: MetaSettings):
        self.settings = settings
        self.graph = URL(str(settings.graph_url))
        self._token_hosts = {(self.graph.host or "").lower()} | {h.lower() for h in settings.download_hosts}
        self._http: aiohttp.ClientSession | None = None
        self._timeout: aiohttp.ClientTimeout | None = None
        self._download = DownloadPolicy()
        self._outbound: OutboundService | None = None

    @property
    def outbound(self) -> OutboundService:
        """The host's outbound service (set by ``start``). Raises RuntimeError before it."""
        if self._outbound is None:
            raise RuntimeError("provider not started")
        return self._outbound

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

    def _auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}
