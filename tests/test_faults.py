"""Faults that must never dead-letter or lose a message (issue 10, items 6, 7 and 9), against real
processes: the daemon as a subprocess, emulators whose media bodies break or stall part-way, and a
storage root on a filesystem that fills up."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway import hookimpl
from gateway.app import create_app
from gateway.keys import CATALOG
from gateway.config import ConfigError, Settings, load_settings, plugin_settings
from gateway.plugins import make_manager
from gateway.sdk.download import CHUNK, RECV_BYTES, DownloadPolicy, resumable_body
from gateway.sdk.provider import FetchError, MediaRef, MediaSource
from gateway.sdk.storage import StorageError
from plugins.storage_local import LocalSettings, LocalStorage
from plugins.whatsapp_waha import WahaProvider, WahaSettings
from tests.conftest import MANIFEST, MEDIA, REPO, base_config, deep_merge, waha_payload
from tests.daemon import GatewayProcess, write_toml
from tests.emulators.faults import BodyFault, serve_media
from tests.emulators.graph import GraphEmulator
from tests.emulators.sink import Delivery
from tests.test_crash_safety import _daemon, _db_rows
from tests.test_meta import graph, media_of, message, meta_settings, sign, webhook  # noqa: F401 (fixture)

KiB, MiB = 1024, 1024 * 1024


async def _post_waha(daemon: GatewayProcess, url: str, message_id: str, name: str) -> None:
    body = json.dumps(waha_payload(url, message_id=message_id, filename=name, mimetype=MANIFEST[name]["mime"]))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{daemon.url}/webhooks/waha", data=body) as r:
            assert r.status == 200


async def _forward_one(daemon: GatewayProcess, waha, sink, name: str, message_id: str) -> Delivery:
    """Start ``daemon``, post one WAHA message with fixture ``name``, wait for its forward, stop
    the daemon (it must exit 0); return the forward."""
    await daemon.start()
    try:
        await _post_waha(daemon, waha.add_file(MEDIA / name), message_id, name)
        [d] = await sink.wait_for(1, timeout=30)
        assert await daemon.terminate() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
    return d


def _jobs(tmp_path: Path, kind: str) -> list[tuple]:
    return _db_rows(tmp_path / "var" / "gateway.db",
                    f"SELECT state, attempts, last_error FROM jobs WHERE kind = '{kind}'")


def _range_start(header: str) -> int:
    """N of ``bytes=N-`` (the client resumes from the bytes it got: at most what the emulator sent,
    as aiohttp drops what it buffered when the connection breaks)."""
    assert re.fullmatch(r"bytes=\d+-", header), header
    return int(header[6:-1])


def _objects(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".meta" not in p.parts]


# -- item 6: a media body that breaks or stalls part-way -------------------------------------------

@pytest.mark.parametrize("mode", ["drop", "stall"])
async def test_a_body_that_breaks_part_way_is_retried_then_forwarded_with_a_note(
        mode, tmp_path, waha, sink, unused_tcp_port):
    """Every attempt breaks (dropped connection, or a stall past the total timeout) and the
    provider has no Range support: the event is forwarded with a note, and no job goes dead."""
    waha.ranges = False
    waha.body_fault = BodyFault(mode=mode, at=20 * KiB, times=1000, stall=5)
    daemon = _daemon(tmp_path, unused_tcp_port, waha, sink, media={"fetch_timeout": 1.0})
    d = await _forward_one(daemon, waha, sink, "photo.jpg", "broken-1")
    [note] = d.json["gateway"]["notes"]
    assert note["path"] == "payload.media" and "download" in note["error"]
    assert d.json["payload"]["media"]["url"].startswith(waha.base_url)  # the original link
    assert [state for state, *_ in _jobs(tmp_path, "ingest")] == ["done"]
    assert _db_rows(tmp_path / "var" / "gateway.db", "SELECT COUNT(*) FROM jobs WHERE state='dead'") == [(0,)]
    assert waha.served("photo.jpg") >= 3  # one per attempt at least (max_attempts = 3)
    assert _objects(tmp_path / "var" / "media") == []  # nothing half-written left behind


@pytest.mark.parametrize("reader", ["event loop", "thread"])
@pytest.mark.parametrize("mode", ["drop", "stall"])
async def test_a_broken_download_resumes_with_range_and_keeps_the_digest(
        mode, reader, tmp_path, waha, sink, unused_tcp_port):
    """The body breaks (or stalls past the idle timeout) after N bytes: the next request asks for
    ``Range: bytes=N-`` and the stored object is whole (SHA-256 as in the manifest), whether the
    event loop or a reader thread (``media.fetch_thread_min_bytes``) reads the body."""
    name, at = "screenshot.png", 100_000
    waha.body_fault = BodyFault(mode=mode, at=at, times=1, stall=5)
    daemon = _daemon(tmp_path, unused_tcp_port, waha, sink, media={
        "fetch_idle_timeout": 0.5, "fetch_thread_min_bytes": 1 if reader == "thread" else 0})
    d = await _forward_one(daemon, waha, sink, name, "resume-1")
    first, second = [h for p, h in waha.requests if p.endswith("/" + name)]
    assert "Range" not in first and 0 < _range_start(second["Range"]) <= at
    if reader == "thread":  # it passes on every byte it got before the break
        assert _range_start(second["Range"]) == at
    assert d.json["gateway"]["notes"] == []
    media = d.json["payload"]["media"]["gateway"]
    assert media["sha256"] == MANIFEST[name]["sha256_hex"] and media["size"] == MANIFEST[name]["size"]
    [obj] = _objects(tmp_path / "var" / "media")
    assert hashlib.sha256(obj.read_bytes()).hexdigest() == MANIFEST[name]["sha256_hex"]
    assert [(state, attempts) for state, attempts, _ in _jobs(tmp_path, "ingest")] == [("done", 1)]


async def test_a_resumed_meta_download_is_checked_against_the_declared_digest(
        tmp_path, graph: GraphEmulator, sink, unused_tcp_port):
    """Meta declares the SHA-256; a download resumed after a drop still passes the check, and one
    whose resumed bytes differ is refused (forwarded with a note, never stored)."""
    data = deep_merge(base_config(tmp_path, unused_tcp_port, None, sink),
                      {"providers": {"meta": meta_settings(graph)}})
    daemon = GatewayProcess(write_toml(tmp_path / "gateway.toml", data), unused_tcp_port, tmp_path / "daemon.log")
    good = graph.add_media(MEDIA / "clip.mp4", "video/mp4")
    graph.body_fault = BodyFault(mode="drop", at=150_000, times=1)
    await daemon.start()
    try:
        async with aiohttp.ClientSession() as http:
            body = json.dumps(webhook([message("clip.mp4", good, "wamid.resume-good")])).encode()
            async with http.post(f"{daemon.url}/webhooks/meta", data=body,
                                 headers={"X-Hub-Signature-256": sign(body)}) as r:
                assert r.status == 200
            [d] = await sink.wait_for(1, timeout=30)
            ranges = [h.get("Range") for m, p, h in graph.requests if p == "/whatsapp_business/attachments/"]
            assert ranges[0] is None and 0 < _range_start(ranges[1]) <= 150_000 and len(ranges) == 2
            assert d.json["gateway"]["notes"] == []
            assert media_of(d)["gateway"]["sha256"] == MANIFEST["clip.mp4"]["sha256_hex"]

            # the same file declared with another file's digest: the resumed whole is still checked
            bad = graph.add_media(MEDIA / "clip.mp4", "video/mp4")
            graph.media[bad].sha256 = MANIFEST["photo.jpg"]["sha256_hex"]
            graph.body_fault = BodyFault(mode="drop", at=150_000, times=10)
            msg = message("clip.mp4", bad, "wamid.resume-bad")
            msg["video"]["sha256"] = MANIFEST["photo.jpg"]["sha256_base64"]
            body = json.dumps(webhook([msg])).encode()
            async with http.post(f"{daemon.url}/webhooks/meta", data=body,
                                 headers={"X-Hub-Signature-256": sign(body)}) as r:
                assert r.status == 200
            d2 = (await sink.wait_for(2, timeout=30))[1]
        assert await daemon.terminate() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
    [note] = d2.json["gateway"]["notes"]
    assert "sha256" in note["error"]
    assert len(_objects(tmp_path / "var" / "media")) == 1
    assert _db_rows(tmp_path / "var" / "gateway.db", "SELECT COUNT(*) FROM jobs WHERE state='dead'") == [(0,)]


def _large_mp4(path: Path, size: int) -> tuple[str, str]:
    """Write ``size`` random bytes behind an MP4 ``ftyp`` box (libmagic: video/mp4) to ``path``;
    return their SHA-256 as hex and as base64 (Meta's form)."""
    data = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + os.urandom(size - 24)
    path.write_bytes(data)
    digest = hashlib.sha256(data)
    return digest.hexdigest(), base64.b64encode(digest.digest()).decode()


@pytest.mark.parametrize("reader", ["event loop", "thread"])
async def test_a_large_meta_download_broken_mid_way_resumes_and_is_checked_against_its_digest(
        reader, tmp_path, graph: GraphEmulator, sink, unused_tcp_port):
    """A body several MiB long (hashed in a worker thread past its first bytes) breaks after 3 MiB:
    the resumed download is stored whole with the declared digest; declared with another digest,
    the same resumed download is refused (forwarded with a note, nothing stored). Read by the
    event loop (6 MiB is under the default ``fetch_thread_min_bytes``) or by a reader thread."""
    path = tmp_path / "large.mp4"
    sha_hex, sha_b64 = _large_mp4(path, 6 * MiB + 4321)
    at = 3 * MiB + 17
    data = deep_merge(base_config(tmp_path, unused_tcp_port, None, sink),
                      {"providers": {"meta": meta_settings(graph)}})
    if reader == "thread":
        data = deep_merge(data, {"media": {"fetch_thread_min_bytes": MiB}})
    daemon = GatewayProcess(write_toml(tmp_path / "gateway.toml", data), unused_tcp_port, tmp_path / "daemon.log")

    def video(media_id: str, wamid: str, sha256: str) -> dict:
        return {"from": "16505551234", "id": wamid, "timestamp": "1744344496", "type": "video",
                "video": {"id": media_id, "mime_type": "video/mp4", "sha256": sha256}}

    await daemon.start()
    try:
        async with aiohttp.ClientSession() as http:
            for n, declared in enumerate((sha_b64, MANIFEST["photo.jpg"]["sha256_base64"]), 1):
                media_id = graph.add_media(path, "video/mp4")
                if n == 2:
                    graph.media[media_id].sha256 = MANIFEST["photo.jpg"]["sha256_hex"]
                graph.body_fault = BodyFault(mode="drop", at=at, times=1 if n == 1 else 10)
                body = json.dumps(webhook([video(media_id, f"wamid.large-{n}", declared)])).encode()
                async with http.post(f"{daemon.url}/webhooks/meta", data=body,
                                     headers={"X-Hub-Signature-256": sign(body)}) as r:
                    assert r.status == 200
                await sink.wait_for(n, timeout=60)
        assert await daemon.terminate() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
    good, bad = sink.deliveries
    ranges = [h.get("Range") for m, p, h in graph.requests if p == "/whatsapp_business/attachments/"]
    assert ranges[0] is None and 0 < _range_start(ranges[1]) <= at
    if reader == "thread":
        assert _range_start(ranges[1]) == at
    assert good.json["gateway"]["notes"] == []
    assert (media_of(good)["gateway"]["sha256"], media_of(good)["gateway"]["size"]) == (sha_hex, 6 * MiB + 4321)
    [obj] = _objects(tmp_path / "var" / "media")
    assert obj.read_bytes() == path.read_bytes()
    [note] = bad.json["gateway"]["notes"]
    assert "sha256" in note["error"]
    assert _db_rows(tmp_path / "var" / "gateway.db", "SELECT COUNT(*) FROM jobs WHERE state='dead'") == [(0,)]


async def _server(aiohttp_server, handler, *paths: str):
    """A real aiohttp server on 127.0.0.1 answering ``GET`` on each of ``paths`` with ``handler``."""
    app = web.Application()
    for path in paths:
        app.router.add_get(path, handler)
    return await aiohttp_server(app, host="127.0.0.1")


async def test_a_download_reads_in_large_pieces_and_gives_its_pooled_connection_back_as_it_was(
        aiohttp_server, tmp_path):
    """``resumable_body`` lets the socket transport take RECV_BYTES per read while it reads a body,
    and puts asyncio's own read size back before the kept-alive connection serves another request."""
    data = os.urandom(3 * MiB + 5)

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=data)

    server = await _server(aiohttp_server, serve, "/f")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        url = server.make_url("/f")
        async with http.get(url) as resp:
            transport = resp.connection.transport
            default = transport.max_size
            chunks, sizes = [], set()
            async for chunk in resumable_body(http, resp, url, {}, DownloadPolicy()):
                chunks.append(chunk)
                sizes.add(transport.max_size)
        assert b"".join(chunks) == data and sizes == {RECV_BYTES} and default < RECV_BYTES
        async with http.get(url) as again:  # the same kept-alive connection
            assert again.connection.transport is transport and transport.max_size == default
            assert await again.read() == data


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gateway-download"]


