"""Cloud API media downloads in two steps: retrieve the media URL, then stream it
(.../whatsapp/cloud-api/reference/media).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from yarl import URL

from gateway.sdk import FetchError, MediaRef, MediaSource, base_mime, resumable_body
from plugins.whatsapp_meta.settings import MetaState, graph_error

log = logging.getLogger("gateway.providers.meta")


class MetaDownload(MetaState):
    """Media: ``fetch`` of the provider contract."""

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
        code, subcode, message = graph_error(body)
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
