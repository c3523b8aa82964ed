"""The storage and provider contracts (gateway/sdk/storage.py, gateway/sdk/provider.py).

The generic suites ship in :mod:`gateway.sdk.testing` (a pytest plugin) and run here against every
installed backend and provider: the built-in ones and the example plugin (examples/storage_flat).
Their settings and samples come from tests/conftest.py (``storage_contract_section``,
``provider_contract_section``, ``provider_contract_samples``). What follows the star import is
what only the built-in backends promise beyond the contract.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.config import Settings
from gateway.media import MediaStream, MediaTooLarge
from gateway.sdk.storage import ObjectNotFound
from gateway.sdk.testing import *  # noqa: F403  (the shipped contract suites)
from gateway.sdk.testing import chunks, installed, sealed
from plugins.storage_local import LocalStorage
from plugins.storage_s3 import S3Settings, S3Storage
from tests.conftest import boto3_client, s3_config

MiB = 1024 * 1024


def test_the_suites_see_every_installed_plugin():
    """The shipped suites are parametrised by what is installed: the built-ins and the example."""
    assert {"local", "s3", "flat"} <= set(installed("storage"))
    assert {"waha", "meta"} <= set(installed("providers"))


@pytest.fixture(params=["local", "s3"])
async def backend(request, tmp_path) -> AsyncIterator:
    if request.param == "local":
        storage = LocalStorage(tmp_path / "media")
    else:
        storage = S3Storage(S3Settings(**s3_config(request.getfixturevalue("s3_server"))))
    await storage.start()
    yield storage
    await storage.close()


@pytest.mark.parametrize("size", [0, 1000, 12 * MiB + 123], ids=["empty", "small", "multipart"])
async def test_put_keeps_the_sha256(backend, size):
    data = os.urandom(size)
    meta = {"filename": "photo.jpg", "media-id": "m_1"}
    result = await backend.put("a/b/obj.bin", sealed(data, meta), "image/jpeg", meta, category="image")
    st = await backend.stat("a/b/obj.bin", bucket=result.bucket)
    if backend.name == "s3" and size > backend.settings.multipart_threshold:
        assert "sha256" not in st.metadata  # S3 keeps a CRC32 of the parts' CRC32s; the catalog the SHA-256
    else:
        assert st.metadata["sha256"] == hashlib.sha256(data).hexdigest()


async def test_url(backend, http_session):
    data = b"hello presigned"
    await backend.put("u/obj.txt", chunks(data), "text/plain", {})
    url = await backend.url("u/obj.txt", 60, filename="r\u00e9sum\u00e9.txt", content_type="text/plain")
    if backend.name == "local":
        assert url is None
        return
    async with http_session.get(url) as r:
        assert r.status == 200 and await r.read() == data
        assert "filename*=UTF-8''r%C3%A9sum%C3%A9.txt" in r.headers["Content-Disposition"]


@pytest.mark.parametrize("size", [200_000, 11 * MiB], ids=["small", "multipart"])
async def test_size_limit_abort_leaves_no_multipart_upload(backend, size):
    stream = MediaStream(chunks(os.urandom(size)), max_bytes=size - 1)
    with pytest.raises(MediaTooLarge):
        await backend.put("big/obj", stream, "application/octet-stream", {})
    with pytest.raises(ObjectNotFound):
        await backend.stat("big/obj")
    if backend.name == "s3":
        client = boto3_client(str(backend.settings.endpoint_url))
        assert client.list_multipart_uploads(Bucket=backend.settings.bucket).get("Uploads", []) == []


@pytest.fixture
async def http_session():
    async with aiohttp.ClientSession() as s:
        yield s


def test_settings_errors_name_the_setting(tmp_path):
    from gateway.config import ConfigError, plugin_settings
    settings = Settings(config_dir=tmp_path, storage={"backend": "s3", "s3": {"bucket": "b" * 3, "sse": "aws:kms"}})
    with pytest.raises(ConfigError, match="^storage.s3: kms_key_id is required"):
        plugin_settings(settings, ("storage", "s3"), S3Settings)
    settings = Settings(config_dir=tmp_path, storage={"backend": "s3", "s3": {"bucket": "bkt", "part_size": 1}})
    with pytest.raises(ConfigError, match="^storage.s3.part_size: "):
        plugin_settings(settings, ("storage", "s3"), S3Settings)
