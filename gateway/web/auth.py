"""API keys for the HTTP APIs (DESIGN §7): ``Authorization: Bearer <key>``.

Keys are configured in ``[[api.keys]]`` and compared by SHA-256 digest in constant time. A key
carries scopes (``read``, ``write``, ``admin``; ``admin`` implies the others) and, optionally, a
tenant that limits what it sees.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from aiohttp import web

from gateway.config import ApiSettings
from gateway.keys import API_KEYS
from gateway.web.errors import ApiError

SCOPES = ("read", "write", "admin")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who called: the key's ``name``, its ``scopes`` and its ``tenant`` (None: every tenant)."""

    name: str
    scopes: frozenset[str]
    tenant: str | None

    def allows(self, scope: str) -> bool:
        """True if the key has ``scope`` (or ``admin``)."""
        return scope in self.scopes or "admin" in self.scopes


class Unauthorized(Exception):
    """No key, or a key that matches none (HTTP 401)."""


class Forbidden(Exception):
    """A valid key without the needed scope (HTTP 403)."""


class ApiKeys:
    """The configured keys, by digest."""

    def __init__(self, settings: ApiSettings) -> None:
        self._keys = [(k.digest(), Principal(k.name, frozenset(k.scopes), k.tenant)) for k in settings.keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value. Raises :class:`Unauthorized`."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("an API key is required: Authorization: Bearer <key>")
        given = hashlib.sha256(authorization[7:].strip().encode()).hexdigest()
        found = None
        for digest, principal in self._keys:  # every digest compared: no timing hint
            if hmac.compare_digest(digest, given):
                found = principal
        if found is None:
            raise Unauthorized("the API key is not valid")
        return found

    def by_digest(self, digest: str) -> Principal | None:
        """The principal of the key whose SHA-256 hex digest is ``digest`` (the console's session
        keeps only the digest), or None; every digest compared, as :meth:`identify` does."""
        found = None
        for known, principal in self._keys:
            if hmac.compare_digest(known, digest):
                found = principal
        return found

    def require(self, request: web.Request, scope: str) -> Principal:
        """The caller of ``request`` if it has ``scope``. Raises :class:`Unauthorized`, :class:`Forbidden`."""
        principal = self.identify(request.headers.get("Authorization"))
        if not principal.allows(scope):
            raise Forbidden(f"the API key {principal.name!r} lacks the {scope!r} scope")
        return principal


def require(request: web.Request, scope: str) -> Principal:
    """The API key's principal if it has ``scope``. Raises :class:`ApiError` 401 (no or bad key,
    with ``WWW-Authenticate``, RFC 6750 §3) or 403 (the scope is missing)."""
    try:
        return request.app[API_KEYS].require(request, scope)
    except Unauthorized as exc:
        raise ApiError(401, str(exc), headers={"WWW-Authenticate": 'Bearer realm="gateway"'}) from None
    except Forbidden as exc:
        raise ApiError(403, str(exc)) from None


def require_operator(request: web.Request, what: str) -> Principal:
    """An ``admin`` key bound to no tenant (``what`` spans every tenant). Raises :class:`ApiError`."""
    principal = require(request, "admin")
    if principal.tenant is not None:
        raise ApiError(403, f"{what}: use an admin key without a tenant")
    return principal
