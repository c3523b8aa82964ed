"""The main job end to end: WAHA webhook -> media fetched from the emulator -> stored on local
disk -> rewritten payload forwarded to the bot sink -> the link serves the same bytes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from urllib.parse import urlsplit

import pytest

from gateway.ingest import Arrivals
from gateway.keys import CATALOG, INGESTOR, LINKS
from tests.conftest import MANIFEST, MEDIA, waha_payload, waha_hmac


def _declared(name: str) -> tuple[str, str]:
    """(declared mimetype, payload template) as WAHA would send the file."""
    info = MANIFEST[name]
    if name == "not_really_an_image.jpg":  # an executable a sender labelled as a photo
        return "image/jpeg", "message_image.json"
    mime = "audio/ogg; codecs=opus" if name == "voice.ogg" else info["mime"]
    return mime, ("message_image.json" if info["category"] == "image" else "message_document.json")


@pytest.mark.parametrize("name", sorted(MANIFEST))
async def test_every_fixture_file_is_stored_and_forwarded(gateway, waha, sink, http, name):
    url = waha.add_file(MEDIA / name, name=f"true_1@c.us_{name}")
    mimetype, template = _declared(name)
    payload = waha_payload(url, message_id=f"true_1@c.us_{name}", mimetype=mimetype,
                           filename=name, template=template)
    resp = await gateway.post_waha(payload)
    assert resp.status == 200

    [delivery] = await sink.wait_for(1, timeout=10)
    media = delivery.json["payload"]["media"]
    gw = media["gateway"]
    expected = MANIFEST[name]
    assert gw["sha256"] == expected["sha256_hex"]
    assert gw["size"] == expected["size"]
    assert gw["category"] == expected["category"]
    assert gw["original_url"] == url
    assert media["url"].startswith(f"{gateway.url}/media/{gw['id']}/")
    assert delivery.json["gateway"]["notes"] == []
    # the rest of the documented payload is forwarded as it came
    assert delivery.json["payload"]["from"] == payload["payload"]["from"]
    assert delivery.json["session"] == "default"

    async with http.get(media["url"]) as r:
        body = await r.read()
        assert r.status == 200
        assert r.headers["Content-Type"].split(";")[0] == gw["mimetype"]
        assert int(r.headers["Content-Length"]) == expected["size"]
        assert r.headers["ETag"] == f'"{expected["sha256_hex"]}"'
        assert "filename" in r.headers["Content-Disposition"]
    assert hashlib.sha256(body).hexdigest() == expected["sha256_hex"]
    if name == "not_really_an_image.jpg":
        assert not gw["mimetype"].startswith("image/")
        assert not any(p.suffix == ".jpg" for p in gateway.object_files())
        assert r.headers["Content-Disposition"].startswith("attachment")
    else:
        assert gw["mimetype"] == expected["mime"]


async def test_forward_is_signed_with_the_target_secret(gateway, waha, sink):
    url = waha.add_file(MEDIA / "photo.jpg")
    await gateway.post_waha(waha_payload(url, message_id="sig-1"))
    [d] = await sink.wait_for(1)
    expected = "sha256=" + hmac.new(b"bot-secret", d.body, hashlib.sha256).hexdigest()
    assert d.headers["X-Gateway-Signature"] == expected
    assert d.headers["X-Gateway-Event"] == "message"
    assert d.headers["Idempotency-Key"] == d.json["gateway"]["event_id"]


async def test_api_key_is_sent_to_waha(gateway, waha, sink):
    url = waha.add_file(MEDIA / "photo.jpg")
    await gateway.post_waha(waha_payload(url, message_id="key-1"))
    await sink.wait_for(1)
    assert waha.requests and all(h.get("X-Api-Key") == "waha-key" for _, h in waha.requests)


async def test_bad_or_missing_hmac_is_401_and_stores_nothing(start_gateway, waha, sink):
    gw = await start_gateway(providers={"waha": {"hmac_key": "hmac-secret"}})
    url = waha.add_file(MEDIA / "photo.jpg")
    body = json.dumps(waha_payload(url, message_id="hmac-1")).encode()
    for headers in ({}, {"X-Webhook-Hmac": "00" * 64}, {"X-Webhook-Hmac": waha_hmac("wrong", body)}):
        resp = await gw.post_waha(body, headers)
        assert resp.status == 401
    await asyncio.sleep(0.3)
    assert await gw.count("events") == 0
    assert await gw.count("jobs") == 0
    assert gw.object_files() == []
    assert waha.requests == [] and sink.deliveries == []

    ok = await gw.post_waha(body, {"X-Webhook-Hmac": waha_hmac("hmac-secret", body),
                                   "X-Webhook-Hmac-Algorithm": "sha512"})
    assert ok.status == 200
    await sink.wait_for(1)


async def test_duplicate_delivery_stores_one_object_and_forwards_once(gateway, waha, sink):
    url = waha.add_file(MEDIA / "screenshot.png")
    body = json.dumps(waha_payload(url, message_id="dup-1", mimetype="image/png")).encode()
    first = await gateway.post_waha(body)
    await sink.wait_for(1)
    second = await gateway.post_waha(body)
    assert first.status == second.status == 200
    await asyncio.sleep(0.5)
    assert len(sink.deliveries) == 1
    assert await gateway.count("media") == 1
    assert len(gateway.object_files()) == 1
    assert waha.served("screenshot.png") == 1


async def test_media_stored_during_a_webhook_commit_that_fails_is_deleted_again(gateway, waha, sink):
    """With a fetch worker idle, a webhook's download starts while its commit runs; a commit that
    fails (here the database refuses every event row) answers 503 and keeps nothing: the object
    stored meanwhile is deleted, and no row names it. The provider's retry stores it once."""
    url = waha.add_file(MEDIA / "screenshot.png")
    body = json.dumps(waha_payload(url, message_id="refused-once", mimetype="image/png")).encode()
    await gateway.app[CATALOG].write(lambda db: db.conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"))
    assert (await gateway.post_waha(body)).status == 503
    deadline = asyncio.get_running_loop().time() + 5
    while waha.served("screenshot.png") < 1 or any(  # the download began, and its task is over
            t.get_name().startswith("ingest-early-") for t in asyncio.all_tasks()):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    assert await gateway.count("media") == 0 and gateway.object_files() == []
    await gateway.app[CATALOG].write(lambda db: db.conn.execute("DROP TRIGGER refuse"))
    assert (await gateway.post_waha(body)).status == 200  # the provider retries
    [delivery] = await sink.wait_for(1)
    assert await gateway.count("media") == 1 and len(gateway.object_files()) == 1
    assert delivery.json["payload"]["media"]["gateway"]["id"]


async def test_message_and_message_any_share_one_stored_object(gateway, waha, sink):
    url = waha.add_file(MEDIA / "clip.mp4")
    for event in ("message", "message.any"):
        p = waha_payload(url, message_id="same-id", mimetype="video/mp4", event=event)
        assert (await gateway.post_waha(p)).status == 200
    deliveries = await sink.wait_for(2)
    await asyncio.sleep(0.3)
    assert sorted(d.json["event"] for d in deliveries) == ["message", "message.any"]
    ids = {d.json["payload"]["media"]["gateway"]["id"] for d in deliveries}
    assert len(ids) == 1
    assert await gateway.count("media") == 1
    assert len(gateway.object_files()) == 1
    assert waha.served("clip.mp4") == 1


async def test_an_attachment_stored_before_is_kept_once_when_its_look_up_is_skipped(gateway, waha, sink):
    """An attachment only one recent event named is stored without looking for a stored copy
    first; when one exists (its event was forgotten: evicted here, or a restart, or another
    replica), the new copy is dropped and the forward links the stored one."""
    gateway.app[INGESTOR].arrivals = Arrivals(sources=1)  # remembers the source key of one event
    url = waha.add_file(MEDIA / "clip.mp4")
    assert (await gateway.post_waha(waha_payload(url, message_id="m-1", mimetype="video/mp4"))).status == 200
    await sink.wait_for(1)
    other = waha.add_file(MEDIA / "screenshot.png")
    assert (await gateway.post_waha(waha_payload(other, message_id="m-2", mimetype="image/png"))).status == 200
    await sink.wait_for(2)
    again = waha_payload(url, message_id="m-1", mimetype="video/mp4", event="message.any")
    assert (await gateway.post_waha(again)).status == 200
    deliveries = await sink.wait_for(3)
    first, last = deliveries[0].json, deliveries[2].json
    assert last["payload"]["media"]["gateway"]["id"] == first["payload"]["media"]["gateway"]["id"]
    assert waha.served("clip.mp4") == 2  # fetched again: the look-up was skipped
    assert await gateway.count("media") == 2
    assert len(gateway.object_files()) == 2  # the second copy of the clip was dropped


async def test_a_completion_the_catalog_refused_is_retried_with_the_object_stored_before(gateway, waha, sink):
    """The rows of an ingest's objects go in with its completion. A completion the catalog
    refuses (here a trigger refuses to mark the event ingested) is retried like a failed attempt,
    and the retry links the object stored the first time: not fetched again (WAHA may have deleted
    the file by then), one object, one row, one forward."""
    catalog = gateway.app[CATALOG]
    await catalog.write(lambda db: db.conn.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE OF state ON events WHEN NEW.state = 'ingested'"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"))
    url = waha.add_file(MEDIA / "screenshot.png")
    assert (await gateway.post_waha(waha_payload(url, message_id="refused-completion",
                                                 mimetype="image/png"))).status == 200
    deadline = asyncio.get_running_loop().time() + 5
    while not await gateway.count("jobs", "kind = 'ingest' AND last_error LIKE '%refused by the test%'"):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    assert await gateway.count("media") == 0  # the row went with the refused completion
    await catalog.write(lambda db: db.conn.execute("DROP TRIGGER refuse"))
    [delivery] = await sink.wait_for(1)
    assert waha.served("screenshot.png") == 1
    assert await gateway.count("media") == 1 and len(gateway.object_files()) == 1
    [row] = await catalog.list_media([], [], "created_at", False, None, 10)
    assert delivery.json["payload"]["media"]["gateway"]["id"] == row["id"]


