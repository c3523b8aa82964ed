"""Shared fixtures: the WAHA emulator, the bot sink and a gateway, all real servers on 127.0.0.1."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.keys import CATALOG
from gateway.config import Settings
from tests.emulators.sink import BotSink
from tests.emulators.waha import WahaEmulator
from tests.postgres import PostgresServer
from tests.seaweed import ACCESS_KEY, REGION, SECRET_KEY, SeaweedS3

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("GATEWAY_FIXTURES", REPO / "tests" / "fixtures"))
MEDIA = FIXTURES / "media"
MANIFEST: dict[str, dict[str, Any]] = json.loads((MEDIA / "MANIFEST.json").read_text())


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``, nested dicts merged."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def waha_payload(url: str | None, *, message_id: str, mimetype: str | None = None,
                 filename: str | None = None, event: str = "message", session: str = "default",
                 template: str = "message_image.json") -> dict[str, Any]:
    """A documented WAHA payload from the fixtures with its media pointed at ``url``."""
    data = json.loads((FIXTURES / "payloads" / "waha" / template).read_text())
    data["event"] = event
    data["session"] = session
    data["payload"]["id"] = message_id
    data["payload"]["media"]["url"] = url
    if mimetype is not None:
        data["payload"]["media"]["mimetype"] = mimetype
    if filename is not None:
        data["payload"]["media"]["filename"] = filename
    return data


def waha_hmac(key: str, body: bytes) -> str:
    """``X-Webhook-Hmac`` as WAHA computes it: hex HMAC-SHA512 of the raw body."""
    return hmac.new(key.encode(), body, hashlib.sha512).hexdigest()


@dataclass
class Gateway:
    """A running gateway under test."""

    url: str
    app: web.Application
    settings: Settings
    http: aiohttp.ClientSession

    @property
    def media_root(self) -> Path:
        return Path(self.settings.section("storage", "local")["root"])

    def stored_files(self) -> list[Path]:
        """Every file under the storage root, temp files and sidecars included."""
        return sorted(p for p in self.media_root.rglob("*") if p.is_file())

    def object_files(self) -> list[Path]:
        """Stored objects only (no sidecars)."""
        return [p for p in self.stored_files() if ".meta" not in p.parts]

    async def post_waha(self, payload: dict[str, Any] | bytes, headers: dict[str, str] | None = None
                        ) -> aiohttp.ClientResponse:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        async with self.http.post(f"{self.url}/webhooks/waha", data=body,
                                  headers={"Content-Type": "application/json", **(headers or {})}) as r:
            await r.read()
            return r

    async def count(self, table: str, where: str | None = None, args: list[Any] | None = None) -> int:
        return await self.app[CATALOG].count(table, where, args)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """SeaweedFS's S3 gateway on 127.0.0.1, one for the session (see tests/seaweed.py)."""
    server = SeaweedS3()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1, one for the session (see tests/postgres.py); tests take a
    database of their own with ``postgres_server.create_database()``."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_s3_server() -> Iterator[SeaweedS3]:
    """A SeaweedFS of the test's own, to stop and start again (same ports, same data) in the test."""
    server = SeaweedS3()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def s3_config(server: SeaweedS3, bucket: str | None = None, **extra: Any) -> dict[str, Any]:
    """A ``[storage.s3]`` section for ``server`` with a fresh bucket per call."""
    import uuid
    return server.storage_section(bucket or f"gw-{uuid.uuid4().hex[:12]}", connect_timeout=1, read_timeout=20,
                                  max_retries=0, **extra)


def boto3_client(endpoint_url: str):
    """A plain, synchronous boto3 S3 client (SigV4, path-style) for reading back what the gateway wrote."""
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY,
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
async def waha(aiohttp_server, tmp_path: Path) -> WahaEmulator:
    emu = WahaEmulator(api_key="waha-key", lifetime=180.0, workdir=tmp_path / "waha-files")
    server = await aiohttp_server(emu.app, host="127.0.0.1")
    emu.base_url = str(server.make_url("")).rstrip("/")
    return emu


