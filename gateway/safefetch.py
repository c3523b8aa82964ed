"""Fetching a URL a caller gave us, without becoming a proxy into private networks (DESIGN §7).

Only ``http`` and ``https``. Every address a host name resolves to must be public
(``ipaddress``' ``is_global``: not loopback, private, link-local — which includes the cloud
metadata address 169.254.169.254 —, unique-local, CGNAT, multicast or reserved; IPv4-mapped IPv6
addresses are judged as their IPv4 address) unless it falls in ``fetch.allow_networks``. A host that
is an IPv4 address in a legacy, non-canonical form (``2130706433``, ``127.1``, ``0x7f.0.0.1``,
``0177.0.0.1``, which ``inet_aton`` and some resolvers read as an address) is refused outright. The check
runs in the connector's resolver, so the connection goes to the very addresses that were checked
(no DNS rebinding between check and connect). Redirects are followed by hand, at most
``fetch.max_redirects``, each hop checked again.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from gateway.config import FetchSettings
from gateway.media import base_mime
from gateway.sdk.provider import MediaSource

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
REDIRECTS = {301, 302, 303, 307, 308}


class FetchRefused(OSError):
    """The URL is not allowed (scheme, or an address that is not public). HTTP 422."""


class RemoteFetchError(Exception):
    """The URL could not be fetched (network error, non-2xx answer). ``status``: the remote's."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class AddressPolicy:
    """Which IP addresses a fetch may connect to: public ones, plus ``allow_networks``."""

    def __init__(self, allow_networks: list[str]):
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allow_networks]

    def check(self, address: str | IPAddress) -> None:
        """Raise :class:`FetchRefused` unless ``address`` may be contacted."""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allowed):
            return
        if not ip.is_global or ip.is_multicast:
            raise FetchRefused(f"address {ip} is not public (loopback, private, link-local or reserved); "
                               "[fetch] allow_networks lists networks allowed anyway")


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that refuses host names resolving to any non-allowed address."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            self.policy.check(result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


class SafeFetcher:
    """Opens caller-supplied URLs under the address policy. ``start()``/``close()`` own a session."""

    def __init__(self, settings: FetchSettings):
        self.settings = settings
        self.policy = AddressPolicy(settings.allow_networks)
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the guarded client session."""
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.policy), use_dns_cache=False)
        self._http = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def close(self) -> None:
        """Close the session."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    def check_url(self, url: URL) -> None:
        """Scheme and (for IP literals) address checks. Raises :class:`FetchRefused`."""
        if url.scheme not in ("http", "https") or not url.host:
            raise FetchRefused(f"only http and https URLs are fetched, not {str(url)[:100]!r}")
        host = url.host.strip("[]")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            if _legacy_ipv4(host):
                raise FetchRefused(f"host {host!r} is an IPv4 address in a non-canonical form; "
                                   "write it as a dotted quad") from None
            return  # a name: checked by the resolver after resolution
        self.policy.check(literal)

    @asynccontextmanager
    async def open(self, url: str, headers: dict[str, str] | None = None) -> AsyncIterator[MediaSource]:
        """Stream ``url`` (after checks and redirects). Raises :class:`FetchRefused` or
        :class:`RemoteFetchError`."""
        if self._http is None:
            raise RuntimeError("fetcher not started")
        current = URL(url)
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout, sock_connect=10)
        for _ in range(self.settings.max_redirects + 1):
            self.check_url(current)
            try:
                resp = await self._http.get(current, headers=headers or {}, allow_redirects=False,
                                            timeout=timeout)
            except FetchRefused:
                raise
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, FetchRefused):
                    raise FetchRefused(f"{current.host}: {exc.os_error}") from None
                raise RemoteFetchError(f"cannot connect to {current.host}: {exc}") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise RemoteFetchError(f"cannot fetch {current.host}: {type(exc).__name__}: {exc}") from exc
            async with resp:
                if resp.status in REDIRECTS and "Location" in resp.headers:
                    current = current.join(URL(resp.headers["Location"]))
                    continue
                if resp.status != 200:
                    raise RemoteFetchError(f"{current.host} answered HTTP {resp.status}", status=resp.status)
                yield MediaSource(chunks=resp.content.iter_chunked(1024 * 1024),
                                  mimetype=base_mime(resp.headers.get("Content-Type")),
                                  size=resp.content_length, filename=_filename(current, resp))
                return
        raise RemoteFetchError(f"more than {self.settings.max_redirects} redirects")


def _legacy_ipv4(host: str) -> bool:
    """Whether ``inet_aton`` (POSIX; what ``getaddrinfo`` falls back to) reads ``host`` as an IPv4
    address: one to four numbers, decimal, octal (``0``-prefixed) or hex (``0x``)."""
    if not host or not all(c.isalnum() or c == "." for c in host) or not host.isascii():
        return False
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _filename(url: URL, resp: Any) -> str | None:
    disposition = resp.content_disposition
    if disposition is not None and disposition.filename:
        return str(disposition.filename)
    name = url.name
    return name or None
