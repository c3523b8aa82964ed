"""What a bot developer trips on (issue 10): declared categories, exact time bounds, refused sends,
the gateway's own links, multipart part order, relay fallbacks, list filters, PATCH null, and what
an operator finds in the log. Real servers on 127.0.0.1: the gateway, the WAHA and Graph emulators."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import struct

import aiohttp
import pytest

from yarl import URL

from gateway.keys import CATALOG
from tests.conftest import MANIFEST, MEDIA, base_config, waha_payload
from tests.daemon import GatewayProcess, write_toml
from tests.test_files_api import KEYS, T1, T2, call, upload
from tests.test_outbound import PNID, api, file_server, graph, inbound_media_id  # noqa: F401 (graph: fixture)

BOT = "bot-key"
ALL_KEYS = [*KEYS, {"name": "bot", "key": BOT, "scopes": ["read", "write"]}]


@pytest.fixture
async def gw(start_gateway, graph):  # noqa: F811
    # no fetch.allow_networks: loopback counts as private here, as on a real host
    return await start_gateway(
        api={"keys": ALL_KEYS}, retention={"enabled": False},
        providers={"meta": {"access_token": graph.token, "graph_url": graph.base_url,
                            "download_hosts": ["127.0.0.1"], "phone_number_ids": [PNID]},
                   "waha": {"sessions": ["default"]}})


def send_body(**extra):
    return {"provider": "waha", "account": "default", "to": "1@c.us", "type": "image", **extra}


async def outbound_rows(gw) -> int:
    return await gw.count("media", "direction = 'outbound'")


# -- 10: the content decides the category --------------------------------------------------------

async def test_a_declared_category_never_overrides_the_content(gw):
    status, info = await upload(gw, T1, "not_really_an_image.jpg", category="image")
    assert status == 201, info
    assert info["category"] == "other" and not info["mimetype"].startswith("image/")
    status, page = await call(gw, "GET", "/files", T1, params={"category": "image"})
    assert page["items"] == []
    row = await gw.app[CATALOG].get_media(info["id"])
    extra = json.loads(row["extra"])
    assert extra["type_mismatch"] is True and extra["declared_category"] == "image"
    # a category that agrees with the content is simply accepted
    status, info = await upload(gw, T1, "customers.csv", category="document")
    assert status == 201 and info["category"] == "document"
    assert "declared_category" not in json.loads((await gw.app[CATALOG].get_media(info["id"]))["extra"] or "{}")


async def test_a_contradicting_category_is_refused_under_reject(start_gateway):
    gw = await start_gateway(api={"keys": KEYS}, media={"type_mismatch": "reject"})
    status, err = await upload(gw, T1, "not_really_an_image.jpg", category="image")
    assert status == 422 and "image" in err["error"]
    assert await gw.count("media") == 0 and gw.object_files() == []
    status, info = await upload(gw, T1, "photo.jpg", category="image")
    assert status == 201 and info["category"] == "image"


# -- 11: a file's own created_at is an exact bound -----------------------------------------------

async def test_created_at_bounds_are_exact(gw):
    info = (await upload(gw, T1, "photo.jpg"))[1]
    for bound in ("created_after", "created_before"):
        status, page = await call(gw, "GET", "/files", T1, params={bound: info["created_at"]})
        assert status == 200 and page["items"] == [], bound
    row = await gw.app[CATALOG].get_media(info["id"])
    assert row["created_at"] == round(row["created_at"], 6)  # stored at the precision it is shown


async def test_migration_3_takes_stored_times_to_whole_microseconds(tmp_path):
    import sqlite3

    from gateway.catalog import Catalog
    path = tmp_path / "gateway.db"
    catalog = Catalog(path)
    await catalog.open()
    await catalog.close()
    conn = sqlite3.connect(path)  # back to schema 2, with a row stored at the clock's full precision
    conn.execute("DROP INDEX idx_media_message_id")
    for undo in ("DROP INDEX idx_jobs_lane", "DROP INDEX idx_jobs_kind_run_at",  # migration 4
                 "ALTER TABLE jobs DROP COLUMN deadline"):
        conn.execute(undo)
    conn.execute("INSERT INTO media (id, sha256, size, mimetype, category, filename, backend, key, direction,"
                 " created_at, expires_at) VALUES ('m_1', '0', 1, 'image/jpeg', 'image', 'a.jpg', 'local', 'k',"
                 " 'upload', 1764500000.1234567, 1764600000.9999996)")
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()
    catalog = Catalog(path)
    await catalog.open()
    try:
        row = await catalog.get_media("m_1")
        assert (row["created_at"], row["expires_at"]) == (1764500000.123457, 1764600001.0)
        plan = await catalog.run(lambda db: db.conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM media WHERE message_id = 'x'").fetchall())
        assert "idx_media_message_id" in str(plan)
    finally:
        await catalog.close()


# -- 12: a refused send stores nothing -----------------------------------------------------------

async def test_a_send_the_provider_limits_refuse_leaves_no_copy(gw, waha, sink, graph):  # noqa: F811
    media_id = await inbound_media_id(gw, waha, sink, "screenshot.png")
    files_before = len(gw.object_files())
    status, answer = await api(gw, {"provider": "meta", "account": PNID, "to": "1", "type": "sticker",
                                    "media": {"id": media_id}}, key=BOT)
    assert status == 422 and "image/webp" in answer["error"]
    song = await inbound_media_id(gw, waha, sink, "song.mp3")
    status, answer = await api(gw, send_body(type="voice", media={"id": song}), key=BOT)
    assert status == 422 and "Opus" in answer["error"]
    form = aiohttp.FormData()
    for field, value in send_body(type="voice").items():
        form.add_field(field, value)
    form.add_field("file", (MEDIA / "song.mp3").read_bytes(), filename="song.mp3", content_type="audio/mpeg")
    status, answer = await api(gw, None, key=BOT, data=form)
    assert status == 422 and "Opus" in answer["error"]
    assert await outbound_rows(gw) == 0
    assert len(gw.object_files()) == files_before + 1  # the second inbound file only
    assert waha.sent == [] and graph.messages == []


async def test_a_send_the_provider_refuses_leaves_no_copy(gw, waha, sink):
    media_id = await inbound_media_id(gw, waha, sink, "photo.jpg")
    waha.send_error = (422, {"statusCode": 422, "message": "Session 'default' is not WORKING"})
    status, _ = await api(gw, send_body(media={"id": media_id}), key=BOT)
    assert status == 422 and await outbound_rows(gw) == 0 and len(gw.object_files()) == 1
    waha.send_error = (400, {"statusCode": 400, "message": "chatId is invalid"})  # through the relay
    data = base64.b64encode((MEDIA / "photo.jpg").read_bytes()).decode()
    async with gw.http.post(f"{gw.url}/waha/api/sendImage", headers={"X-Api-Key": waha.api_key},
                            json={"session": "default", "chatId": "x", "file": {"mimetype": "image/jpeg",
                                                                                "data": data}}) as r:
        assert r.status == 400
    assert await outbound_rows(gw) == 0 and len(gw.object_files()) == 1


# -- 13: the gateway's own links -----------------------------------------------------------------

async def test_sending_a_gateway_link_sends_the_stored_object(gw, waha, sink):
    url = waha.add_file(MEDIA / "photo.jpg")
    await gw.post_waha(waha_payload(url, message_id="in-link", filename="photo.jpg", mimetype="image/jpeg"))
    [delivery] = await sink.wait_for(1)
    link = delivery.json["payload"]["media"]["url"]
    assert link.startswith(gw.url)
    status, answer = await api(gw, send_body(media={"url": link}), key=BOT)
    assert status == 200, answer
    assert waha.sent[0]["sha256"] == MANIFEST["photo.jpg"]["sha256_hex"]
    row = await gw.app[CATALOG].get_media(answer["media"]["id"])
    assert row["direction"] == "outbound" and row["sha256"] == MANIFEST["photo.jpg"]["sha256_hex"]
    # a link of ours that is tampered with or expired is refused as such, not fetched
    bad = link.replace("sig=", "sig=A")
    status, answer = await api(gw, send_body(media={"url": bad}), key=BOT)
    assert status == 422 and "signature" in answer["error"], answer
    assert len(waha.sent) == 1
    # the stable link of a public file is ours too; of a file that is not public it is refused
    public = (await upload(gw, BOT, "sticker.webp", is_public="true"))[1]
    status, answer = await api(gw, send_body(type="sticker", media={"url": public["links"]["public"]}), key=BOT)
    assert status == 200 and waha.sent[-1]["sha256"] == MANIFEST["sticker.webp"]["sha256_hex"]
    private = (await upload(gw, BOT, "sticker.webp"))[1]
    not_public = public["links"]["public"].replace(public["id"], private["id"])
    status, answer = await api(gw, send_body(type="sticker", media={"url": not_public}), key=BOT)
    assert status == 422 and "not public" in answer["error"]
    # from-url with a link of ours copies the object as an upload
    status, info = await call(gw, "POST", "/files/from-url", BOT, json={"url": link})
    assert status == 201 and info["direction"] == "upload" and info["sha256"] == MANIFEST["photo.jpg"]["sha256_hex"]


def test_own_link_recognises_only_this_gateways_links():
    from gateway.links import LinkError, LinkSigner
    signer = LinkSigner(b"secret", "https://gw.example.com/base/", ttl=60)
    link = signer.link("m_1", "a b.jpg", now=1000)
    assert signer.own_link(link, now=1000) == ("m_1", "a b.jpg", True)
    assert signer.own_link("https://gw.example.com/base/public/m_1/x.jpg") == ("m_1", "x.jpg", False)
    for other in (link.replace("gw.example.com", "evil.example.com"), link.replace("https:", "http:"),
                  link.replace("/base/", "/other/"), "https://gw.example.com/base/media/m_1",
                  "https://gw.example.com/base/healthz", "not a url at all", "http://[::1"):
        assert signer.own_link(other, now=1000) is None, other
    with pytest.raises(LinkError, match="expired"):
        signer.own_link(link, now=2000)
    with pytest.raises(LinkError, match="signature"):
        signer.own_link(link.replace("m_1", "m_2"), now=1000)


# -- 14: multipart part order --------------------------------------------------------------------

async def test_an_upload_with_fields_after_the_file_is_refused_plainly(gw):
    form = aiohttp.FormData()
    form.add_field("file", (MEDIA / "photo.jpg").read_bytes(), filename="photo.jpg", content_type="image/jpeg")
    form.add_field("metadata", json.dumps({"order": 1}))
    status, err = await call(gw, "POST", "/files", T1, data=form)
    assert status == 422 and "metadata" in err["error"] and "before the 'file' part" in err["error"], err
    assert await gw.count("media") == 0 and gw.object_files() == []


async def test_a_send_with_the_file_first_is_refused_plainly(gw, waha):
    form = aiohttp.FormData()
    form.add_field("file", (MEDIA / "photo.jpg").read_bytes(), filename="photo.jpg", content_type="image/jpeg")
    for field, value in send_body().items():
        form.add_field(field, value)
    status, err = await api(gw, None, key=BOT, data=form)
    assert status == 422 and "before the 'file' part" in err["error"], err
    # fields before the file, and one more after it: also refused, nothing stored or sent
    form = aiohttp.FormData()
    for field, value in send_body().items():
        form.add_field(field, value)
    form.add_field("file", (MEDIA / "photo.jpg").read_bytes(), filename="photo.jpg", content_type="image/jpeg")
    form.add_field("caption", "late")
    status, err = await api(gw, None, key=BOT, data=form)
    assert status == 422 and "caption" in err["error"] and "before the 'file' part" in err["error"], err
    assert await gw.count("media") == 0 and waha.sent == []


# -- 15: the relay says when it fell back --------------------------------------------------------

async def test_the_relay_fallback_is_announced_in_a_header(gw, waha, graph, aiohttp_server):  # noqa: F811
    private = await file_server(aiohttp_server)  # loopback: this gateway refuses to fetch it, the providers can
    body = {"session": "default", "chatId": "5@c.us",
            "file": {"mimetype": "image/jpeg", "filename": "photo.jpg", "url": f"{private}/photo.jpg"}}
    async with gw.http.post(f"{gw.url}/waha/api/sendImage", json=body, headers={"X-Api-Key": waha.api_key}) as r:
        assert r.status == 201
        assert "not public" in r.headers["X-Gateway-Relay-Fallback"]
    assert waha.sent[0]["file"]["url"] == f"{private}/photo.jpg"
    body = {"messaging_product": "whatsapp", "to": "16505551234", "type": "image",
            "image": {"link": f"{private}/photo.jpg"}}
    async with gw.http.post(f"{gw.url}/meta/v23.0/{PNID}/messages", json=body,
                            headers={"Authorization": "Bearer graph-token"}) as r:
        assert r.status == 200 and "not public" in r.headers["X-Gateway-Relay-Fallback"]
    data = base64.b64encode((MEDIA / "photo.jpg").read_bytes()).decode()
    async with gw.http.post(f"{gw.url}/waha/api/sendImage", headers={"X-Api-Key": waha.api_key},
                            json={"session": "default", "chatId": "5@c.us",
                                  "file": {"mimetype": "image/jpeg", "data": data}}) as r:
        assert r.status == 201 and "X-Gateway-Relay-Fallback" not in r.headers  # stored: no fallback


# -- 16: list by direction and message id --------------------------------------------------------

async def test_list_by_direction_and_message_id(gw, waha, sink):
    inbound = await inbound_media_id(gw, waha, sink, "photo.jpg")
    uploaded = (await upload(gw, BOT, "invoice.pdf"))[1]["id"]
    status, sent = await api(gw, send_body(media={"id": inbound}), key=BOT)
    assert status == 200

    async def ids(**params):
        status, page = await call(gw, "GET", "/files", BOT, params=params)
        assert status == 200, page
        return [i["id"] for i in page["items"]]

    assert await ids(direction="inbound") == [inbound]
    assert await ids(direction="upload") == [uploaded]
    assert await ids(direction="outbound") == [sent["media"]["id"]]
    assert await ids(message_id=sent["provider_message_id"]) == [sent["media"]["id"]]
    assert await ids(message_id="in-photo.jpg") == [inbound]
    status, err = await call(gw, "GET", "/files", BOT, params={"direction": "sideways"})
    assert status == 422 and err["error"].startswith("direction")


# -- 17: PATCH null ------------------------------------------------------------------------------

async def test_patch_null_resets_to_the_default(gw):
    info = (await upload(gw, T2, "photo.jpg", metadata={"a": 1}, is_public="true",
                         expires_at="2099-01-01T00:00:00Z"))[1]
    path = f"/files/{info['id']}"
    status, changed = await call(gw, "PATCH", path, T2, json={"is_public": None, "metadata": None,
                                                               "expires_at": None})
    assert status == 200, changed
    assert changed["is_public"] is False and changed["metadata"] == {} and changed["expires_at"] is None
    status, err = await call(gw, "PATCH", path, T2, json={"filename": None})
    assert status == 422 and err["error"].startswith("filename"), err


# -- 18: the log -----------------------------------------------------------------------------------

async def test_a_client_hanging_up_mid_download_is_one_info_line(tmp_path, waha, sink, unused_tcp_port):
    # the daemon as a subprocess: the in-process test server cancels handlers on a hang-up, the
    # daemon (web.run_app) lets the write fail, which is what players and Range probes cause
    big = tmp_path / "big.mp4"
    big.write_bytes((MEDIA / "clip.mp4").read_bytes() * 40)  # 16 MB: more than the socket buffers hold
    daemon = GatewayProcess(write_toml(tmp_path / "gateway.toml", base_config(tmp_path, unused_tcp_port, waha, sink)),
                            unused_tcp_port, tmp_path / "daemon.log")
    await daemon.start()
    try:
        body = json.dumps(waha_payload(waha.add_file(big), message_id="big", filename="big.mp4"))
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{daemon.url}/webhooks/waha", data=body) as r:
                assert r.status == 200
        [delivery] = await sink.wait_for(1, timeout=30)
        link = URL(delivery.json["payload"]["media"]["url"])
        media_id = delivery.json["payload"]["media"]["gateway"]["id"]
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", unused_tcp_port)
            writer.write(f"GET {link.raw_path_qs} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\n".encode())
            await writer.drain()
            await reader.readexactly(65536)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            writer.close()
        for _ in range(250):
            if daemon.log_tail(1000).count("hung up") == 3:
                break
            await asyncio.sleep(0.02)
    finally:
        await daemon.terminate()
    log = daemon.log_tail(1000)
    assert "Traceback" not in log and " ERROR " not in log, log
    lines = [line for line in log.splitlines() if "hung up" in line]
    assert len(lines) == 3 and all(" INFO " in line and f"media_id={media_id}" in line for line in lines), log


async def test_refused_webhooks_and_fetches_are_logged(start_gateway, caplog):
    gw = await start_gateway(api={"keys": KEYS}, providers={"waha": {"hmac_key": "k"}})
    caplog.set_level(logging.DEBUG)
    response = await gw.post_waha({"event": "message", "session": "default", "payload": {}})
    assert response.status == 401
    [line] = [r for r in caplog.records if "webhook refused" in r.getMessage()]
    assert line.levelno == logging.WARNING and not line.exc_info
    status, _ = await call(gw, "POST", "/files/from-url", T1, json={"url": "http://10.0.0.1/x.jpg"})
    assert status == 422
    [line] = [r for r in caplog.records if "refused" in r.getMessage() and "10.0.0.1" in r.getMessage()]
    assert line.levelno == logging.WARNING and not line.exc_info
    async with gw.http.post(f"{gw.url}/waha/api/sendImage", json={}, headers={"X-Api-Key": "wrong"}) as r:
        assert r.status == 401
    [line] = [r for r in caplog.records if "relay" in r.getMessage() and "refused" in r.getMessage()]
    assert line.levelno == logging.WARNING and "X-Api-Key" in line.getMessage()


# -- 20: a retried job is answered as the retry left it -------------------------------------------

async def test_retry_answers_the_job_as_the_retry_left_it(tmp_path):
    # POST /jobs/{id}/retry answered a fresh read of the job, after waking the workers: one that
    # claimed it first made the answer say "running, attempts 1" (test_jobs failed that way)
    from gateway.catalog import Catalog
    catalog = Catalog(tmp_path / "gateway.db")
    await catalog.open()
    try:
        await catalog.enqueue("deliver", "k", {"event_id": "e"})
        job = await catalog.claim_job()
        await catalog.fail_job(job["id"], "400", None)
        retried = await catalog.retry_dead_job(job["id"])
        assert await catalog.claim_job() is not None  # a worker takes it at once
        assert (retried["state"], retried["attempts"], retried["payload"]) == ("queued", 0, {"event_id": "e"})
        assert await catalog.retry_dead_job(job["id"]) is None  # not dead any more
    finally:
        await catalog.close()
