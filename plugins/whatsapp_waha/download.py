"""WAHA media downloads: which hosts get the API key, and the streamed ``fetch``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from yarl import URL

from gateway.sdk import FetchError, MediaRef, MediaSource, base_mime, resumable_body
from plugins.whatsapp_waha.settings import WahaState, origin_of


class WahaDownload(WahaState):
    """Media: ``fetch`` of the provider contract."""

    def _target(self, url: str) -> tuple[URL, dict[str, str]]:
        """Where to fetch ``url`` from and with which headers. Raises FetchError for other hosts."""
        try:
            u = URL(url)
        except ValueError:
            raise FetchError(f"media URL {url!r} is not a URL", retryable=False) from None
        if u.scheme not in ("http", "https") or not u.host:
            raise FetchError(f"media URL {url!r} is not http(s)", retryable=False)
        if origin_of(u) in self._waha_origins:
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