@contextmanager
def _reader_threads_started() -> Iterator[list[str]]:
    """The reader threads started in the block, by name, however short their lives: each thread
    started meanwhile calls :func:`threading.setprofile`'s hook first. (Sampling
    :func:`threading.enumerate` missed a thread that read a whole body ahead of the consumer and
    ended before the first sample.)"""
    names: list[str] = []

    def hook(frame: Any, event: str, arg: Any) -> None:
        name = threading.current_thread().name
        if name == "gateway-download":
            names.append(name)
        sys.setprofile(None)  # this thread is known: no more calls

    threading.setprofile(hook)
    try:
        yield names
    finally:
        threading.setprofile(None)


async def _no_reader_thread(timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while _reader_threads():
        assert asyncio.get_running_loop().time() < deadline, "the reader thread did not end"
        await asyncio.sleep(0.01)


async def test_a_large_download_is_read_by_a_thread_of_its_own_then_its_connection_closed(
        aiohttp_server):
    """A body declaring ``thread_min_bytes`` or more is read by a thread of its own: whole and in
    order, with pieces of CHUNK bytes; the thread ends with the body, and the connection, whose
    aiohttp parser never saw the rest, is closed rather than pooled. A smaller body on the same
    session keeps the event loop's reads and its kept-alive connection."""
    data, small = os.urandom(5 * MiB + 7), os.urandom(MiB - 1)

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=data if request.path == "/big" else small)

    server = await _server(aiohttp_server, serve, "/big", "/small")
    policy = DownloadPolicy(thread_min_bytes=MiB)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        for _ in range(2):  # the small body's connection is reused
            url = server.make_url("/small")
            async with http.get(url) as resp:
                transport = resp.connection.transport
                assert b"".join([c async for c in resumable_body(http, resp, url, {}, policy)]) == small
                assert not _reader_threads()
        url = server.make_url("/big")
        async with http.get(url) as resp:
            assert resp.connection.transport is transport
            chunks = []
            with _reader_threads_started() as threads:
                async for chunk in resumable_body(http, resp, url, {}, policy):
                    chunks.append(chunk)
        assert b"".join(chunks) == data and len(threads) == 1
        assert sum(len(c) == CHUNK for c in chunks) >= 4  # the thread's pieces, after aiohttp's bytes
        assert transport.is_closing()
        await _no_reader_thread()
        async with http.get(server.make_url("/small")) as again:  # a new connection
            assert again.connection.transport is not transport and await again.read() == small