async def test_file_gone_at_waha_is_forwarded_with_a_note_after_retries(gateway, waha, sink):
    url = f"{waha.base_url}/api/files/default/never-there.jpg"
    await gateway.post_waha(waha_payload(url, message_id="gone-1"))
    [d] = await sink.wait_for(1, timeout=10)
    assert waha.served("never-there.jpg") == gateway.settings.queue.max_attempts
    assert d.json["payload"]["media"]["url"] == url  # original link, unchanged
    [note] = d.json["gateway"]["notes"]
    assert note["path"] == "payload.media" and "404" in note["error"]
    assert await gateway.count("media") == 0


async def test_file_expiring_at_waha_is_a_404(gateway, waha, sink):
    waha.lifetime = 0.0
    url = waha.add_file(MEDIA / "photo.jpg")
    await asyncio.sleep(0.05)
    await gateway.post_waha(waha_payload(url, message_id="expired-1"))
    [d] = await sink.wait_for(1)
    assert "gone" in d.json["gateway"]["notes"][0]["error"]


async def test_transient_waha_errors_are_retried(gateway, waha, sink):
    waha.fail_next = 2  # two 500s, then the file
    url = waha.add_file(MEDIA / "song.mp3")
    await gateway.post_waha(waha_payload(url, message_id="retry-1", mimetype="audio/mpeg",
                                         template="message_document.json"))
    [d] = await sink.wait_for(1)
    assert d.json["payload"]["media"]["gateway"]["sha256"] == MANIFEST["song.mp3"]["sha256_hex"]
    assert waha.served("song.mp3") == 3


