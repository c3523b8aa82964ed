"""Serving stored objects over real HTTP (issue 12, item 3): local objects by sendfile (large
ranges) or one read and write (small ones), with our ETag, Range, If-Range, 304, HEAD and
headers; the served rows' cache forgotten on PATCH, DELETE and retention deletes."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multidict import CIMultiDict

from gateway.keys import CATALOG, LINKS, MEDIA_STORE, RETENTION, STORAGE
from gateway.media import content_disposition
from gateway.store import HOT_FILES, HotFiles, MediaRows, hot_files_for_limit
from gateway.web.media import SMALL_OBJECT
from plugins.storage_local.backend import META_XATTR
from tests.conftest import MEDIA
from tests.test_files_api import ADMIN, KEYS, call, upload

BIG = os.urandom(3 * SMALL_OBJECT + 12345)  # sent by sendfile
SMALL = (MEDIA / "photo.jpg").read_bytes()  # one read, one write
assert len(SMALL) <= SMALL_OBJECT


@pytest.fixture
async def gw(start_gateway):
    return await start_gateway(api={"keys": KEYS}, retention={"enabled": False})


async def stored(gw, data: bytes, name: str) -> tuple[dict, str]:
    """Upload ``data``; its file view and the path of its file in local storage."""
    status, info = await upload(gw, ADMIN, data=data, filename=name)
    assert status == 201, info
    record = await gw.app[CATALOG].get_media(info["id"])
    return info, gw.app[STORAGE].local_path(record["key"])


async def fetch(http, url: str, method: str = "GET", **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with http.request(method, url, headers=headers) as r:
        return r.status, r.headers.copy(), await r.read()


@pytest.mark.parametrize("data", [BIG, SMALL], ids=["sendfile", "small"])
async def test_full_body_and_headers(gw, http, data):
    info, _ = await stored(gw, data, "holiday-photo.jpg")
    status, headers, body = await fetch(http, info["links"]["content"])
    assert status == 200 and body == data
    assert headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert headers["Content-Length"] == str(len(data)) and headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Type"] == info["mimetype"]
    assert headers["Cache-Control"] == "private, max-age=3600" and headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Disposition"] == content_disposition("holiday-photo.jpg", info["mimetype"])
    assert "Last-Modified" not in headers  # not aiohttp's FileResponse: our validators only


@pytest.mark.parametrize("data", [BIG, SMALL], ids=["sendfile", "small"])
async def test_ranges_conditionals_and_head(gw, http, data):
    info, _ = await stored(gw, data, "x.bin")
    link, size, etag = info["links"]["content"], len(data), f'"{info["sha256"]}"'
    cases = {"bytes=10-19": (10, 19), "bytes=-100": (size - 100, size - 1), f"bytes={size - 7}-": (size - 7, size - 1),
             f"bytes=5-{size + 50}": (5, size - 1), f"bytes=-{size + 1}": (0, size - 1)}
    for rng, (first, last) in cases.items():
        status, headers, body = await fetch(http, link, Range=rng)
        assert status == 206 and body == data[first:last + 1], rng
        assert headers["Content-Range"] == f"bytes {first}-{last}/{size}" and headers["ETag"] == etag
        assert headers["Content-Length"] == str(last - first + 1)
    for rng in (f"bytes={size}-", f"bytes={size + 5}-{size + 9}"):
        status, headers, _ = await fetch(http, link, Range=rng)
        assert status == 416 and headers["Content-Range"] == f"bytes */{size}", rng
    for rng in ("bytes=0-1,5-6", "lines=1-2", "bytes=x-y", "bytes=20-10"):  # multi-range or invalid: all of it
        status, _, body = await fetch(http, link, Range=rng)
        assert status == 200 and body == data, rng
    status, headers, body = await fetch(http, link, Range="bytes=0-9", **{"If-Range": etag})
    assert status == 206 and body == data[:10]
    status, headers, body = await fetch(http, link, Range="bytes=0-9", **{"If-Range": '"another-version"'})
    assert status == 200 and body == data and "Content-Range" not in headers
    for inm in (etag, f'"a", W/{etag}', "*"):
        status, headers, body = await fetch(http, link, **{"If-None-Match": inm})
        assert status == 304 and body == b"" and headers["ETag"] == etag, inm
    status, _, body = await fetch(http, link, **{"If-None-Match": '"something-else"'})
    assert status == 200 and body == data
    status, headers, body = await fetch(http, link, "HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(size) and headers["ETag"] == etag
    status, headers, body = await fetch(http, link, "HEAD", Range="bytes=100-199")
    assert status == 206 and body == b"" and headers["Content-Length"] == "100"
    assert headers["Content-Range"] == f"bytes 100-199/{size}"
    status, _, body = await fetch(http, f"{gw.url}/api/v1/files/{info['id']}/content", Range="bytes=3-5",
                                  Authorization=f"Bearer {ADMIN}")
    assert status == 206 and body == data[3:6]  # the files API serves the same way


async def test_no_sidecar_is_read(gw, http):
    info, path = await stored(gw, SMALL, "photo.jpg")
    os.removexattr(path, META_XATTR)  # the catalog row has the type, size, digest and name
    assert not list((gw.app[STORAGE].backend.root / ".meta").rglob("*.json"))  # and there is no sidecar
    status, headers, body = await fetch(http, info["links"]["content"])
    assert status == 200 and body == SMALL and headers["Content-Type"] == "image/jpeg"
    assert Path(path).is_file()


async def test_a_symlink_in_place_of_the_object_is_not_followed(gw, http, tmp_path, caplog):
    info, path = await stored(gw, BIG, "x.bin")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web")
    os.unlink(path)
    os.symlink(secret, path)
    status, _, body = await fetch(http, info["links"]["content"])
    assert status == 503 and b"not for the web" not in body
    assert any("cannot open" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


async def test_an_object_gone_behind_the_catalogs_back_is_404(gw, http, caplog):
    for data in (BIG, SMALL):
        info, path = await stored(gw, data, "x.bin")
        os.unlink(path)
        status, _, body = await fetch(http, info["links"]["content"])
        assert status == 404 and b"missing" in body
    assert sum("points at a missing object" in r.getMessage() for r in caplog.records) == 2


async def test_a_hot_small_file_is_served_from_memory_while_it_is_the_object(gw, http):
    info, path = await stored(gw, SMALL, "photo.jpg")
    link, files = info["links"]["content"], gw.app[MEDIA_STORE].files
    assert (await fetch(http, link))[2] == SMALL and len(files) == 1  # kept open, with its bytes
    status, headers, body = await fetch(http, link, Range="bytes=100-199")  # a range of the kept bytes
    assert (status, body, headers["Content-Range"]) == (206, SMALL[100:200], f"bytes 100-199/{len(SMALL)}")
    changed = bytes(reversed(SMALL))  # same size; another file renamed over it (never done by the gateway)
    Path(path + ".new").write_bytes(changed)
    os.replace(path + ".new", path)
    assert (await fetch(http, link))[2] == changed  # the kept file was unlinked: opened again
    os.unlink(path)
    status, _, body = await fetch(http, link)
    assert status == 404 and b"missing" in body and len(files) == 0  # deleted: 404 at once, closed


async def test_hot_files_are_bounded_expire_and_are_closed(tmp_path):
    now = [0.0]
    files = HotFiles(count=2, size_limit=100, ttl=5.0, clock=lambda: now[0])
    fds = []
    for n in range(3):
        path = tmp_path / f"f{n}"
        path.write_bytes(bytes([n]) * 10)
        fd = os.open(path, os.O_RDONLY)
        fds.append(fd)
        assert files.keep(str(path), fd, os.fstat(fd), path.read_bytes())
    assert len(files) == 2 and files.get(str(tmp_path / "f0")) is None
    with pytest.raises(OSError):
        os.fstat(fds[0])  # the least recently used was closed
    assert files.get(str(tmp_path / "f1")) == b"\x01" * 10
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    fd = os.open(big, os.O_RDONLY)
    assert not files.keep(str(big), fd, os.fstat(fd), big.read_bytes())  # over size_limit: the caller's
    os.close(fd)
    now[0] = 5.0
    assert files.get(str(tmp_path / "f1")) is None and len(files) == 1  # expired on use
    files.close()
    assert len(files) == 0
    for fd in fds[1:]:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_hot_files_leave_most_descriptors_to_connections():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = HOT_FILES if soft == resource.RLIM_INFINITY else min(HOT_FILES, soft // 8)
    assert hot_files_for_limit() == HotFiles().count == expected
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit("
            "resource.RLIMIT_NOFILE)[1])); from gateway.store import HotFiles; print(HotFiles().count)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "32"  # an eighth of a 256 limit


async def test_hot_files_left_alone_are_closed_by_the_timer(tmp_path):
    files = HotFiles(ttl=0.05)
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    assert files.keep(str(path), fd, os.fstat(fd), b"abc")
    os.unlink(path)  # deleted while kept: its space must not stay held
    await asyncio.sleep(0.2)
    assert len(files) == 0
    with pytest.raises(OSError):
        os.fstat(fd)


async def test_deleted_through_the_api_is_404_at_once_though_it_was_served(gw, http):
    info, _ = await stored(gw, SMALL, "photo.jpg")
    public = (await call(gw, "PATCH", f"/files/{info['id']}", json={"is_public": True}))[1]["links"]["public"]
    for url in (info["links"]["content"], public):
        assert (await fetch(http, url))[0] == 200
    assert info["id"] in gw.app[MEDIA_STORE].rows._rows  # served from memory now
    assert (await call(gw, "DELETE", f"/files/{info['id']}"))[0] == 204
    for url in (info["links"]["content"], public):
        assert (await fetch(http, url))[0] == 404, url


async def test_patch_is_seen_at_once_though_the_row_was_served(gw, http):
    info, _ = await stored(gw, SMALL, "photo.jpg")
    public = (await call(gw, "PATCH", f"/files/{info['id']}", json={"is_public": True}))[1]["links"]["public"]
    assert (await fetch(http, public))[0] == 200
    assert (await call(gw, "PATCH", f"/files/{info['id']}", json={"is_public": False}))[0] == 200
    assert (await fetch(http, public))[0] == 404
    renamed = (await call(gw, "PATCH", f"/files/{info['id']}", json={"filename": "renamed.jpg"}))[1]
    status, headers, _ = await fetch(http, renamed["links"]["content"])
    assert status == 200 and "renamed.jpg" in headers["Content-Disposition"]


async def test_a_retention_delete_is_404_at_once_though_it_was_served(gw, http):
    info, path = await stored(gw, SMALL, "photo.jpg")
    assert (await fetch(http, info["links"]["content"]))[0] == 200
    retention = gw.app[RETENTION]
    retention.clock = lambda: time.time() + 400 * 86400  # past max_age_days
    report = await retention.run()
    assert report.objects == 1 and not Path(path).exists()
    status, _, body = await fetch(http, info["links"]["content"])
    assert status == 404 and b"no such media" in body


async def test_the_row_cache_sees_another_replicas_change_after_its_ttl(gw):
    info, _ = await stored(gw, SMALL, "photo.jpg")
    now = [1000.0]
    rows = MediaRows(gw.app[CATALOG], size=2, ttl=5.0, clock=lambda: now[0])
    assert (await rows.get(info["id"]))["state"] == "stored"
    # another replica claims it for deletion (the catalog is shared; this process is not told)
    assert await gw.app[CATALOG].claim_media_for_delete(info["id"], time.time()) is not None
    assert (await rows.get(info["id"]))["state"] == "stored"  # still fresh here
    now[0] += 5.0
    assert (await rows.get(info["id"]))["state"] == "deleting"
    await gw.app[CATALOG].forget_media([info["id"]])
    now[0] += 5.0
    assert await rows.get(info["id"]) is None
    assert await rows.get("no-such-id") is None


async def test_the_row_cache_is_bounded_and_keeps_no_row_read_across_a_change(gw):
    ids = [(await stored(gw, SMALL, f"p{n}.jpg"))[0]["id"] for n in range(3)]
    rows = MediaRows(gw.app[CATALOG], size=2, ttl=60.0)
    for media_id in ids:
        await rows.get(media_id)
    assert list(rows._rows) == ids[1:]  # the least recently used went
    await rows.get(ids[1])
    assert list(rows._rows) == [ids[2], ids[1]]
    rows.forget([ids[2]])
    assert list(rows._rows) == [ids[1]]
    lookup = asyncio.create_task(rows.get(ids[0]))
    await asyncio.sleep(0)  # it waits for the catalog now ...
    rows.forget([])  # ... when a change is made: what it read may be older, so it is not kept
    assert (await lookup)["id"] == ids[0] and ids[0] not in rows._rows


async def test_the_media_store_is_the_one_place_that_changes_rows(gw, http):
    info, _ = await stored(gw, SMALL, "photo.jpg")
    link = gw.app[LINKS].link(info["id"], info["filename"])
    assert (await fetch(http, link))[0] == 200
    await gw.app[MEDIA_STORE].update(info["id"], {"mimetype": "image/png"})
    assert (await fetch(http, link))[1]["Content-Type"] == "image/png"