async def test_a_threaded_download_abandoned_part_way_stops_its_thread_and_closes_the_connection(
        aiohttp_server):
    """The consumer stops part-way (a size limit, a cancelled job): the reader thread ends and the
    provider sees the connection closed, though it still had bytes to send."""
    closed = asyncio.Event()

    async def serve(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 256 * MiB
        await resp.prepare(request)
        piece = os.urandom(256 * KiB)
        try:
            for _ in range(1024):
                await resp.write(piece)
        except (ConnectionError, asyncio.CancelledError):
            closed.set()
            raise
        return resp

    server = await _server(aiohttp_server, serve, "/endless")
    async with aiohttp.ClientSession() as http:
        url = server.make_url("/endless")
        async with http.get(url) as resp:
            body = resumable_body(http, resp, url, {}, DownloadPolicy(thread_min_bytes=1))
            for _ in range(20):  # the bytes aiohttp holds come first, then the thread's pieces
                assert len(await anext(body)) > 0
                if _reader_threads():
                    break
            assert _reader_threads() and len(await anext(body)) > 0
            await body.aclose()
        await _no_reader_thread()
        await asyncio.wait_for(closed.wait(), 5)


@pytest.mark.parametrize("mode", ["drop", "stall"])
async def test_a_threaded_download_that_breaks_resumes_with_range(mode, aiohttp_server, tmp_path):
    """On the thread's path too, a body that is cut (the connection closed) or stalls past the idle
    timeout after N bytes is resumed with ``Range: bytes=N-`` (N: exactly the bytes passed on),
    and the whole is right; with no resume left, it is a FetchError named for what happened."""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * MiB + 11))
    fault, ranges = BodyFault(mode=mode, at=2 * MiB + 5, times=1, stall=3), []

    async def serve(request: web.Request) -> web.StreamResponse:
        ranges.append(request.headers.get("Range"))
        return await serve_media(request, path, {"Content-Type": "application/octet-stream"}, fault)

    server = await _server(aiohttp_server, serve, "/f")
    policy = DownloadPolicy(thread_min_bytes=1, idle_timeout=0.3)
    async with aiohttp.ClientSession() as http:
        url = server.make_url("/f")
        async with http.get(url) as resp:
            got = b"".join([c async for c in resumable_body(http, resp, url, {}, policy)])
        assert got == path.read_bytes()
        assert ranges[0] is None and ranges[1] == f"bytes={2 * MiB + 5}-" and len(ranges) == 2

        fault.times = 1
        async with http.get(url) as resp:
            with pytest.raises(FetchError) as failed:
                async for _ in resumable_body(http, resp, url, {}, DownloadPolicy(
                        thread_min_bytes=1, idle_timeout=0.3, max_resumes=0)):
                    pass
        assert failed.value.reason == ("stalled" if mode == "stall" else "interrupted")
        assert f"after {2 * MiB + 5} bytes" in str(failed.value)
        await _no_reader_thread()


