"""The contract test suites, shipped as a pytest plugin (entry point ``pytest11``: installing the
gateway is enough to have them).

Every storage backend and every provider that an installed plugin offers is tested against the
contracts of :mod:`gateway.sdk.storage` and :mod:`gateway.sdk.provider`. The suites are collected
in a test run only when asked for, by importing them into a test module::

    # tests/test_contracts.py of your plugin's package
    from gateway.sdk.testing import *  # noqa: F403  (the storage and provider contract tests)

Which plugins: the names of the settings sections they declare (``settings_sections`` hook:
``storage.<name>`` for a backend, ``providers.<name>`` for a provider), from every plugin of the
``gateway`` entry-point group. Each test is parametrised by those names (``[storage-local]``,
``[provider-waha]``).

Restrict the run to your own plugin with the ini setting ``gateway_contracts`` (in
``[tool.pytest.ini_options]``: ``gateway_contracts = ["mine"]``); by default every installed
backend and provider is tested.

Settings for the test: the fixtures :func:`storage_contract_section` and
:func:`provider_contract_section` return the ``[storage.<name>]`` / ``[providers.<name>]`` table
for the name under test (default: ``{}``, the plugin's defaults; relative paths resolve under the
test's ``tmp_path``). Override them in your ``conftest.py`` for a backend that needs a server or
credentials; asking for the same fixture name gives you the default for the other names::

    @pytest.fixture
    def storage_contract_section(storage_contract_section, contract_name, my_server):
        if contract_name == "mine":
            return {"endpoint_url": my_server.url, "bucket": "test"}
        return storage_contract_section

A provider supplies sample webhooks through :func:`provider_contract_samples` (default: none, and
the sample-based tests fail with a message saying so): a list of ``(headers, body)`` pairs that
its ``verify`` accepts and its ``parse`` turns into events with media.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import Settings
from gateway.media import MediaStream, MediaTooLarge
from gateway.plugins import make_manager, offered, section_models
from gateway.sdk.provider import (
    PayloadError,
    Provider,
    RouteDef,
    SignatureError,
    WebhookEvent,
)
from gateway.sdk.storage import IncompleteUploads, InvalidKey, LocalFiles, ObjectNotFound, StorageBackend

__all__ = [
    "test_storage_put_open_stat", "test_storage_ranges", "test_storage_delete", "test_storage_list_by_prefix",
    "test_storage_url", "test_storage_size_limit_abort_leaves_nothing", "test_storage_concurrent_puts",
    "test_storage_local_files", "test_storage_check", "test_provider_keys_are_prefixed_and_stable", "test_provider_refuses_a_bad_signature",
    "test_provider_refuses_hostile_bodies", "test_provider_rewrite_without_outcomes", "test_provider_routes",
]

MiB = 1024 * 1024


def installed(table: str) -> list[str]:
    """The names installed plugins declare settings sections for under ``table`` (``storage`` or
    ``providers``), sorted."""
    models = section_models(make_manager())
    return sorted(path.split(".", 1)[1] for path in models if path.startswith(f"{table}."))


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ini setting ``gateway_contracts``: the names to test (default: every installed one)."""
    parser.addini("gateway_contracts", type="args", default=[],
                  help="storage backends and providers the gateway contract suites test "
                       "(default: every installed one), e.g. gateway_contracts = [\"flat\"]")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``contract_name`` by the installed backends (tests named ``test_storage_*``)
    or providers (``test_provider_*``), restricted to the ini setting ``gateway_contracts``."""
    if "contract_name" not in metafunc.fixturenames:
        return
    table, prefix = ("providers", "provider") if metafunc.function.__name__.startswith("test_provider") \
        else ("storage", "storage")
    only = set(metafunc.config.getini("gateway_contracts"))
    names = [n for n in installed(table) if not only or n in only]
    metafunc.parametrize("contract_name", names, ids=[f"{prefix}-{n}" for n in names])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the suite with nothing installed to test (a storage plugin's run has no provider
    to test), rather than reporting it skipped."""
    def untestable(item: pytest.Item) -> bool:
        skip = item.get_closest_marker("skip")
        return ("contract_name" in getattr(item, "fixturenames", ()) and skip is not None
                and str(skip.kwargs.get("reason", "")).startswith("got empty parameter set"))
    empty = [item for item in items if untestable(item)]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [item for item in items if item not in empty]


# -- fixtures a plugin's conftest may override ---------------------------------------------------

