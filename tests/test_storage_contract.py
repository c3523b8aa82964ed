"""The storage contract (gateway/storage.py), one suite run against every backend."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.config import Settings
from gateway.media import MediaStream, MediaTooLarge
from gateway.sdk.storage import ObjectNotFound
from plugins.storage_local import LocalStorage
from plugins.storage_s3 import S3Settings, S3Storage
from tests.conftest import boto3_client, s3_config

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
async def backend(request, tmp_path) -> AsyncIterator:
    if request.param == "local":
        storage = LocalStorage(tmp_path / "media")
    else:
        storage = S3Storage(S3Settings(**s3_config(request.getfixturevalue("s3_server"))))
    await storage.start()
    yield storage
    await storage.close()


async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]
        await asyncio.sleep(0)


async def sealed(data: bytes, metadata: dict[str, str]) -> AsyncIterator[bytes]:
    """What the gateway does: add sha256 to the metadata once the stream has ended."""
    async for c in chunks(data):
        yield c
    metadata["sha256"] = hashlib.sha256(data).hexdigest()


async def read_all(storage, key: str, start=None, end=None, bucket=None) -> bytes:
    obj = await storage.open(key, start, end, bucket=bucket)
    try:
        return b"".join([c async for c in obj.chunks])
    finally:
        await obj.close()


@pytest.mark.parametrize("size", [0, 1000, 12 * MiB + 123], ids=["empty", "small", "multipart"])
async def test_put_open_stat(backend, size):
    data = os.urandom(size)
    meta = {"filename": "photo.jpg", "media-id": "m_1"}
    result = await backend.put("a/b/obj.bin", sealed(data, meta), "image/jpeg", meta, category="image")
    assert result.size == size
    assert await read_all(backend, "a/b/obj.bin", bucket=result.bucket) == data
    st = await backend.stat("a/b/obj.bin", bucket=result.bucket)
    assert st.size == size and st.content_type == "image/jpeg"
    if backend.name == "s3" and size > backend.settings.multipart_threshold:
        assert "sha256" not in st.metadata  # S3 keeps a CRC32 of the parts' CRC32s; the catalog the SHA-256
    else:
        assert st.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    assert st.metadata["filename"] == "photo.jpg"


async def test_ranges(backend):
    data = os.urandom(300_000)
    await backend.put("r/obj", chunks(data), "application/octet-stream", {})
    assert await read_all(backend, "r/obj", 0, 9) == data[:10]
    assert await read_all(backend, "r/obj", 1000, 200_000) == data[1000:200_001]
    assert await read_all(backend, "r/obj", 299_990, None) == data[299_990:]
    obj = await backend.open("r/obj", 5, 14)
    assert (obj.start, obj.end, obj.length, obj.size) == (5, 14, 10, 300_000)
    await obj.close()


async def test_delete(backend):
    await backend.put("d/obj", chunks(b"x" * 10), "text/plain", {})
    assert await backend.delete("d/obj") is True
    assert await backend.delete("d/obj") is False
    with pytest.raises(ObjectNotFound):
        await backend.open("d/obj")
    with pytest.raises(ObjectNotFound):
        await backend.stat("d/obj")


async def test_list_by_prefix(backend):
    for key in ("p/1/a", "p/1/b", "p/2/c", "q/d"):
        await backend.put(key, chunks(key.encode()), "text/plain", {})
    assert sorted(o.key for o in [o async for o in backend.list("p/1/")]) == ["p/1/a", "p/1/b"]
    assert sorted(o.key for o in [o async for o in backend.list("p/")]) == ["p/1/a", "p/1/b", "p/2/c"]
    every = {o.key: o.size for o in [o async for o in backend.list()]}
    assert every == {"p/1/a": 5, "p/1/b": 5, "p/2/c": 5, "q/d": 3}


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
async def test_size_limit_abort_leaves_nothing(backend, size):
    limit = size - 1
    stream = MediaStream(chunks(os.urandom(size)), max_bytes=limit)
    with pytest.raises(MediaTooLarge):
        await backend.put("big/obj", stream, "application/octet-stream", {})
    assert [o async for o in backend.list()] == []
    with pytest.raises(ObjectNotFound):
        await backend.stat("big/obj")
    if backend.name == "s3":
        client = boto3_client(str(backend.settings.endpoint_url))
        assert client.list_multipart_uploads(Bucket=backend.settings.bucket).get("Uploads", []) == []


async def test_concurrent_puts(backend):
    same = [os.urandom(150_000) for _ in range(4)]
    different = {f"c/{i}": os.urandom(100_000 + i) for i in range(6)}
    await asyncio.gather(
        *(backend.put("c/same", chunks(d), "application/octet-stream", {}) for d in same),
        *(backend.put(k, chunks(d), "application/octet-stream", {}) for k, d in different.items()),
    )
    assert await read_all(backend, "c/same") in same  # one whole object, never a mix
    for key, data in different.items():
        assert await read_all(backend, key) == data


async def test_check(backend):
    await backend.check()


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