async def test_a_threaded_download_past_its_total_time_is_too_slow_and_its_thread_ends(
        aiohttp_server, tmp_path):
    """A body that stalls for less than the idle timeout but past the download's total time (its
    declared size at ``min_rate`` plus ``base_timeout``) ends as ``too_slow``, with no resume, and
    the reader thread, blocked in its ``recv``, ends too."""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(2 * MiB))
    fault = BodyFault(mode="stall", at=MiB + 3, times=1, stall=5)

    async def serve(request: web.Request) -> web.StreamResponse:
        return await serve_media(request, path, {"Content-Type": "application/octet-stream"}, fault)

    server = await _server(aiohttp_server, serve, "/f")
    policy = DownloadPolicy(thread_min_bytes=1, idle_timeout=10, base_timeout=0.5, min_rate=10**12)
    async with aiohttp.ClientSession() as http:
        url = server.make_url("/f")
        started = asyncio.get_running_loop().time()
        async with http.get(url) as resp:
            with pytest.raises(FetchError) as failed, _reader_threads_started() as threads:
                async for _ in resumable_body(http, resp, url, {}, policy):
                    pass
        assert failed.value.reason == "too_slow" and len(threads) == 1
        assert asyncio.get_running_loop().time() - started < 3
        await _no_reader_thread(timeout=2)