@pytest.fixture
def storage_contract_section(contract_name: str) -> dict[str, Any]:
    """The ``[storage.<contract_name>]`` table for the backend under test (default ``{}``)."""
    return {}


@pytest.fixture
def provider_contract_section(contract_name: str) -> dict[str, Any]:
    """The ``[providers.<contract_name>]`` table for the provider under test (default ``{}``)."""
    return {}


@pytest.fixture
def provider_contract_samples(contract_name: str) -> list[tuple[dict[str, str], bytes]]:
    """Sample webhooks ``(headers, body)`` for the provider under test, signed for its section."""
    return []


# -- the objects under test ------------------------------------------------------------------------

@pytest.fixture
async def contract_storage(contract_name: str, storage_contract_section: dict[str, Any],
                           tmp_path: Path) -> AsyncIterator[StorageBackend]:
    """The started backend ``contract_name`` (closed after the test), built by its plugin's
    ``register_storage`` hook from ``storage_contract_section``."""
    settings = Settings(config_dir=tmp_path, storage={"backend": contract_name,
                                                      contract_name: storage_contract_section})
    backends = offered(make_manager(), "register_storage", settings, "storage")
    assert contract_name in backends, (
        f"no plugin offers storage {contract_name!r} with the section {storage_contract_section!r}: "
        "supply its settings by overriding the storage_contract_section fixture")
    backend = backends[contract_name]
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
def contract_provider(contract_name: str, provider_contract_section: dict[str, Any], tmp_path: Path) -> Provider:
    """The provider ``contract_name`` (not started), built by its plugin's ``register_providers``
    hook from ``provider_contract_section``."""
    settings = Settings(config_dir=tmp_path, providers={contract_name: provider_contract_section})
    providers = offered(make_manager(), "register_providers", settings, "providers")
    assert contract_name in providers, (
        f"no plugin offers provider {contract_name!r} with the section {provider_contract_section!r}: "
        "supply its settings by overriding the provider_contract_section fixture")
    provider: Provider = providers[contract_name]
    return provider