@pytest.mark.parametrize("media", [{"url": None, "mimetype": "image/jpeg", "filename": None},
                                   {"url": None, "error": {"message": "download failed"}}])
async def test_media_not_downloaded_by_waha_is_forwarded_unchanged_with_a_note(gateway, sink, media):
    payload = waha_payload(None, message_id="nomedia-1")
    payload["payload"]["media"] = media
    assert (await gateway.post_waha(payload)).status == 200
    [d] = await sink.wait_for(1)
    assert d.json["payload"]["media"] == media
    assert d.json["payload"]["body"] == payload["payload"]["body"]
    assert len(d.json["gateway"]["notes"]) == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversize_media_leaves_no_partial_file(start_gateway, waha, sink, chunked):
    gw = await start_gateway(media={"max_bytes": 100_000})
    waha.chunked = chunked
    url = waha.add_file(MEDIA / "clip.mp4")  # 409,584 bytes
    await gw.post_waha(waha_payload(url, message_id="big-1", mimetype="video/mp4"))
    [d] = await sink.wait_for(1)
    assert "100000 bytes" in d.json["gateway"]["notes"][0]["error"]
    assert d.json["payload"]["media"]["url"] == url
    assert gw.stored_files() == []  # no object, no temp file, no sidecar
    assert await gw.count("media") == 0