async def test_a_body_with_a_content_coding_is_never_read_by_the_thread(aiohttp_server):
    """A gzip body declaring its Content-Length is decoded by aiohttp, not read raw by the thread."""
    data = os.urandom(MiB) * 3
    packed = gzip.compress(data, compresslevel=1)

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=packed, headers={"Content-Encoding": "gzip"})

    server = await _server(aiohttp_server, serve, "/z")
    async with aiohttp.ClientSession() as http:
        url = server.make_url("/z")
        async with http.get(url) as resp:
            assert resp.content_length == len(packed)
            chunks = []
            with _reader_threads_started() as threads:
                async for chunk in resumable_body(http, resp, url, {}, DownloadPolicy(thread_min_bytes=1)):
                    chunks.append(chunk)
        assert b"".join(chunks) == data and not threads


# -- item 7: a full disk ----------------------------------------------------------------------------

@contextmanager
def _small_filesystem(path: Path, size: int) -> Iterator[bool]:
    """Mount a ``size``-byte tmpfs at ``path`` when allowed (root); yield whether it is mounted.
    Otherwise ``path`` is a plain directory and the caller fakes "full" with ``min_free_bytes``."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(filler: Path, leave: int) -> None:
    """Grow or shrink ``filler`` so that ``leave`` bytes stay free on its filesystem."""
    have = filler.stat().st_size if filler.exists() else 0
    st = os.statvfs(filler.parent)
    target = max(0, have + st.f_bavail * st.f_frsize - leave)
    with filler.open("ab") as fh:
        fh.truncate(0)
        fh.write(b"\0" * target)  # tmpfs has no holes to cheat with: write the bytes


async def _wait_deferred(tmp_path: Path, attempts: int, timeout: float = 20) -> str:
    """Wait until the ingest job was tried ``attempts`` times; it must stay queued, never dead."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        [(state, tried, error)] = _jobs(tmp_path, "ingest")
        assert state != "dead", error
        if tried >= attempts and state == "queued":
            return error
        assert asyncio.get_running_loop().time() < deadline, (state, tried, error)
        await asyncio.sleep(0.1)


