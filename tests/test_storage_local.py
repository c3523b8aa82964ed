"""plugins.storage_local.LocalStorage on a real directory (tmp_path)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.sdk.storage import InvalidKey, ObjectNotFound, StorageBackend, StorageError
from plugins.storage_local import LocalStorage
from plugins.storage_local.backend import META_XATTR, WRITE_BATCH, WRITE_SLICE
from tests.conftest import MANIFEST, MEDIA


@pytest.fixture(params=[True, False], ids=["xattr", "sidecar"])
async def storage(tmp_path: Path, request: pytest.FixtureRequest) -> LocalStorage:
    """A backend keeping metadata in extended attributes, and one keeping it in sidecar files (as
    on a filesystem without user extended attributes)."""
    s = LocalStorage(tmp_path / "root", fsync=True, xattrs=request.param)
    await s.start()
    return s


async def _gen(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]
        await asyncio.sleep(0)


async def _read(storage: LocalStorage, key: str, start: int | None = None, end: int | None = None) -> bytes:
    opened = await storage.open(key, start, end)
    try:
        return b"".join([c async for c in opened.chunks])
    finally:
        await opened.close()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def test_local_storage_is_a_storage_backend(tmp_path):
    assert isinstance(LocalStorage(tmp_path), StorageBackend)


# -- put / open / stat / delete / list ------------------------------------------------------------

async def test_put_open_stat_delete(storage):
    data = (MEDIA / "photo.jpg").read_bytes()
    key = "waha/default/2024/01/02/image/m_1.jpg"
    result = await storage.put(key, _gen(data), "image/jpeg", {"sha256": MANIFEST["photo.jpg"]["sha256_hex"],
                                                              "filename": "Fotó.jpg"})
    assert result.key == key and result.size == len(data)
    assert (storage.root / key).read_bytes() == data

    opened = await storage.open(key)
    assert (opened.size, opened.start, opened.end, opened.length) == (len(data), 0, len(data) - 1, len(data))
    assert opened.content_type == "image/jpeg"
    body = b"".join([c async for c in opened.chunks])
    await opened.close()
    await opened.close()  # idempotent
    assert hashlib.sha256(body).hexdigest() == MANIFEST["photo.jpg"]["sha256_hex"]

    st = await storage.stat(key)
    assert st.key == key and st.size == len(data) and st.content_type == "image/jpeg"
    assert st.metadata == {"sha256": MANIFEST["photo.jpg"]["sha256_hex"], "filename": "Fotó.jpg"}
    assert st.modified > 0

    assert await storage.delete(key) is True
    assert await storage.delete(key) is False
    with pytest.raises(ObjectNotFound):
        await storage.stat(key)
    with pytest.raises(ObjectNotFound):
        await storage.open(key)
    assert [p for p in _files(storage.root)] == []  # the sidecar went too


async def test_metadata_is_an_extended_attribute_of_the_file(tmp_path):
    s = LocalStorage(tmp_path / "root")
    await s.start()
    await s.put("a/b.jpg", _gen(b"jpeg"), "image/jpeg", {"filename": "b.jpg", "media-id": "m_1"})
    assert json.loads(os.getxattr(s.root / "a" / "b.jpg", META_XATTR)) == {
        "content_type": "image/jpeg", "metadata": {"filename": "b.jpg", "media-id": "m_1"}}
    assert _files(s.root) == [s.root / "a" / "b.jpg"]  # no sidecar
    st = await s.stat("a/b.jpg")
    assert (st.content_type, st.metadata) == ("image/jpeg", {"filename": "b.jpg", "media-id": "m_1"})


async def test_sidecars_without_extended_attributes(tmp_path):
    s = LocalStorage(tmp_path / "root", xattrs=False)
    await s.start()
    await s.put("a/b.jpg", _gen(b"jpeg"), "image/jpeg", {"filename": "b.jpg"})
    assert json.loads((s.root / ".meta" / "a" / "b.jpg.json").read_text()) == {
        "content_type": "image/jpeg", "metadata": {"filename": "b.jpg"}}
    with pytest.raises(OSError):
        os.getxattr(s.root / "a" / "b.jpg", META_XATTR)
    assert (await s.stat("a/b.jpg")).content_type == "image/jpeg"
    assert await s.delete("a/b.jpg") is True
    assert _files(s.root) == []


async def test_an_object_with_a_sidecar_of_an_earlier_version_is_read(tmp_path):
    root = tmp_path / "root"
    (root / "old").mkdir(parents=True)
    (root / "old" / "x.pdf").write_bytes(b"%PDF")
    (root / ".meta" / "old").mkdir(parents=True)
    (root / ".meta" / "old" / "x.pdf.json").write_text(
        json.dumps({"content_type": "application/pdf", "metadata": {"filename": "x.pdf"}}))
    s = LocalStorage(root)
    await s.start()
    st = await s.stat("old/x.pdf")
    assert (st.content_type, st.metadata) == ("application/pdf", {"filename": "x.pdf"})
    opened = await s.open("old/x.pdf")
    await opened.close()
    assert opened.content_type == "application/pdf"
    assert await s.delete("old/x.pdf") is True
    assert _files(root) == []  # the sidecar went too


async def test_missing_key(storage):
    with pytest.raises(ObjectNotFound):
        await storage.stat("no/such/key")
    with pytest.raises(ObjectNotFound):
        await storage.open("no/such/key")
    assert await storage.delete("no/such/key") is False


async def test_put_overwrites(storage):
    await storage.put("a/b", _gen(b"first version, longer"), "text/plain", {"v": "1"})
    await storage.put("a/b", _gen(b"second"), "text/csv", {"v": "2"})
    assert await _read(storage, "a/b") == b"second"
    st = await storage.stat("a/b")
    assert (st.size, st.content_type, st.metadata) == (6, "text/csv", {"v": "2"})


async def test_empty_object(storage):
    result = await storage.put("e/empty", _gen(b""), "application/x-empty", {})
    assert result.size == 0
    assert await _read(storage, "e/empty") == b""
    assert (await storage.stat("e/empty")).size == 0


async def test_list_with_prefix(storage):
    keys = ["waha/a/1.jpg", "waha/a/2.jpg", "waha/ab/3.jpg", "waha/b/4.jpg", "meta/x/5.pdf", "top"]
    for i, key in enumerate(keys):
        await storage.put(key, _gen(b"x" * (i + 1)), "application/octet-stream", {})

    async def listed(prefix: str = "") -> dict[str, int]:
        return {o.key: o.size for o in [o async for o in storage.list(prefix)]}

    assert await listed() == {k: i + 1 for i, k in enumerate(keys)}  # no .tmp, no .meta sidecars
    assert set(await listed("waha/")) == {"waha/a/1.jpg", "waha/a/2.jpg", "waha/ab/3.jpg", "waha/b/4.jpg"}
    assert set(await listed("waha/a/")) == {"waha/a/1.jpg", "waha/a/2.jpg"}
    assert set(await listed("waha/a")) == {"waha/a/1.jpg", "waha/a/2.jpg", "waha/ab/3.jpg"}
    assert set(await listed("waha/a/2")) == {"waha/a/2.jpg"}
    assert set(await listed("meta")) == {"meta/x/5.pdf"}
    assert await listed("nothing/") == {}


# -- ranges ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("start,end", [(0, 0), (0, 9), (10, 19), (5, None), (None, 4), (990, 999),
                                       (999, 999), (0, 999), (500, 5000), (300_000, 300_099)])
async def test_ranges_are_inclusive(storage, start, end):
    data = bytes(range(256)) * 2000  # 512000 bytes: more than one read chunk
    data_small = data[:1000]
    key = "r/big" if start is not None and start >= 1000 else "r/small"
    payload = data if key == "r/big" else data_small
    await storage.put(key, _gen(payload, 65536), "application/octet-stream", {})
    opened = await storage.open(key, start, end)
    body = b"".join([c async for c in opened.chunks])
    first = start or 0
    last = len(payload) - 1 if end is None else min(end, len(payload) - 1)
    assert body == payload[first:last + 1]
    assert (opened.start, opened.end, opened.size) == (first, last, len(payload))
    assert opened.length == len(body)


# -- keys -----------------------------------------------------------------------------------------

BAD_KEYS = ["../x", "/abs", "a//b", "a/../b", "a\\b", "a\x00b", ".tmp/x", "", ".meta/x.json", "a/.hidden",
            "a/./b", "..", ".", "a/", "/"]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_invalid_keys_are_refused(storage, key):
    with pytest.raises(InvalidKey):
        await storage.put(key, _gen(b"data"), "text/plain", {})
    with pytest.raises(InvalidKey):
        await storage.open(key)
    with pytest.raises(InvalidKey):
        await storage.stat(key)
    with pytest.raises(InvalidKey):
        await storage.delete(key)
    assert isinstance(InvalidKey(), ValueError) and isinstance(InvalidKey(), StorageError)
    assert _files(storage.root) == []


async def test_symlink_inside_the_root_pointing_outside_is_refused(storage, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"top secret")
    (storage.root / "escape").symlink_to(outside, target_is_directory=True)
    (storage.root / "file-link").symlink_to(outside / "secret.txt")

    for key in ("escape/secret.txt", "file-link"):
        with pytest.raises(InvalidKey):
            await storage.open(key)
        with pytest.raises(InvalidKey):
            await storage.stat(key)
        with pytest.raises(InvalidKey):
            await storage.delete(key)
    with pytest.raises(InvalidKey):
        await storage.put("escape/new.txt", _gen(b"planted"), "text/plain", {})
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (outside / "secret.txt").read_bytes() == b"top secret"


# -- atomicity ------------------------------------------------------------------------------------

class Boom(Exception):
    pass


@pytest.mark.parametrize("fail_after", [0, 3, 40, 150])  # 150 chunks of 64 KiB: two write batches and a part
async def test_a_stream_that_raises_leaves_nothing_behind(storage, fail_after):
    async def failing() -> AsyncIterator[bytes]:
        for _ in range(fail_after):
            yield b"z" * 65536
            await asyncio.sleep(0)
        raise Boom("provider hung up")

    with pytest.raises(Boom):
        await storage.put("waha/a/m_1.bin", failing(), "application/octet-stream", {"k": "v"})
    assert _files(storage.root) == []
    assert list((storage.root / ".tmp").iterdir()) == []
    with pytest.raises(ObjectNotFound):
        await storage.stat("waha/a/m_1.bin")


async def test_a_failed_overwrite_keeps_the_old_object(storage):
    await storage.put("k/v", _gen(b"old bytes"), "text/plain", {"v": "old"})

    async def failing() -> AsyncIterator[bytes]:
        yield b"new"
        raise Boom()

    with pytest.raises(Boom):
        await storage.put("k/v", failing(), "text/csv", {"v": "new"})
    assert await _read(storage, "k/v") == b"old bytes"
    st = await storage.stat("k/v")
    assert (st.content_type, st.metadata) == ("text/plain", {"v": "old"})
    assert list((storage.root / ".tmp").iterdir()) == []


@pytest.mark.parametrize("chunks", [1, WRITE_BATCH // 65536 + 3])  # the latter: a batch handed to the writing thread
async def test_a_cancelled_put_leaves_nothing_behind(storage, chunks):
    started = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            yield os.urandom(65536)
        started.set()
        await asyncio.Event().wait()
        yield b"never"

    task = asyncio.create_task(storage.put("c/x", stalled(), "application/octet-stream", {}))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _files(storage.root) == []


@pytest.mark.parametrize("chunk_size", [65536, 4 * WRITE_SLICE + 7])  # the latter: written in slices
async def test_a_put_of_many_write_batches_stores_every_byte_in_order(storage, chunk_size):
    data = os.urandom(3 * WRITE_BATCH + 12345)
    metadata = {"sha256": ""}
    await storage.put("big/obj.bin", _gen(data, chunk_size), "video/mp4", metadata)
    assert hashlib.sha256((storage.root / "big" / "obj.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert await _read(storage, "big/obj.bin", 2 * WRITE_BATCH - 5, 2 * WRITE_BATCH + 5) == \
        data[2 * WRITE_BATCH - 5:2 * WRITE_BATCH + 6]
    assert list((storage.root / ".tmp").iterdir()) == []


async def test_metadata_is_read_after_the_stream_ends(storage):
    data = b"payload" * 1000
    metadata: dict[str, str] = {"filename": "a.bin"}

    async def stream() -> AsyncIterator[bytes]:
        yield data[:3000]
        yield data[3000:]
        # like MediaStream: the digest is known only at the end of the stream
        metadata["sha256"] = hashlib.sha256(data).hexdigest()

    await storage.put("m/k", stream(), "application/octet-stream", metadata)
    st = await storage.stat("m/k")
    assert st.metadata == {"filename": "a.bin", "sha256": hashlib.sha256(data).hexdigest()}


# -- concurrency ----------------------------------------------------------------------------------

async def test_concurrent_puts_of_different_keys(storage):
    datas = {f"c/{i % 3}/k{i}": os.urandom(50_000 + i * 997) for i in range(12)}
    results = await asyncio.gather(*(
        storage.put(k, _gen(d, 8192), "application/octet-stream", {"sha256": hashlib.sha256(d).hexdigest()})
        for k, d in datas.items()))
    assert [r.size for r in results] == [len(d) for d in datas.values()]
    for k, d in datas.items():
        assert await _read(storage, k) == d
        st = await storage.stat(k)
        assert st.size == len(d) and st.metadata["sha256"] == hashlib.sha256(d).hexdigest()
    assert list((storage.root / ".tmp").iterdir()) == []


async def test_concurrent_puts_of_the_same_key_leave_one_whole_object(storage):
    datas = [bytes([i]) * (100_000 + i * 1000) for i in range(8)]
    await asyncio.gather(*(storage.put("same/key", _gen(d, 8192), "application/octet-stream", {})
                           for d in datas))
    body = await _read(storage, "same/key")
    assert body in datas  # one writer's bytes, whole: never a mix, never truncated
    assert (await storage.stat("same/key")).size == len(body)
    assert list((storage.root / ".tmp").iterdir()) == []


async def test_concurrent_puts_of_the_same_key_keep_data_and_metadata_together(tmp_path):
    # The race depends on thread scheduling; each round has a good chance to show it, so the
    # test tries up to 60 rounds and fails at the first inconsistent object.
    writers = 8
    datas = [bytes([i]) * (100_000 + i * 1000) for i in range(writers)]
    for rnd in range(60):
        s = LocalStorage(tmp_path / f"r{rnd}", fsync=True)
        await s.start()
        await asyncio.gather(*(s.put("same/key", _gen(d, 25_000), f"application/x-w{i}",
                                     {"writer": str(i)}) for i, d in enumerate(datas)))
        st = await s.stat("same/key")
        body = await _read(s, "same/key")
        writer = int(st.metadata["writer"])
        assert st.content_type == f"application/x-w{writer}"
        assert body == datas[writer], f"round {rnd}: bytes of writer {body[0]}, metadata of writer {writer}"
        shutil.rmtree(tmp_path / f"r{rnd}")


async def test_a_key_prefix_is_not_an_object(storage):
    await storage.put("dir/obj", _gen(b"x"), "text/plain", {})
    with pytest.raises(ObjectNotFound):
        await storage.stat("dir")
    with pytest.raises(ObjectNotFound):
        await storage.open("dir")
    assert await storage.delete("dir") is False
    assert await _read(storage, "dir/obj") == b"x"


# -- lifecycle ------------------------------------------------------------------------------------

async def test_check_raises_when_the_root_is_gone(storage):
    await storage.check()
    shutil.rmtree(storage.root)
    with pytest.raises(StorageError):
        await storage.check()


async def test_start_removes_leftover_temp_files(tmp_path):
    root = tmp_path / "root"
    (root / ".tmp").mkdir(parents=True)
    (root / ".tmp" / "3f2a9c").write_bytes(b"half an object")
    (root / ".tmp" / "3f2a9c.meta").write_text("{}")
    (root / "kept").mkdir()
    (root / "kept" / "obj").write_bytes(b"whole")
    s = LocalStorage(root)
    await s.start()
    assert list((root / ".tmp").iterdir()) == []
    assert await _read(s, "kept/obj") == b"whole"
    await s.check()
    await s.close()


async def test_a_second_process_on_the_root_leaves_the_first_ones_temp_files(tmp_path):
    # a serving worker (or a second replica) starts on the root while the daemon stores an object
    first, second = LocalStorage(tmp_path / "root"), LocalStorage(tmp_path / "root")
    await first.start()
    (first.root / ".tmp" / "upload-in-progress").write_bytes(b"half an object")
    await second.start()
    assert [p.name for p in (first.root / ".tmp").iterdir()] == ["upload-in-progress"]
    await second.close()
    await first.close()  # the first process is gone: the next start sweeps
    third = LocalStorage(tmp_path / "root")
    await third.start()
    assert list((first.root / ".tmp").iterdir()) == []
    await third.close()


async def test_url_is_none(storage):
    await storage.put("u/x", _gen(b"1"), "text/plain", {})
    assert await storage.url("u/x", 60, "x.txt") is None


def test_new_directories_are_made_with_the_parents_that_gained_an_entry(tmp_path):
    """The directories a put creates are returned by their parents, which the put then fsyncs."""
    from plugins.storage_local.backend import _make_directories

    (tmp_path / "a").mkdir()
    made = _make_directories(str(tmp_path / "a" / "b" / "c" / "d"))
    assert (tmp_path / "a" / "b" / "c" / "d").is_dir()
    assert made == {str(tmp_path / "a"), str(tmp_path / "a" / "b"), str(tmp_path / "a" / "b" / "c")}
    assert _make_directories(str(tmp_path / "a" / "b")) == set()  # nothing new: nothing to fsync