async def test_media_from_another_host_is_not_fetched(gateway, waha, sink, aiohttp_server):
    from tests.emulators.waha import WahaEmulator
    other = WahaEmulator(workdir=waha.workdir)
    server = await aiohttp_server(other.app, host="127.0.0.1")
    other.base_url = str(server.make_url("")).rstrip("/")
    url = other.add_file(MEDIA / "photo.jpg", name="stolen.jpg")
    await gateway.post_waha(waha_payload(url, message_id="other-1"))
    [d] = await sink.wait_for(1)
    assert other.requests == []  # never contacted, so the API key never left
    assert "not the configured WAHA host" in d.json["gateway"]["notes"][0]["error"]


async def test_reply_media_and_deprecated_media_url_are_rewritten(gateway, waha, sink):
    url = waha.add_file(MEDIA / "invoice.pdf")
    quoted = waha.add_file(MEDIA / "photo.jpg")
    payload = waha_payload(url, message_id="reply-1", mimetype="application/pdf",
                           filename="invoice.pdf", template="message_document.json")
    payload["payload"]["mediaUrl"] = url
    payload["payload"]["replyTo"] = {"id": "quoted-1", "body": "earlier photo",
                                     "media": {"url": quoted, "mimetype": "image/jpeg"}}
    await gateway.post_waha(payload)
    [d] = await sink.wait_for(1)
    p = d.json["payload"]
    assert p["media"]["gateway"]["category"] == "document"
    assert p["mediaUrl"] == p["media"]["url"] != url
    assert p["replyTo"]["media"]["gateway"]["sha256"] == MANIFEST["photo.jpg"]["sha256_hex"]
    assert p["replyTo"]["media"]["url"].startswith(gateway.url)


async def test_only_mediaurl_old_waha(gateway, waha, sink):
    url = waha.add_file(MEDIA / "sticker.webp")
    payload = {"event": "message", "session": "default",
               "payload": {"id": "old-1", "hasMedia": True, "mediaUrl": url}}
    await gateway.post_waha(payload)
    [d] = await sink.wait_for(1)
    assert d.json["payload"]["mediaUrl"].startswith(f"{gateway.url}/media/")


async def test_events_without_media_pass_through(gateway, sink):
    payload = {"event": "session.status", "session": "default", "payload": {"status": "WORKING"}}
    await gateway.post_waha(payload)
    [d] = await sink.wait_for(1)
    assert d.json["payload"] == payload["payload"] and d.json["event"] == "session.status"


async def test_target_event_filter(start_gateway, waha, sink, aiohttp_server):
    from tests.emulators.sink import BotSink
    only_any = BotSink()
    server = await aiohttp_server(only_any.app, host="127.0.0.1")
    gw = await start_gateway(targets=[
        {"name": "all", "url": sink.url},
        {"name": "any-only", "url": str(server.make_url("/hook")), "events": ["message.any"]},
    ])
    url = waha.add_file(MEDIA / "photo.jpg")
    await gw.post_waha(waha_payload(url, message_id="f-1", event="message"))
    await gw.post_waha(waha_payload(url, message_id="f-1", event="message.any"))
    await sink.wait_for(2)
    [d] = await only_any.wait_for(1)
    await asyncio.sleep(0.3)
    assert len(only_any.deliveries) == 1 and d.json["event"] == "message.any"


async def test_delivery_is_retried_until_the_bot_answers(gateway, waha, sink):
    sink.fail_next = 2
    await gateway.post_waha({"event": "message", "session": "default", "payload": {"id": "r-1"}})
    [d] = await sink.wait_for(1)
    assert sink.attempts == 3
    assert d.json["payload"]["id"] == "r-1"


async def test_bad_input_gets_4xx_never_500(gateway):
    cases = [
        (b"not json", 400),
        (b"[1, 2]", 400),
        (json.dumps({"session": "default", "payload": {}}).encode(), 400),
        (json.dumps({"event": "message", "payload": {}}).encode(), 400),
        (json.dumps({"event": "message", "session": "s", "payload": "x"}).encode(), 400),
        (b"\xff\xfe\x00", 400),
    ]
    for body, status in cases:
        resp = await gateway.post_waha(body)
        assert resp.status == status, body
    async with gateway.http.post(f"{gateway.url}/webhooks/telegram", data=b"{}") as r:
        assert r.status == 404
        assert "unknown provider" in (await r.json())["error"]
    big = b'{"event": "message", "session": "x", "pad": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    assert (await gateway.post_waha(big)).status == 413
    assert await gateway.count("events") == 0