@pytest.fixture
async def sink(aiohttp_server) -> BotSink:
    s = BotSink()
    server = await aiohttp_server(s.app, host="127.0.0.1")
    s.url = str(server.make_url("/hook"))  # type: ignore[attr-defined]
    return s


def base_config(tmp_path: Path, port: int, waha: WahaEmulator | None, sink: BotSink | None) -> dict[str, Any]:
    """The settings every gateway under test starts from (fast retries, real local storage)."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}",
                   "shutdown_grace": 2},
        "catalog": {"path": str(tmp_path / "var" / "gateway.db")},
        "media": {"link_secret": "test-link-secret"},
        "storage": {"backend": "local", "local": {"root": str(tmp_path / "var" / "media")}},
        "queue": {"workers": 4, "max_attempts": 3, "backoff_base": 0.05, "backoff_max": 0.2,
                  "poll_interval": 0.05},
        "log": {"format": "text", "level": "DEBUG"},
        "providers": {},
        "targets": [],
    }
    if waha is not None:
        data["providers"]["waha"] = {"base_url": waha.base_url, "api_key": waha.api_key}
    if sink is not None:
        data["targets"] = [{"name": "bot", "url": sink.url, "secret": "bot-secret"}]  # type: ignore[attr-defined]
    return data


@pytest.fixture
async def start_gateway(aiohttp_server, unused_tcp_port_factory, tmp_path: Path, waha: WahaEmulator,
                        sink: BotSink, http: aiohttp.ClientSession
                        ) -> Callable[..., Awaitable[Gateway]]:
    """``await start_gateway(**overrides)``: a gateway on 127.0.0.1 wired to the emulator and sink."""
    async def _start(**overrides: Any) -> Gateway:
        port = unused_tcp_port_factory()
        data = deep_merge(base_config(tmp_path, port, waha, sink), overrides)
        settings = Settings(config_dir=tmp_path, **data)
        app = create_app(settings)
        server = await aiohttp_server(app, host="127.0.0.1", port=port)
        return Gateway(str(server.make_url("")).rstrip("/"), app, settings, http)

    return _start


@pytest.fixture
async def gateway(start_gateway) -> Gateway:
    return await start_gateway()


# -- settings and samples for the shipped contract suites (gateway/sdk/testing.py) ---------------------

CONTRACT_SECRET = "contract-secret"


@pytest.fixture
def storage_contract_section(storage_contract_section: dict[str, Any], contract_name: str,
                             request: pytest.FixtureRequest) -> dict[str, Any]:
    """S3 runs the storage contract on the session's SeaweedFS (a fresh bucket per test); the other
    backends on their defaults under the test's tmp_path."""
    if contract_name == "s3":
        return s3_config(request.getfixturevalue("s3_server"))
    return storage_contract_section


@pytest.fixture
def provider_contract_section(provider_contract_section: dict[str, Any], contract_name: str) -> dict[str, Any]:
    """The built-in providers with their webhook signatures switched on."""
    secret = {"waha": {"hmac_key": CONTRACT_SECRET}, "meta": {"app_secret": CONTRACT_SECRET}}
    return {**provider_contract_section, **secret.get(contract_name, {})}


@pytest.fixture
def provider_contract_samples(provider_contract_samples: list[tuple[dict[str, str], bytes]],
                              contract_name: str) -> list[tuple[dict[str, str], bytes]]:
    """The documented payloads in tests/fixtures/payloads, signed as each provider signs them."""
    if contract_name == "waha":
        bodies = [(FIXTURES / "payloads" / "waha" / n).read_bytes() for n in ("message_image.json", "message_document.json")]
        return [({"X-Webhook-Hmac": waha_hmac(CONTRACT_SECRET, b)}, b) for b in bodies]
    if contract_name == "meta":
        bodies = [(FIXTURES / "payloads" / "meta" / n).read_bytes() for n in ("webhook_image.json", "webhook_document.json")]
        return [({"X-Hub-Signature-256": "sha256=" + hmac.new(CONTRACT_SECRET.encode(), b, hashlib.sha256).hexdigest()}, b)
                for b in bodies]
    return provider_contract_samples