async def test_enospc_during_a_put_is_a_storage_error_and_leaves_nothing(tmp_path):
    """A write that runs out of space raises :class:`StorageError` (an outage the ingest defers),
    not a bare ``OSError`` from the cleanup's second flush, and removes its temp file."""
    root = tmp_path / "small"

    async def stream(size: int) -> AsyncIterator[bytes]:
        for _ in range(size // (64 * KiB)):
            yield os.urandom(64 * KiB)

    with _small_filesystem(root, 1 * MiB) as mounted:
        if mounted:  # a real ENOSPC
            storage = LocalStorage(root / "media", fsync=True)
        else:  # no tmpfs here: "full" is free space under min_free_bytes
            free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
            storage = LocalStorage(root / "media", fsync=True, min_free_bytes=free + 1024 * MiB)
        await storage.start()
        for size in (2 * MiB, 8 * MiB):  # one written in one batch, one over several
            with pytest.raises(StorageError) as caught:
                await storage.put(f"a/full-{size}.bin", stream(size), "application/octet-stream", {})
            assert ("No space left" if mounted else "full") in str(caught.value)
        assert [p for p in (root / "media").rglob("*") if p.is_file()] == []
        if mounted:  # the failed writes gave their space back: a small object still fits
            await storage.put("a/small.bin", stream(128 * KiB), "application/octet-stream", {})
            assert (root / "media" / "a" / "small.bin").stat().st_size == 128 * KiB


async def test_a_full_disk_defers_jobs_and_fails_readiness_until_it_clears(
        tmp_path, waha, sink, unused_tcp_port):
    name, min_free = "clip.mp4", 256 * KiB
    root = tmp_path / "small"
    with _small_filesystem(root, 4 * MiB) as mounted:
        storage = {"local": {"root": str(root / "media"),
                             "min_free_bytes": min_free if mounted else os.statvfs(tmp_path).f_bavail
                             * os.statvfs(tmp_path).f_frsize + 1024 * MiB}}
        daemon = _daemon(tmp_path, unused_tcp_port, waha, sink, storage=storage)
        filler = root / "filler"
        if mounted:  # room above min_free_bytes, but less than the file: a real ENOSPC mid-write
            _fill(filler, leave=MANIFEST[name]["size"] - 100 * KiB)
        await daemon.start()
        try:
            await _post_waha(daemon, waha.add_file(MEDIA / name), "full-1", name)
            error = await _wait_deferred(tmp_path, attempts=6)  # twice max_attempts
            assert error.startswith("deferred: storage unavailable")
            if mounted:
                assert "No space left on device" in error
                assert os.listdir(root / "media" / ".tmp") == []  # the partial write was removed
                _fill(filler, leave=min_free // 2)
            assert sink.deliveries == []  # nothing forwarded without its media
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{daemon.url}/readyz") as r:
                    assert r.status == 503
                    assert "full" in (await r.json())["storage"]
                async with http.get(f"{daemon.url}/metrics") as r:
                    text = await r.text()
            [line] = [x for x in text.splitlines() if x.startswith('gateway_storage_free_bytes{backend="local"}')]
            assert float(line.split()[-1]) < min_free if mounted else float(line.split()[-1]) > 0

            if mounted:  # space comes back: the job goes through on its next try
                filler.unlink()
            else:  # the operator lowers the threshold: restart with it
                assert await daemon.terminate() == 0
                storage["local"]["min_free_bytes"] = 0
                daemon = _daemon(tmp_path, unused_tcp_port, waha, sink, storage=storage)
                await daemon.start()
            [d] = await sink.wait_for(1, timeout=30)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{daemon.url}/readyz") as r:
                    assert r.status == 200
            assert await daemon.terminate() == 0
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()
        assert d.json["gateway"]["notes"] == []
        assert d.json["payload"]["media"]["gateway"]["sha256"] == MANIFEST[name]["sha256_hex"]
        [obj] = _objects(root / "media")
        assert hashlib.sha256(obj.read_bytes()).hexdigest() == MANIFEST[name]["sha256_hex"]
    assert [state for state, *_ in _jobs(tmp_path, "ingest")] == ["done"]


# -- item 9: delivery is at-least-once; the window is as small as it can be -------------------------

class _SlowForwardHook:
    """A plugin whose ``message_forwarded`` hook blocks until released."""

    def __init__(self) -> None:
        self.called = asyncio.Event()
        self.release = asyncio.Event()

    @hookimpl
    async def message_forwarded(self, event_id: str, target: str, status: int) -> Any:
        self.called.set()
        await self.release.wait()


async def test_a_delivery_is_marked_done_as_soon_as_the_bot_answered(
        aiohttp_server, unused_tcp_port, tmp_path, waha, sink):
    """Nothing runs between the bot's 2xx and the commit that marks the delivery done (hooks run
    after it), so a crash or a shutdown in a slow hook does not repeat the forward."""
    hook = _SlowForwardHook()
    data = deep_merge(base_config(tmp_path, unused_tcp_port, waha, sink), {"server": {"shutdown_grace": 0.2}})
    app = create_app(Settings(config_dir=tmp_path, **data), make_manager(extra=[hook]))
    server = await aiohttp_server(app, host="127.0.0.1", port=unused_tcp_port)
    body = json.dumps(waha_payload(waha.add_file(MEDIA / "photo.jpg"), message_id="once-1"))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.make_url('/webhooks/waha')}", data=body) as r:
            assert r.status == 200
    [d] = await sink.wait_for(1)
    await asyncio.wait_for(hook.called.wait(), 5)
    assert await app[CATALOG].count("jobs", "kind = 'deliver' AND state = 'done'") == 1
    await server.close()  # shutdown while the hook still runs: it is cancelled after the grace

    app2 = create_app(Settings(config_dir=tmp_path, **data), make_manager())
    await aiohttp_server(app2, host="127.0.0.1", port=unused_tcp_port)
    await asyncio.sleep(1.0)
    assert len(sink.deliveries) == 1
    assert d.headers["Idempotency-Key"] == d.json["gateway"]["event_id"]


@pytest.mark.parametrize(("env", "value", "setting"), [
    ("GATEWAY_MEDIA__FETCH_IDLE_TIMEOUT", "0", "media.fetch_idle_timeout"),
    ("GATEWAY_MEDIA__FETCH_MIN_RATE", "0", "media.fetch_min_rate"),
    ("GATEWAY_MEDIA__FETCH_RESUMES", "-1", "media.fetch_resumes"),
    ("GATEWAY_STORAGE__LOCAL__MIN_FREE_BYTES", "-1", "storage.local.min_free_bytes"),
])
def test_a_bad_fault_setting_names_itself(monkeypatch, env, value, setting):
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        settings = load_settings(REPO / "gateway.toml")
        plugin_settings(settings, ("storage", "local"), LocalSettings)
    assert str(info.value).startswith(setting)


class _PlainReadingWaha(WahaProvider):
    """A provider plugin that reads bodies its own way (``iter_chunked``, no shared reader), as a
    third-party plugin may: the host must still treat a broken body as a failed download."""

    @asynccontextmanager
    async def fetch(self, ref: MediaRef) -> AsyncIterator[MediaSource]:
        target, headers = self._target(ref.url)
        async with self._http.get(target, headers=headers) as resp:
            yield MediaSource(chunks=resp.content.iter_chunked(64 * KiB), mimetype=ref.mimetype,
                              size=resp.content_length)


class _PlainReadingWahaPlugin:
    @hookimpl
    def settings_sections(self) -> dict[str, type[WahaSettings]]:
        return {"providers.waha": WahaSettings}

    @hookimpl
    def register_providers(self, settings: Settings) -> list[WahaProvider]:
        return [_PlainReadingWaha(plugin_settings(settings, ("providers", "waha"), WahaSettings))]


async def test_a_broken_body_from_any_provider_plugin_is_a_failed_download(
        aiohttp_server, unused_tcp_port, tmp_path, waha, sink):
    """The ingest, not only the shared reader, turns a body error into a retryable fetch failure:
    retried, then forwarded with a note; the job is not dead."""
    import plugins.storage_local
    waha.body_fault = BodyFault(mode="drop", at=20 * KiB, times=1000)
    data = base_config(tmp_path, unused_tcp_port, waha, sink)
    pm = make_manager(load_entrypoints=False, extra=[plugins.storage_local, _PlainReadingWahaPlugin()])
    app = create_app(Settings(config_dir=tmp_path, **data), pm)
    server = await aiohttp_server(app, host="127.0.0.1", port=unused_tcp_port)
    body = json.dumps(waha_payload(waha.add_file(MEDIA / "photo.jpg"), message_id="plain-1"))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.make_url('/webhooks/waha')}", data=body) as r:
            assert r.status == 200
    [d] = await sink.wait_for(1, timeout=20)
    [note] = d.json["gateway"]["notes"]
    assert "broke off" in note["error"]
    assert waha.served("photo.jpg") == 3  # max_attempts, no resume by this plugin
    assert await app[CATALOG].count("jobs", "state = 'dead'") == 0


async def test_the_idle_timeout_covers_a_stall_before_the_headers(tmp_path, waha, sink, unused_tcp_port):
    """No byte at all, not even headers, for ``fetch_idle_timeout``: a failed attempt, retried,
    then forwarded with a note (the total timeout alone would allow minutes)."""
    waha.delay = 3.0
    daemon = _daemon(tmp_path, unused_tcp_port, waha, sink, media={"fetch_idle_timeout": 0.3},
                     queue={"max_attempts": 2})
    d = await _forward_one(daemon, waha, sink, "photo.jpg", "headers-1")
    [note] = d.json["gateway"]["notes"]
    assert "Timeout" in note["error"]
    assert waha.served("photo.jpg") == 2