@pytest.fixture
async def contract_http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for presigned URLs."""
    async with aiohttp.ClientSession() as session:
        yield session


# -- helpers -----------------------------------------------------------------------------------------

async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """``data`` as a stream of ``size``-byte chunks, yielding to the loop between them."""
    for i in range(0, len(data), size):
        yield data[i:i + size]
        await asyncio.sleep(0)


async def sealed(data: bytes, metadata: dict[str, str]) -> AsyncIterator[bytes]:
    """What the gateway does: add sha256 to the metadata once the stream has ended."""
    async for c in chunks(data):
        yield c
    metadata["sha256"] = hashlib.sha256(data).hexdigest()


async def read_all(storage: StorageBackend, key: str, start: int | None = None, end: int | None = None,
                   bucket: str | None = None) -> bytes:
    """The bytes of ``key`` (or of the inclusive range), read through ``open``."""
    obj = await storage.open(key, start, end, bucket=bucket)
    try:
        return b"".join([c async for c in obj.chunks])
    finally:
        await obj.close()


# -- the storage contract -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1000, 12 * MiB + 123], ids=["empty", "small", "multipart"])
async def test_storage_put_open_stat(contract_storage: StorageBackend, size: int) -> None:
    """put streams an object of any size; open and stat give it back with its type and metadata
    (``sha256``, added once the stream ended, when the backend keeps it for that size)."""
    backend = contract_storage
    data = os.urandom(size)
    meta = {"filename": "photo.jpg", "media-id": "m_1"}
    result = await backend.put("a/b/obj.bin", sealed(data, meta), "image/jpeg", meta, category="image")
    assert result.size == size
    assert await read_all(backend, "a/b/obj.bin", bucket=result.bucket) == data
    st = await backend.stat("a/b/obj.bin", bucket=result.bucket)
    assert st.size == size and st.content_type == "image/jpeg"
    assert st.metadata.get("sha256", hashlib.sha256(data).hexdigest()) == hashlib.sha256(data).hexdigest()
    assert st.metadata["filename"] == "photo.jpg"


async def test_storage_ranges(contract_storage: StorageBackend) -> None:
    """open(key, start, end) streams the inclusive byte range and reports it."""
    backend = contract_storage
    data = os.urandom(300_000)
    await backend.put("r/obj", chunks(data), "application/octet-stream", {})
    assert await read_all(backend, "r/obj", 0, 9) == data[:10]
    assert await read_all(backend, "r/obj", 1000, 200_000) == data[1000:200_001]
    assert await read_all(backend, "r/obj", 299_990, None) == data[299_990:]
    obj = await backend.open("r/obj", 5, 14)
    assert (obj.start, obj.end, obj.length, obj.size) == (5, 14, 10, 300_000)
    await obj.close()


async def test_storage_delete(contract_storage: StorageBackend) -> None:
    """delete says whether the object existed; afterwards open and stat raise ObjectNotFound."""
    backend = contract_storage
    await backend.put("d/obj", chunks(b"x" * 10), "text/plain", {})
    assert await backend.delete("d/obj") is True
    assert await backend.delete("d/obj") is False
    with pytest.raises(ObjectNotFound):
        await backend.open("d/obj")
    with pytest.raises(ObjectNotFound):
        await backend.stat("d/obj")


async def test_storage_list_by_prefix(contract_storage: StorageBackend) -> None:
    """list(prefix) gives every object under the prefix with its size."""
    backend = contract_storage
    for key in ("p/1/a", "p/1/b", "p/2/c", "q/d"):
        await backend.put(key, chunks(key.encode()), "text/plain", {})
    assert sorted(o.key for o in [o async for o in backend.list("p/1/")]) == ["p/1/a", "p/1/b"]
    assert sorted(o.key for o in [o async for o in backend.list("p/")]) == ["p/1/a", "p/1/b", "p/2/c"]
    every = {o.key: o.size for o in [o async for o in backend.list()]}
    assert every == {"p/1/a": 5, "p/1/b": 5, "p/2/c": 5, "q/d": 3}


async def test_storage_url(contract_storage: StorageBackend, contract_http: aiohttp.ClientSession) -> None:
    """url is None (no direct URLs) or a URL that serves the object with the filename (RFC 6266)."""
    backend = contract_storage
    data = b"hello presigned"
    await backend.put("u/obj.txt", chunks(data), "text/plain", {})
    url = await backend.url("u/obj.txt", 60, filename="r\u00e9sum\u00e9.txt", content_type="text/plain")
    if url is None:
        return
    async with contract_http.get(url) as r:
        assert r.status == 200 and await r.read() == data
        assert "filename*=UTF-8''r%C3%A9sum%C3%A9.txt" in r.headers["Content-Disposition"]


@pytest.mark.parametrize("size", [200_000, 11 * MiB], ids=["small", "multipart"])
async def test_storage_size_limit_abort_leaves_nothing(contract_storage: StorageBackend, size: int) -> None:
    """A stream that raises part-way (here: over the size limit) leaves no object, no temporary
    object and no incomplete upload behind."""
    backend = contract_storage
    stream = MediaStream(chunks(os.urandom(size)), max_bytes=size - 1)
    with pytest.raises(MediaTooLarge):
        await backend.put("big/obj", stream, "application/octet-stream", {})
    assert [o async for o in backend.list()] == []
    with pytest.raises(ObjectNotFound):
        await backend.stat("big/obj")
    if isinstance(backend, IncompleteUploads):
        assert [u async for u in backend.incomplete_uploads()] == []


async def test_storage_concurrent_puts(contract_storage: StorageBackend) -> None:
    """Concurrent puts to one key leave one whole object, never a mix; other keys are unaffected."""
    backend = contract_storage
    same = [os.urandom(150_000) for _ in range(4)]
    different = {f"c/{i}": os.urandom(100_000 + i) for i in range(6)}
    await asyncio.gather(
        *(backend.put("c/same", chunks(d), "application/octet-stream", {}) for d in same),
        *(backend.put(k, chunks(d), "application/octet-stream", {}) for k, d in different.items()),
    )
    assert await read_all(backend, "c/same") in same
    for key, data in different.items():
        assert await read_all(backend, key) == data


async def test_storage_local_files(contract_storage: StorageBackend) -> None:
    """A backend with local files (:class:`LocalFiles`, optional; others have nothing to check):
    ``local_path`` names a file holding exactly the object's bytes (or ``None``), with no
    symlink at its last component; after delete no file is there; a key that could leave the
    root raises :class:`InvalidKey`."""
    backend = contract_storage
    if not isinstance(backend, LocalFiles):
        return
    data = os.urandom(70_000)
    result = await backend.put("l/a/obj.bin", chunks(data), "application/octet-stream", {})
    path = backend.local_path("l/a/obj.bin", bucket=result.bucket)
    if path is None:
        return
    assert os.path.isabs(path) and not os.path.islink(path)
    assert Path(path).read_bytes() == data
    assert backend.local_path("l/a/obj.bin", bucket=result.bucket) == path  # stable
    await backend.put("l/a/obj.bin", chunks(data[:10]), "application/octet-stream", {})
    assert Path(path).read_bytes() == data[:10]  # the same path holds the new object
    assert await backend.delete("l/a/obj.bin", bucket=result.bucket)
    assert not os.path.exists(path)
    for bad in ("../escape", "/etc/passwd", "l/../../x", "l/.hidden", ""):
        with pytest.raises(InvalidKey):
            backend.local_path(bad)


async def test_storage_check(contract_storage: StorageBackend) -> None:
    """check passes on a reachable backend with room."""
    await contract_storage.check()


# -- the provider contract ----------------------------------------------------------------------------

def _events(provider: Provider, samples: list[tuple[dict[str, str], bytes]]) -> list[list[WebhookEvent]]:
    assert samples, (f"provider {provider.name!r}: no sample webhooks; supply some by overriding the "
                     "provider_contract_samples fixture")
    out = []
    for headers, body in samples:
        provider.verify(headers, body)
        out.append(provider.parse(body))
    return out


def test_provider_keys_are_prefixed_and_stable(
        contract_provider: Provider, provider_contract_samples: list[tuple[dict[str, str], bytes]]) -> None:
    """Idempotency and source keys start with ``<name>:`` (unique across providers) and a
    redelivery of the same body gives the same keys."""
    provider = contract_provider
    first = _events(provider, provider_contract_samples)
    again = _events(provider, provider_contract_samples)
    prefix = f"{provider.name}:"
    for events, repeated in zip(first, again, strict=True):
        assert events, "a sample webhook gave no event"
        assert [e.idempotency_key for e in events] == [e.idempotency_key for e in repeated]
        for event in events:
            assert event.idempotency_key.startswith(prefix)
            assert isinstance(event.payload, dict)
            for ref in event.media:
                assert ref.source_key.startswith(prefix)
    assert any(ref for events in first for e in events for ref in e.media), "no sample carries media"


def test_provider_refuses_a_bad_signature(
        contract_provider: Provider, provider_contract_samples: list[tuple[dict[str, str], bytes]]) -> None:
    """A body changed after signing, or sent without the signature headers, is refused with
    SignatureError when the sample was signed (a provider configured unsigned accepts it)."""
    provider = contract_provider
    headers, body = _samples_or_fail(provider, provider_contract_samples)[0]
    tampered = body.replace(b"}", b" }", 1)
    if not headers:
        provider.verify({}, tampered)  # unsigned setup: nothing to check
        return
    with pytest.raises(SignatureError):
        provider.verify(headers, tampered)
    with pytest.raises(SignatureError):
        provider.verify({}, body)
    with pytest.raises(SignatureError):
        provider.verify({k: "\udcff\u00e9" + v[::-1] for k, v in headers.items()}, body)


def _samples_or_fail(provider: Provider, samples: list[tuple[dict[str, str], bytes]]
                     ) -> list[tuple[dict[str, str], bytes]]:
    _events(provider, samples)
    return samples


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b"null", b"{\"a\": " * 200 + b"1" + b"}" * 200,
                                  b"\xff\xfe"], ids=["empty", "text", "array", "null", "deep", "binary"])
def test_provider_refuses_hostile_bodies(contract_provider: Provider, body: bytes) -> None:
    """A body that is not the documented JSON object raises PayloadError (HTTP 400), never
    anything else."""
    with pytest.raises(PayloadError):
        contract_provider.parse(body)


def test_provider_rewrite_without_outcomes(
        contract_provider: Provider, provider_contract_samples: list[tuple[dict[str, str], bytes]]) -> None:
    """rewrite with nothing stored returns a JSON object and leaves the parsed event untouched."""
    provider = contract_provider
    for events in _events(provider, provider_contract_samples):
        for event in events:
            before = repr(event.payload)
            out = provider.rewrite(event, [])
            assert isinstance(out, Mapping)
            assert repr(event.payload) == before


def test_provider_routes(contract_provider: Provider) -> None:
    """routes() lists RouteDefs with a method and a path starting with ``/``."""
    for route in contract_provider.routes():
        assert isinstance(route, RouteDef)
        assert route.path.startswith("/") and route.method and callable(route.handler)
