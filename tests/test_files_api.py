"""The file-management API under /api/v1: upload, from-url, list, get, patch, delete, content, link,
stats, jobs, live events; tenant isolation; hostile filenames; upload-from-URL refusals."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid

import aiohttp
import pytest
from aiohttp import web

from gateway.keys import CATALOG, STORAGE
from gateway.sdk.storage import ObjectNotFound
from tests.conftest import MANIFEST, MEDIA

ADMIN, T1, T2, T1_READ = "admin-key", "tenant-one-key", "tenant-two-key", "tenant-one-reader"
KEYS = [{"name": "admin", "key": ADMIN, "scopes": ["admin"]},
        {"name": "t1", "key": T1, "scopes": ["read", "write"], "tenant": "t1"},
        {"name": "t2", "key": T2, "scopes": ["read", "write"], "tenant": "t2"},
        {"name": "t1-reader", "key": T1_READ, "scopes": ["read"], "tenant": "t1"}]


@pytest.fixture
async def gw(start_gateway):
    return await start_gateway(api={"keys": KEYS}, fetch={"allow_networks": ["127.0.0.0/8"]},
                               retention={"enabled": False})


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def call(gw, method: str, path: str, key: str | None = ADMIN, **kwargs):
    headers = {**auth(key), **kwargs.pop("headers", {})}
    async with gw.http.request(method, f"{gw.url}/api/v1{path}", headers=headers, **kwargs) as r:
        body = await r.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = body
        return r.status, data


async def upload(gw, key: str, name: str = "photo.jpg", data: bytes | None = None, filename: str | None = None,
                 content_type: str = "application/octet-stream", **fields):
    form = aiohttp.FormData()
    for field, value in fields.items():
        form.add_field(field, value if isinstance(value, str) else json.dumps(value))
    form.add_field("file", data if data is not None else (MEDIA / name).read_bytes(),
                   filename=filename or name, content_type=content_type)
    return await call(gw, "POST", "/files", key, data=form)


# -- upload ----------------------------------------------------------------------------------------

async def test_upload_get_content_and_fields(gw, http):
    status, info = await upload(gw, T1, "invoice.pdf", metadata={"order": 42}, is_public="true",
                                expires_at="2099-01-01T00:00:00Z", content_type="application/pdf")
    assert status == 201, info
    assert info["sha256"] == MANIFEST["invoice.pdf"]["sha256_hex"] and info["size"] == MANIFEST["invoice.pdf"]["size"]
    assert (info["category"], info["mimetype"], info["tenant"]) == ("document", "application/pdf", "t1")
    assert info["metadata"] == {"order": 42} and info["is_public"] is True
    assert info["expires_at"].startswith("2099-01-01T00:00:00") and info["direction"] == "upload"
    assert (await call(gw, "GET", f"/files/{info['id']}", T1))[1] == info
    status, body = await call(gw, "GET", f"/files/{info['id']}/content", T1)
    assert status == 200 and hashlib.sha256(body).hexdigest() == info["sha256"]
    async with http.get(info["links"]["content"]) as r:  # the signed link works without a key
        assert r.status == 200
    async with http.get(info["links"]["public"]) as r:  # and so does the stable public one
        assert r.status == 200 and hashlib.sha256(await r.read()).hexdigest() == info["sha256"]


async def test_upload_errors(gw):
    assert (await upload(gw, None))[0] == 401
    assert (await upload(gw, "wrong"))[0] == 401
    assert (await upload(gw, T1_READ))[0] == 403
    status, err = await upload(gw, T1, metadata="{not json")
    assert status == 422 and err["error"].startswith("metadata")
    status, err = await upload(gw, T1, colour="red")
    assert status == 422 and "colour" in err["error"]
    status, err = await upload(gw, T1, category="pictures")
    assert status == 422 and err["error"].startswith("category")
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("metadata", "{}")
    status, err = await call(gw, "POST", "/files", T1, data=form)
    assert status == 422 and "file" in err["error"]
    status, _ = await call(gw, "POST", "/files", T1, json={"file": "x"})
    assert status == 415
    assert await gw.count("media") == 0


async def test_upload_over_the_limit(start_gateway):
    gw = await start_gateway(api={"keys": KEYS}, media={"max_bytes": 100_000})
    big = b"\0" * 1_300_000  # over max_bytes + 1 MiB of multipart slack: refused before reading
    status, err = await upload(gw, T1, data=big, filename="big.bin")
    assert status == 413
    # without a Content-Length, the limit stops the stream at the byte that crosses it

    async def chunked():
        yield b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.bin\"\r\n\r\n"
        for _ in range(30):
            yield b"\1" * 10_000
        yield b"\r\n--B--\r\n"
    status, err = await call(gw, "POST", "/files", T1, data=chunked(),
                             headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert status == 413 and "100000" in err["error"]
    assert await gw.count("media") == 0 and gw.stored_files() == []


async def test_declared_category_and_type_sniffing(gw):
    status, info = await upload(gw, T1, "not_really_an_image.jpg", content_type="image/jpeg")
    assert status == 201 and info["category"] == "other" and not info["mimetype"].startswith("image/")
    status, info = await upload(gw, T1, "customers.csv", category="other")  # the content decides
    assert status == 201 and info["category"] == "document" and info["mimetype"] == "text/csv"


# -- from-url --------------------------------------------------------------------------------------

async def file_server(aiohttp_server, host: str = "127.0.0.1", redirect_to: str | None = None):
    hits: list[str] = []
    app = web.Application()

    async def serve(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        if redirect_to:
            raise web.HTTPFound(redirect_to)
        return web.FileResponse(MEDIA / request.match_info["name"])
    app.router.add_get("/{name}", serve)
    server = await aiohttp_server(app, host=host)
    return str(server.make_url("")).rstrip("/"), hits


async def test_from_url(gw, aiohttp_server):
    base, hits = await file_server(aiohttp_server)
    status, info = await call(gw, "POST", "/files/from-url", T2,
                              json={"url": f"{base}/song.mp3", "metadata": {"a": 1}})
    assert status == 201 and info["sha256"] == MANIFEST["song.mp3"]["sha256_hex"]
    assert info["filename"] == "song.mp3" and info["tenant"] == "t2" and info["metadata"] == {"a": 1}
    status, err = await call(gw, "POST", "/files/from-url", T2, json={"url": f"{base}/nope.mp3"})
    assert status == 502
    assert (await call(gw, "POST", "/files/from-url", T2, json={"link": "x"}))[0] == 422


async def test_from_url_refusals(start_gateway, aiohttp_server):
    # only 127.0.0.2 is allowed: it plays the public host that redirects into the private range
    gw = await start_gateway(api={"keys": KEYS}, fetch={"allow_networks": ["127.0.0.2/32"]})
    private, private_hits = await file_server(aiohttp_server)
    port = private.rsplit(":", 1)[1]
    public, public_hits = await file_server(aiohttp_server, host="127.0.0.2",
                                            redirect_to=f"{private}/photo.jpg")
    for url in (f"{private}/photo.jpg", f"http://[::1]:{port}/photo.jpg", "http://10.0.0.1/photo.jpg",
                "http://169.254.169.254/latest/meta-data/", f"http://localhost:{port}/photo.jpg",
                f"{public}/photo.jpg", "ftp://example.com/photo.jpg", "file:///etc/passwd"):
        status, err = await call(gw, "POST", "/files/from-url", T1, json={"url": url})
        assert status == 422, (url, err)
    assert private_hits == []  # nothing private was ever fetched
    assert public_hits == ["/photo.jpg"]  # the allowed host was asked, its redirect refused
    assert await gw.count("media") == 0


# -- list and pagination --------------------------------------------------------------------------

async def test_list_filters_and_sorting(gw):
    ids = {}
    for name, key in (("photo.jpg", T1), ("screenshot.png", T1), ("clip.mp4", T1), ("invoice.pdf", T2)):
        ids[name] = (await upload(gw, key, name))[1]["id"]
        await asyncio.sleep(0.002)
    await call(gw, "PATCH", f"/files/{ids['clip.mp4']}", T1, json={"is_public": True})

    async def names(key=ADMIN, **params):
        status, page = await call(gw, "GET", "/files", key, params=params)
        assert status == 200, page
        return [i["filename"] for i in page["items"]]

    assert await names() == ["invoice.pdf", "clip.mp4", "screenshot.png", "photo.jpg"]
    assert await names(order="asc") == ["photo.jpg", "screenshot.png", "clip.mp4", "invoice.pdf"]
    assert await names(sort="size", order="desc") == ["clip.mp4", "screenshot.png", "photo.jpg", "invoice.pdf"]
    assert await names(category="image") == ["screenshot.png", "photo.jpg"]
    assert await names(mime="image/p") == ["screenshot.png"]
    assert await names(filename="SHOT") == ["screenshot.png"]
    assert await names(is_public="true") == ["clip.mp4"]
    assert await names(tenant="t2") == ["invoice.pdf"]
    assert await names(provider="api", limit="2") == ["invoice.pdf", "clip.mp4"]
    assert await names(created_after="2000-01-01T00:00:00Z", created_before=str(time.time() + 60)) == \
        ["invoice.pdf", "clip.mp4", "screenshot.png", "photo.jpg"]
    assert await names(created_after=str(time.time() + 60)) == []
    for bad in ({"limit": "1001"}, {"limit": "0"}, {"sort": "name"}, {"cursor": "garbage"},
                {"created_after": "yesterday"}, {"colour": "red"}, {"category": "pictures"}):
        status, err = await call(gw, "GET", "/files", ADMIN, params=bad)
        assert status == 422, (bad, err)


async def _insert_rows(gw, count: int, start: float, tenant: str = "t1") -> list[str]:
    ids = [f"m_{uuid.uuid4().hex}" for _ in range(count)]

    def insert(db):
        db["media"].insert_all(
            [{"id": media_id, "sha256": "0" * 64, "size": (n * 7919) % 1000, "mimetype": "image/jpeg",
              "category": "image", "filename": f"{media_id}.jpg", "backend": "local", "key": f"x/{media_id}.jpg",
              "direction": "upload", "created_at": start + n * 0.001, "tenant": tenant, "provider": "api",
              "state": "stored"} for n, media_id in enumerate(ids)])
    await gw.app[CATALOG].run(insert)
    return ids


@pytest.mark.parametrize("sort,order", [("created_at", "desc"), ("size", "asc")])
async def test_pagination_over_2500_objects_with_inserts_between_pages(gw, sort, order):
    original = set(await _insert_rows(gw, 2500, start=1_700_000_000))
    seen: list[str] = []
    cursor, pages, inserted = None, 0, 0
    while True:
        params = {"sort": sort, "order": order, "limit": "100"}
        if cursor:
            params["cursor"] = cursor
        status, page = await call(gw, "GET", "/files", T1, params=params)
        assert status == 200, page
        seen.extend(i["id"] for i in page["items"])
        cursor, pages = page["next_cursor"], pages + 1
        if not cursor:
            break
        await _insert_rows(gw, 7, start=time.time() + pages)  # newcomers while paging
        inserted += 7
    assert len(seen) == len(set(seen)), "an object came twice"
    assert original <= set(seen), f"{len(original - set(seen))} objects skipped"
    assert pages >= 25 and inserted > 0


# -- get, patch, delete, link ----------------------------------------------------------------------

async def test_patch_and_delete(gw):
    info = (await upload(gw, T1, "photo.jpg"))[1]
    path = f"/files/{info['id']}"
    status, changed = await call(gw, "PATCH", path, T1, json={"filename": "../holiday.jpg", "metadata": {"k": "v"},
                                                               "expires_at": 4102444800})
    assert status == 200
    assert changed["filename"] == "holiday.jpg" and changed["metadata"] == {"k": "v"}
    assert changed["expires_at"].startswith("2100-01-01")
    status, cleared = await call(gw, "PATCH", path, T1, json={"expires_at": None})
    assert status == 200 and cleared["expires_at"] is None
    for bad in ({}, {"size": 1}, {"filename": ""}, {"expires_at": "soon"}):
        assert (await call(gw, "PATCH", path, T1, json=bad))[0] == 422, bad
    assert (await call(gw, "PATCH", path, T1_READ, json={"is_public": True}))[0] == 403
    record = await gw.app[CATALOG].get_media(info["id"])
    assert (await call(gw, "DELETE", path, T1))[0] == 204
    with pytest.raises(ObjectNotFound):  # the object went first, then the row
        await gw.app[STORAGE].stat(record["key"])
    assert await gw.app[CATALOG].get_media(info["id"]) is None
    assert (await call(gw, "DELETE", path, T1))[0] == 404
    assert (await call(gw, "GET", f"{path}/content", T1))[0] == 404


async def test_links(gw, http):
    info = (await upload(gw, T1, "photo.jpg"))[1]
    status, link = await call(gw, "GET", f"/files/{info['id']}/link", T1, params={"expires": "60"})
    assert status == 200 and link["direct"] is False
    async with http.get(link["url"]) as r:
        assert r.status == 200
    assert (await call(gw, "GET", f"/files/{info['id']}/link", T1, params={"expires": "0"}))[0] == 422
    assert (await call(gw, "GET", f"/files/{info['id']}/link", T1, params={"expires": "x"}))[0] == 422
    assert (await call(gw, "GET", f"/files/{info['id']}/link", T1, params={"direct": "true"}))[0] == 409
    async with http.get(f"{gw.url}/public/{info['id']}/{info['filename']}") as r:
        assert r.status == 404  # not public


async def test_direct_link_on_s3(start_gateway, s3_server, http):
    from tests.conftest import s3_config
    gw = await start_gateway(api={"keys": KEYS}, storage={"backend": "s3", "s3": s3_config(s3_server)})
    info = (await upload(gw, T1, "photo.jpg"))[1]
    status, link = await call(gw, "GET", f"/files/{info['id']}/link", T1, params={"direct": "true"})
    assert status == 200 and link["direct"] is True and link["url"].startswith(s3_server.url)
    async with http.get(link["url"]) as r:
        assert hashlib.sha256(await r.read()).hexdigest() == MANIFEST["photo.jpg"]["sha256_hex"]


async def test_stats_and_categories(gw):
    await upload(gw, T1, "photo.jpg")
    await upload(gw, T1, "song.mp3")
    await upload(gw, T2, "clip.mp4")
    status, stats = await call(gw, "GET", "/files/stats", T1)
    assert status == 200
    assert stats["total"] == {"count": 2, "bytes": MANIFEST["photo.jpg"]["size"] + MANIFEST["song.mp3"]["size"]}
    assert stats["by_category"] == {"audio": {"count": 1, "bytes": MANIFEST["song.mp3"]["size"]},
                                    "image": {"count": 1, "bytes": MANIFEST["photo.jpg"]["size"]}}
    assert stats["by_provider"] == {"api": stats["total"]} and stats["by_backend"] == {"local": stats["total"]}
    status, all_stats = await call(gw, "GET", "/files/stats", ADMIN)
    assert all_stats["total"]["count"] == 3
    status, cats = await call(gw, "GET", "/files/categories", T2)
    assert [c["name"] for c in cats["categories"]] == ["image", "video", "audio", "document", "other"]
    assert {c["name"]: c["count"] for c in cats["categories"]}["video"] == 1


# -- jobs ------------------------------------------------------------------------------------------

async def test_jobs_are_listed_a_page_at_a_time_with_a_cursor(start_gateway):
    gw = await start_gateway(api={"keys": KEYS})
    catalog = gw.app[CATALOG]
    for i in range(5):  # no such target: each ends dead at once; the listing's order is by id, whatever the state
        await catalog.enqueue("deliver", f"deliver:ev_{i}:gone", {"event_id": f"ev_{i}", "target": "gone"})
    every = [j["id"] for j in await catalog.list_jobs(newest_first=True)]
    assert len(every) == 5
    pages, cursor = [], None
    while True:
        status, page = await call(gw, "GET", "/jobs", ADMIN,
                                  params={"limit": "2", **({"cursor": cursor} if cursor else {})})
        assert status == 200
        pages.append([j["id"] for j in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [every[0:2], every[2:4], every[4:5]]
    status, whole = await call(gw, "GET", "/jobs", ADMIN, params={"limit": "5"})
    assert [j["id"] for j in whole["items"]] == every and whole["next_cursor"] is None  # no empty last page
    for bad in ("abc", "-1", "1.5", str(2 ** 63), "9" * 40, "\u0661"):
        status, answer = await call(gw, "GET", "/jobs", ADMIN, params={"cursor": bad})
        assert status == 422 and answer["error"].startswith("cursor:"), bad


async def test_jobs(start_gateway, waha, aiohttp_server):
    refusing = web.Application()

    async def refuse(request):
        return web.json_response({"error": "no"}, status=400)
    async def accept(request):
        return web.json_response({"ok": True})
    refusing.router.add_post("/hook", refuse)
    refusing.router.add_post("/ok", accept)
    server = await aiohttp_server(refusing, host="127.0.0.1")
    gw = await start_gateway(api={"keys": KEYS}, targets=[{"name": "strict", "url": str(server.make_url("/hook"))},
                                                         {"name": "easy", "url": str(server.make_url("/ok"))}])
    await gw.post_waha({"event": "session.status", "session": "default", "payload": {"status": "WORKING"}})
    dead = None
    for _ in range(100):
        status, jobs = await call(gw, "GET", "/jobs", ADMIN, params={"state": "dead"})
        if jobs["items"]:
            dead = jobs["items"][0]
            break
        await asyncio.sleep(0.05)
    assert dead and dead["kind"] == "deliver" and "400" in dead["last_error"]
    assert (await call(gw, "GET", f"/jobs/{dead['id']}", ADMIN))[1]["state"] == "dead"
    status, jobs = await call(gw, "GET", "/jobs", ADMIN, params={"kind": "ingest"})
    assert status == 200 and jobs["items"] == []  # an event without media has nothing to fetch: no ingest job
    for _ in range(100):
        status, jobs = await call(gw, "GET", "/jobs", ADMIN, params={"state": "done"})
        if jobs["items"]:
            break
        await asyncio.sleep(0.05)
    assert [(j["kind"], j["key"].rsplit(":", 1)[1]) for j in jobs["items"]] == [("deliver", "easy")]
    status, retried = await call(gw, "POST", f"/jobs/{dead['id']}/retry", ADMIN)
    assert status == 200 and retried["attempts"] == 0
    assert (await call(gw, "POST", f"/jobs/{jobs['items'][0]['id']}/retry", ADMIN))[0] == 409
    assert (await call(gw, "GET", "/jobs/999999", ADMIN))[0] == 404
    assert (await call(gw, "GET", "/jobs/abc", ADMIN))[0] == 404
    assert (await call(gw, "GET", "/jobs", ADMIN, params={"state": "sleeping"}))[0] == 422
    assert (await call(gw, "GET", "/jobs", T1))[0] == 403
    assert (await call(gw, "GET", "/jobs", None))[0] == 401


# -- tenants ---------------------------------------------------------------------------------------

async def test_tenant_isolation_matrix(gw):
    mine = (await upload(gw, T1, "photo.jpg"))[1]["id"]
    theirs = (await upload(gw, T2, "song.mp3"))[1]["id"]
    for method, path, kwargs in (
        ("GET", f"/files/{theirs}", {}),
        ("PATCH", f"/files/{theirs}", {"json": {"is_public": True}}),
        ("DELETE", f"/files/{theirs}", {}),
        ("GET", f"/files/{theirs}/content", {}),
        ("GET", f"/files/{theirs}/link", {}),
    ):
        assert (await call(gw, method, path, T1, **kwargs))[0] == 404, (method, path)
        assert (await call(gw, method, path.replace(theirs, "m_nothing_here"), T1, **kwargs))[0] == 404
    status, page = await call(gw, "GET", "/files", T1, params={"tenant": "t2"})
    assert status == 200 and page["items"] == []
    assert [i["id"] for i in (await call(gw, "GET", "/files", T1))[1]["items"]] == [mine]
    assert (await call(gw, "GET", "/files/stats", T1))[1]["total"]["count"] == 1
    body = {"provider": "waha", "account": "default", "to": "1@c.us", "type": "audio", "media": {"id": theirs}}
    assert (await call(gw, "POST", "/messages", T1, json=body))[0] == 404
    # the other tenant's object is untouched, and an admin key sees both
    assert (await call(gw, "GET", f"/files/{theirs}", T2))[0] == 200
    assert {i["id"] for i in (await call(gw, "GET", "/files", ADMIN))[1]["items"]} == {mine, theirs}


async def test_events_websocket(gw):
    async with gw.http.ws_connect(f"{gw.url}/api/v1/events", headers=auth(T1_READ)) as ws_t1, \
            gw.http.ws_connect(f"{gw.url}/api/v1/events", headers=auth(T2)) as ws_t2:
        await asyncio.sleep(0.05)
        other = (await upload(gw, T2, "song.mp3"))[1]
        info = (await upload(gw, T1, "photo.jpg"))[1]
        await call(gw, "PATCH", f"/files/{info['id']}", T1, json={"metadata": {"x": 1}})
        await call(gw, "DELETE", f"/files/{info['id']}", T1)
        notices = [await asyncio.wait_for(ws_t1.receive_json(), 5) for _ in range(3)]
        assert [(n["type"], n["file"]["id"]) for n in notices] == [
            ("created", info["id"]), ("updated", info["id"]), ("deleted", info["id"])]
        assert notices[1]["file"]["metadata"] == {"x": 1}
        first = await asyncio.wait_for(ws_t2.receive_json(), 5)
        assert (first["type"], first["file"]["id"]) == ("created", other["id"])  # t1's never reached t2
    async with gw.http.get(f"{gw.url}/api/v1/events") as r:
        assert r.status == 401


# -- hostile filenames -----------------------------------------------------------------------------

HOSTILE = ["../../etc/passwd", "evil\x00.jpg.exe", "dir/sub/file.jpg", "x" * 300 + ".jpg",
           "invoice\u202egpj.exe", 'quote" \r\nX-Injected: 1.jpg']


def assert_safe(stored: str) -> None:
    assert "/" not in stored and "\\" not in stored and "\x00" not in stored and "\u202e" not in stored
    assert "\r" not in stored and "\n" not in stored and len(stored) <= 150 and stored not in ("", ".", "..")


async def assert_served_safely(gw, info) -> None:
    record = await gw.app[CATALOG].get_media(info["id"])
    assert record["key"].startswith("api/") and ".." not in record["key"]  # no user text in object keys
    assert all(p.resolve().is_relative_to(gw.media_root.resolve()) for p in gw.stored_files())
    async with gw.http.get(f"{gw.url}/api/v1/files/{info['id']}/content", headers=auth(T1)) as r:
        disposition = r.headers["Content-Disposition"]
        assert r.status == 200 and "X-Injected" not in r.headers
    assert "\r" not in disposition and "\n" not in disposition and "/" not in disposition.split("filename*")[0]
    assert disposition.count('"') == 2  # the quoted fallback name is closed, nothing breaks out


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_filenames_by_upload(gw, name):
    boundary = "BOUNDARY"
    raw_name = name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{raw_name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode("utf-8") + (MEDIA / "photo.jpg").read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    status, info = await call(gw, "POST", "/files", T1, data=body,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    if "\x00" in name:  # a NUL in a multipart header is malformed HTTP: a clear 400, nothing stored
        assert status == 400 and "malformed" in info["error"]
        assert await gw.count("media") == 0
        return
    assert status == 201, info
    assert_safe(info["filename"])
    await assert_served_safely(gw, info)


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_filenames_by_patch(gw, name):
    info = (await upload(gw, T1, "photo.jpg"))[1]
    status, changed = await call(gw, "PATCH", f"/files/{info['id']}", T1, json={"filename": name})
    assert status == 200, changed
    assert_safe(changed["filename"])
    await assert_served_safely(gw, changed)


async def test_metrics_can_require_a_key(start_gateway, http):
    gw = await start_gateway(api={"keys": KEYS, "metrics_key": True})
    async with http.get(f"{gw.url}/metrics") as r:
        assert r.status == 401
    async with http.get(f"{gw.url}/metrics", headers=auth(T1_READ)) as r:
        assert r.status == 200 and "gateway_build_info" in await r.text()