async def _stored_link(gateway, waha, sink, name="photo.jpg"):
    url = waha.add_file(MEDIA / name)
    await gateway.post_waha(waha_payload(url, message_id=f"link-{name}"))
    [d] = await sink.wait_for(1)
    return d.json["payload"]["media"]["url"], d.json["payload"]["media"]["gateway"]


async def test_tampered_or_expired_link_is_403(gateway, waha, sink, http):
    link, gw = await _stored_link(gateway, waha, sink)
    parts = urlsplit(link)
    query = dict(q.split("=", 1) for q in parts.query.split("&"))
    base = f"{gateway.url}{parts.path}"
    tampered = [
        f"{base}?exp={query['exp']}&sig={query['sig'][:-2]}AA",
        f"{base}?exp={int(query['exp']) + 1}&sig={query['sig']}",
        f"{base.replace(gw['id'], gw['id'][:-1] + 'x')}?exp={query['exp']}&sig={query['sig']}",
        f"{base}x?exp={query['exp']}&sig={query['sig']}",
        base,
    ]
    for url in tampered:
        async with http.get(url) as r:
            assert r.status == 403, url
    expired = gateway.app[LINKS].link(gw["id"], parts.path.rsplit("/", 1)[1], ttl=60, now=0)
    async with http.get(expired) as r:
        assert r.status == 403
        assert "expired" in (await r.json())["error"]
    async with http.get(link) as r:
        assert r.status == 200


async def test_range_etag_and_head(gateway, waha, sink, http):
    link, gw = await _stored_link(gateway, waha, sink)
    data = (MEDIA / "photo.jpg").read_bytes()
    async with http.get(link, headers={"Range": "bytes=10-19"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
        assert await r.read() == data[10:20]
    async with http.get(link, headers={"Range": "bytes=-100"}) as r:
        assert r.status == 206 and await r.read() == data[-100:]
    async with http.get(link, headers={"Range": "bytes=50000-"}) as r:
        assert r.status == 206 and await r.read() == data[50000:]
    async with http.get(link, headers={"Range": f"bytes={len(data) + 5}-"}) as r:
        assert r.status == 416
        assert r.headers["Content-Range"] == f"bytes */{len(data)}"
    async with http.get(link, headers={"If-None-Match": f'"{gw["sha256"]}"'}) as r:
        assert r.status == 304
    async with http.get(link, headers={"If-None-Match": '"something-else"'}) as r:
        assert r.status == 200 and await r.read() == data
    async with http.head(link) as r:
        assert r.status == 200
        assert int(r.headers["Content-Length"]) == len(data)
        assert await r.read() == b""


async def test_metrics_and_health(gateway, waha, sink, http):
    link, _ = await _stored_link(gateway, waha, sink)
    async with http.get(link) as r:
        await r.read()
    async with http.get(f"{gateway.url}/healthz") as r:
        assert r.status == 200
    async with http.get(f"{gateway.url}/readyz") as r:
        assert r.status == 200 and (await r.json())["ready"] is True
    async with http.get(f"{gateway.url}/metrics") as r:
        text = await r.text()
    assert 'gateway_webhooks_received_total{outcome="accepted",provider="waha"} 1.0' in text
    assert 'gateway_media_ingested_total{category="image",outcome="stored",provider="waha"} 1.0' in text
    assert f'gateway_media_ingested_bytes_total{{category="image",provider="waha"}} {MANIFEST["photo.jpg"]["size"]}.0' in text
    assert 'gateway_media_ingest_duration_seconds_count{category="image",outcome="stored",provider="waha"} 1.0' in text
    assert 'gateway_jobs{kind="ingest",state="done"} 1.0' in text
    assert 'route="/media/{id}/{filename}"' in text  # templates, never raw paths
    assert "/media/m_" not in text


async def test_readyz_fails_when_storage_is_gone(gateway, http):
    import shutil
    shutil.rmtree(gateway.media_root)
    async with http.get(f"{gateway.url}/readyz") as r:
        body = await r.json()
        assert r.status == 503 and body["catalog"] == "ok" and body["storage"] != "ok"
