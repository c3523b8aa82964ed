"""Signed, expiring gateway links to stored media: ``{public_url}/media/{id}/{filename}?exp=&sig=``.

``sig`` is the unpadded base64url HMAC-SHA256 (RFC 2104) of ``"{id}/{filename}\\n{exp}"`` with the
link secret; ``exp`` is a Unix time in seconds. Changing the id, the filename, the expiry or the
signature makes the link invalid. :meth:`LinkSigner.own_link` recognises the gateway's own
links (these, and the unsigned ``{public_url}/public/{id}/{filename}`` of public objects), so that
a link a bot received can be sent on without fetching it over HTTP.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

if TYPE_CHECKING:
    from gateway.config import Settings


class LinkError(Exception):
    """The link's signature is wrong or missing, or it has expired (HTTP 403)."""


class LinkSigner:
    """Makes and checks media links. ``base_url`` (the base of new links) has no trailing slash;
    ``ttl`` is in seconds; ``aliases``: other bases whose links :meth:`own_link` recognises too
    (the daemon's own URL while serving workers hand out the links: the signature covers the
    path only, so a link verifies on either)."""

    def __init__(self, secret: bytes, base_url: str, ttl: int, aliases: tuple[str, ...] = ()):
        self._secret = secret
        self.base_url = base_url.rstrip("/")
        self.ttl = ttl
        self.bases = (self.base_url, *(a.rstrip("/") for a in aliases if a.rstrip("/") != self.base_url))

    @classmethod
    def from_settings(cls, settings: Settings) -> LinkSigner:
        """The signer of the daemon and the serving workers: the link secret, new links on
        :attr:`Settings.media_base_url`, the daemon's ``server.base_url`` recognised too, and
        ``media.link_ttl``."""
        return cls(settings.link_secret(), settings.media_base_url, settings.media.link_ttl,
                   aliases=(settings.server.base_url,))

    def _sig(self, media_id: str, filename: str, exp: int) -> str:
        return _signature(self._secret, media_id, filename, exp)

    def link(self, media_id: str, filename: str, ttl: int | None = None, now: float | None = None) -> str:
        """The full URL, valid for ``ttl`` seconds (default: the configured TTL)."""
        exp = int((now if now is not None else time.time()) + (ttl or self.ttl))
        query = urlencode({"exp": exp, "sig": self._sig(media_id, filename, exp)})
        return f"{self.base_url}/media/{quote(media_id, safe='')}/{quote(filename, safe='')}?{query}"

    def thumbnail_link(self, media_id: str, size: int, ttl: int | None = None, now: float | None = None) -> str:
        """The full URL of the ``size`` px thumbnail of ``media_id`` (``/media/{id}/thumbnail?size=``),
        valid for ``ttl`` seconds: signed as a media link to the name ``thumbnail:{size}``."""
        exp = int((now if now is not None else time.time()) + (ttl or self.ttl))
        query = urlencode({"size": size, "exp": exp, "sig": self._sig(media_id, f"thumbnail:{size}", exp)})
        return f"{self.base_url}/media/{quote(media_id, safe='')}/thumbnail?{query}"

    def verify(self, media_id: str, filename: str, exp: str | None, sig: str | None,
               now: float | None = None) -> None:
        """Raise :class:`LinkError` unless ``sig`` is right for the id, filename and ``exp`` and
        ``exp`` is in the future."""
        if not exp or not sig:
            raise LinkError("link is not signed")
        try:
            exp_i = int(exp)
        except ValueError:
            raise LinkError("link expiry is not a number") from None
        # compare_digest refuses non-ASCII str (TypeError): a signature is base64url, so such a
        # one is simply wrong
        if not sig.isascii() or not hmac.compare_digest(self._sig(media_id, filename, exp_i), sig):
            raise LinkError("link signature is wrong")
        if exp_i < (now if now is not None else time.time()):
            raise LinkError("link has expired")

    def own_link(self, url: str, now: float | None = None) -> tuple[str, str, bool] | None:
        """``(media id, filename, signed)`` when ``url`` is one of this gateway's links (on any of
        :attr:`bases`): a signed media link (checked as :meth:`verify` does; ``signed`` True) or a
        public link (``signed`` False: the caller must check that the object is public). ``None``
        for any other URL.

        Raises :class:`LinkError` for a media link of ours with a wrong signature or past its expiry."""
        try:
            parts = urlsplit(url)
        except ValueError:
            return None
        for base in map(urlsplit, self.bases):
            if (parts.scheme.lower(), parts.netloc.lower()) != (base.scheme.lower(), base.netloc.lower()):
                continue
            rest = parts.path.removeprefix(base.path)
            if rest != parts.path or not base.path:
                break
        else:
            return None
        segments = rest.split("/")
        if len(segments) != 4 or segments[0] or segments[1] not in ("media", "public") or not all(segments[2:]):
            return None
        media_id, filename = unquote(segments[2]), unquote(segments[3])
        if segments[1] == "public":
            return media_id, filename, False
        query = parse_qs(parts.query)
        self.verify(media_id, filename, (query.get("exp") or [""])[0], (query.get("sig") or [""])[0], now)
        return media_id, filename, True


@functools.lru_cache(maxsize=4096)  # a hot link is checked on every request: one HMAC per link
def _signature(secret: bytes, media_id: str, filename: str, exp: int) -> str:
    """HMAC-SHA256 of ``{id}/{filename}\n{exp}`` under ``secret``, base64url without padding."""
    msg = f"{media_id}/{filename}\n{exp}".encode()
    digest = hmac.new(secret, msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
