"""Signed, expiring gateway links to stored media: ``{public_url}/media/{id}/{filename}?exp=&sig=``.

``sig`` is the unpadded base64url HMAC-SHA256 (RFC 2104) of ``"{id}/{filename}\\n{exp}"`` with the
link secret; ``exp`` is a Unix time in seconds. Changing the id, the filename, the expiry or the
signature makes the link invalid.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import quote, urlencode


class LinkError(Exception):
    """The link's signature is wrong or missing, or it has expired (HTTP 403)."""


class LinkSigner:
    """Makes and checks media links. ``base_url`` has no trailing slash; ``ttl`` is in seconds."""

    def __init__(self, secret: bytes, base_url: str, ttl: int):
        self._secret = secret
        self.base_url = base_url.rstrip("/")
        self.ttl = ttl

    def _sig(self, media_id: str, filename: str, exp: int) -> str:
        msg = f"{media_id}/{filename}\n{exp}".encode()
        digest = hmac.new(self._secret, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def link(self, media_id: str, filename: str, ttl: int | None = None, now: float | None = None) -> str:
        """The full URL, valid for ``ttl`` seconds (default: the configured TTL)."""
        exp = int((now if now is not None else time.time()) + (ttl or self.ttl))
        query = urlencode({"exp": exp, "sig": self._sig(media_id, filename, exp)})
        return f"{self.base_url}/media/{quote(media_id, safe='')}/{quote(filename, safe='')}?{query}"

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
