"""Outbound media: POST /api/v1/messages and the drop-in WAHA and Meta relays, against the
WAHA and Graph emulators (which fetch links with a plain GET, as the real services do)."""

from __future__ import annotations

import base64
import json
import shutil

import aiohttp
import pytest

from gateway.keys import CATALOG
from tests.conftest import MANIFEST, MEDIA, waha_payload
from tests.emulators.graph import GraphEmulator

BOT_KEY, READ_KEY = "bot-secret-key", "read-only-key"
PNID = "106540352242922"
API_KEYS = [{"name": "bot", "key": BOT_KEY, "scopes": ["read", "write"]},
            {"name": "reader", "key": READ_KEY, "scopes": ["read"]}]


@pytest.fixture
async def graph(aiohttp_server) -> GraphEmulator:
    emu = GraphEmulator(token="graph-token")
    server = await aiohttp_server(emu.app, host="127.0.0.1")
    emu.base_url = str(server.make_url("")).rstrip("/")
    return emu


@pytest.fixture
async def gw(start_gateway, graph):
    return await start_gateway(
        api={"keys": API_KEYS},
        fetch={"allow_networks": ["127.0.0.0/8"]},  # the emulators live on loopback
        providers={"meta": {"access_token": graph.token, "graph_url": graph.base_url,
                            "download_hosts": ["127.0.0.1"], "phone_number_ids": [PNID]},
                   "waha": {"sessions": ["default"]}},
    )


async def api(gw, body, key: str | None = BOT_KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    kw = {"json": body} if body is not None else kwargs
    async with gw.http.post(f"{gw.url}/api/v1/messages", headers=headers, **kw) as r:
        return r.status, await r.json()


async def inbound_media_id(gw, waha, sink, name: str) -> str:
    url = waha.add_file(MEDIA / name)
    before = len(sink.deliveries)
    await gw.post_waha(waha_payload(url, message_id=f"in-{name}", filename=name, mimetype=MANIFEST[name]["mime"]))
    deliveries = await sink.wait_for(before + 1)
    return deliveries[before].json["payload"]["media"]["gateway"]["id"]


async def test_api_keys(gw):
    body = {"provider": "waha", "account": "default", "to": "1@c.us", "type": "image", "media": {"id": "x"}}
    assert (await api(gw, body, key=None))[0] == 401
    assert (await api(gw, body, key="wrong"))[0] == 401
    status, answer = await api(gw, body, key=READ_KEY)
    assert status == 403 and "write" in answer["error"]


@pytest.mark.parametrize("kind,name,endpoint", [
    ("image", "photo.jpg", "sendImage"), ("video", "clip.mp4", "sendVideo"), ("voice", "voice.ogg", "sendVoice"),
    ("audio", "song.mp3", "sendFile"), ("document", "invoice.pdf", "sendFile"), ("sticker", "sticker.webp", "sendImage"),
])
async def test_waha_send_every_type_by_stored_id(gw, waha, sink, kind, name, endpoint):
    media_id = await inbound_media_id(gw, waha, sink, name)
    status, answer = await api(gw, {"provider": "waha", "account": "default", "to": "123@c.us", "type": kind,
                                    "media": {"id": media_id}, "caption": "hi"})
    assert status == 200, answer
    [sent] = waha.sent
    assert sent["endpoint"] == endpoint and sent["chatId"] == "123@c.us" and sent["via"] == "url"
    assert sent["sha256"] == MANIFEST[name]["sha256_hex"]  # the bytes WAHA fetched are the original
    assert sent["file"]["url"] == answer["media"]["link"] and answer["media"]["link"].startswith(gw.url)
    assert answer["provider_message_id"].startswith("true_123@c.us_")
    row = await gw.app[CATALOG].get_media(answer["media"]["id"])
    assert row["direction"] == "outbound" and row["chat"] == "123@c.us"
    assert row["message_id"] == answer["provider_message_id"] and answer["media"]["id"] != media_id


async def test_waha_send_from_url_upload_and_inline_data(start_gateway, waha, aiohttp_server):
    gw = await start_gateway(api={"keys": API_KEYS}, fetch={"allow_networks": ["127.0.0.0/8"]},
                             providers={"waha": {"send_inline_max_bytes": 100_000}})
    public = await file_server(aiohttp_server)
    status, answer = await api(gw, {"provider": "waha", "account": "default", "to": "9@c.us", "type": "document",
                                    "media": {"url": f"{public}/invoice.pdf"}})
    assert status == 200, answer
    assert waha.sent[-1]["via"] == "data"  # 2,370 bytes: under send_inline_max_bytes
    assert waha.sent[-1]["sha256"] == MANIFEST["invoice.pdf"]["sha256_hex"]
    assert waha.sent[-1]["file"]["filename"] == "invoice.pdf"

    form = aiohttp.FormData()
    for field, value in {"provider": "waha", "account": "default", "to": "9@c.us", "type": "video"}.items():
        form.add_field(field, value)
    form.add_field("file", (MEDIA / "clip.mp4").read_bytes(), filename="clip.mp4", content_type="video/mp4")
    status, answer = await api(gw, None, data=form)
    assert status == 200, answer
    assert waha.sent[-1]["via"] == "url" and waha.sent[-1]["endpoint"] == "sendVideo"  # 409,584 bytes: a link
    assert waha.sent[-1]["sha256"] == MANIFEST["clip.mp4"]["sha256_hex"]
    status, answer = await api(gw, {"provider": "waha", "account": "default", "to": "9@c.us", "type": "image",
                                    "media": {"url": f"{public}/missing.jpg"}})
    assert status == 502 and "404" in answer["error"]


async def test_upload_from_url_refuses_private_addresses(start_gateway, waha):
    gw = await start_gateway(api={"keys": API_KEYS})  # no allow_networks
    url = waha.add_file(MEDIA / "photo.jpg")
    for target in (url, url.replace("127.0.0.1", "localhost"), "http://169.254.169.254/latest/meta-data",
                   "http://10.0.0.1/x.jpg", "http://[::1]:1/x", "file:///etc/passwd"):
        status, answer = await api(gw, {"provider": "waha", "account": "default", "to": "1@c.us",
                                        "type": "image", "media": {"url": target}})
        assert status == 422, (target, answer)
    assert waha.requests == [] and await gw.count("media") == 0


async def test_voice_must_be_opus_unless_converted(gw, waha, sink):
    media_id = await inbound_media_id(gw, waha, sink, "song.mp3")
    body = {"provider": "waha", "account": "default", "to": "1@c.us", "type": "voice", "media": {"id": media_id}}
    status, answer = await api(gw, body)
    assert status == 422 and "Opus" in answer["error"] and waha.sent == []
    status, _ = await api(gw, {**body, "convert": True})
    assert status == 200 and waha.sent[0]["convert"] is True and waha.sent[0]["endpoint"] == "sendVoice"


async def test_provider_errors_are_passed_through(gw, waha, sink):
    media_id = await inbound_media_id(gw, waha, sink, "photo.jpg")
    waha.send_error = (422, {"statusCode": 422, "message": "Session 'default' is not WORKING"})
    status, answer = await api(gw, {"provider": "waha", "account": "default", "to": "1@c.us", "type": "image",
                                    "media": {"id": media_id}})
    assert (status, answer) == (422, {"statusCode": 422, "message": "Session 'default' is not WORKING"})


async def test_provider_unreachable_is_502(start_gateway, waha, sink, unused_tcp_port):
    gw = await start_gateway(api={"keys": API_KEYS})
    media_id = await inbound_media_id(gw, waha, sink, "photo.jpg")
    from yarl import URL

    from gateway.keys import PROVIDERS
    gw.app[PROVIDERS]["waha"].base = URL(f"http://127.0.0.1:{unused_tcp_port}")  # nothing listens there
    status, answer = await api(gw, {"provider": "waha", "account": "default", "to": "1@c.us", "type": "image",
                                    "media": {"id": media_id}})
    assert status == 502 and "unreachable" in answer["error"]


@pytest.mark.parametrize("body,field", [
    ({"provider": "waha", "account": "default", "to": "1@c.us", "type": "gif", "media": {"id": "x"}}, "type"),
    ({"provider": "waha", "account": "default", "type": "image", "media": {"id": "x"}}, "to"),
    ({"provider": "waha", "account": "default", "to": "1", "type": "image", "media": {"id": "x", "url": "y"}}, "media"),
    ({"provider": "waha", "account": "default", "to": "1", "type": "image"}, "media"),
])
async def test_bad_bodies_are_422_naming_the_field(gw, body, field):
    status, answer = await api(gw, body)
    assert status == 422 and answer["error"].startswith(field), answer


async def test_unknown_provider_media_and_account(gw, waha, sink):
    body = {"provider": "telegram", "account": "a", "to": "1", "type": "image", "media": {"id": "x"}}
    assert (await api(gw, body))[0] == 404
    assert (await api(gw, {**body, "provider": "waha"}))[0] == 404  # no such media id
    media_id = await inbound_media_id(gw, waha, sink, "photo.jpg")
    status, answer = await api(gw, {**body, "provider": "meta", "account": "000", "media": {"id": media_id}})
    assert status == 404 and "000" in answer["error"]  # not a configured business number
    status, answer = await api(gw, {**body, "provider": "waha", "account": "other", "media": {"id": media_id}})
    assert status == 404 and "other" in answer["error"]
    assert waha.sent == []


@pytest.mark.parametrize("by", ["id", "link"])
async def test_meta_send_by_id_and_by_link(gw, waha, sink, graph, by):
    media_id = await inbound_media_id(gw, waha, sink, "clip.mp4")
    status, answer = await api(gw, {"provider": "meta", "account": PNID, "to": "16505551234", "type": "video",
                                    "media": {"id": media_id}, "caption": "clip", "by": by})
    assert status == 200, answer
    [sent] = graph.messages
    assert sent["sha256"] == MANIFEST["clip.mp4"]["sha256_hex"] and sent["video"]["caption"] == "clip"
    assert len(graph.uploads) == (1 if by == "id" else 0)
    assert answer["provider_message_id"].startswith("wamid.")


async def test_meta_limits_are_422_before_upload(gw, waha, sink, graph):
    media_id = await inbound_media_id(gw, waha, sink, "screenshot.png")
    status, answer = await api(gw, {"provider": "meta", "account": PNID, "to": "1", "type": "sticker",
                                    "media": {"id": media_id}})
    assert status == 422 and "image/webp" in answer["error"]
    assert graph.uploads == [] and graph.messages == []


# -- drop-in relays --------------------------------------------------------------------------------

async def relay_post(gw, path: str, body: dict, headers: dict[str, str]):
    async with gw.http.post(f"{gw.url}{path}", json=body, headers=headers) as r:
        return r.status, await r.read()


async def test_waha_relay_stores_and_rewrites_file_url(gw, waha, sink, aiohttp_server):
    public = await file_server(aiohttp_server)
    body = {"session": "default", "chatId": "55@c.us", "caption": "look",
            "file": {"mimetype": "image/jpeg", "filename": "photo.jpg", "url": f"{public}/photo.jpg"}}
    status, raw = await relay_post(gw, "/waha/api/sendImage", body, {"X-Api-Key": waha.api_key})
    assert status == 201
    answer = json.loads(raw)
    [sent] = waha.sent
    assert sent["file"]["url"].startswith(f"{gw.url}/media/") and sent["caption"] == "look"
    assert sent["sha256"] == MANIFEST["photo.jpg"]["sha256_hex"]
    rows = await gw.app[CATALOG].run(lambda db: list(db["media"].rows_where("direction = 'outbound'")))
    assert len(rows) == 1 and rows[0]["chat"] == "55@c.us" and rows[0]["message_id"] == answer["id"]


async def test_waha_relay_with_file_data(gw, waha):
    data = base64.b64encode((MEDIA / "voice.ogg").read_bytes()).decode()
    body = {"session": "default", "chatId": "5@c.us",
            "file": {"mimetype": "audio/ogg; codecs=opus", "filename": "voice.ogg", "data": data}}
    status, _ = await relay_post(gw, "/waha/api/sendVoice", body, {"X-Api-Key": waha.api_key})
    assert status == 201
    [sent] = waha.sent
    assert sent["via"] == "url" and sent["sha256"] == MANIFEST["voice.ogg"]["sha256_hex"]
    assert await gw.count("media", "direction = 'outbound'") == 1


async def test_waha_relay_falls_back_when_storage_is_down(gw, waha, aiohttp_server, http):
    public = await file_server(aiohttp_server)
    shutil.rmtree(gw.media_root)
    gw.media_root.write_text("not a directory any more")  # every write now fails
    body = {"session": "default", "chatId": "5@c.us",
            "file": {"mimetype": "image/jpeg", "filename": "photo.jpg", "url": f"{public}/photo.jpg"}}
    status, _ = await relay_post(gw, "/waha/api/sendImage", body, {"X-Api-Key": waha.api_key})
    assert status == 201
    [sent] = waha.sent
    assert sent["file"]["url"] == f"{public}/photo.jpg"  # the original link went through
    async with http.get(f"{gw.url}/metrics") as r:
        assert 'gateway_relay_fallbacks_total{provider="waha"} 1.0' in await r.text()


async def test_waha_relay_passes_errors_and_other_paths_through(gw, waha, http):
    waha.send_error = (400, {"statusCode": 400, "message": "chatId is invalid"})
    body = {"session": "default", "chatId": "x", "file": {"mimetype": "image/jpeg", "url": "http://10.0.0.1/a.jpg"}}
    status, raw = await relay_post(gw, "/waha/api/sendImage", body, {"X-Api-Key": waha.api_key})
    assert (status, json.loads(raw)) == (400, {"statusCode": 400, "message": "chatId is invalid"})
    async with http.get(f"{gw.url}/waha/api/sessions", headers={"X-Api-Key": waha.api_key}) as r:
        assert r.status == 200 and await r.json() == [{"name": "default", "status": "WORKING"}]
    status, raw = await relay_post(gw, "/waha/api/sendText", {"chatId": "1@c.us", "text": "hello", "session": "default"},
                                   {"X-Api-Key": waha.api_key})
    assert status == 201 and waha.texts == [{"chatId": "1@c.us", "text": "hello", "session": "default"}]


async def test_waha_relay_needs_the_api_key(gw, waha):
    body = {"session": "default", "chatId": "5@c.us", "file": {"mimetype": "image/jpeg", "url": "http://x/y.jpg"}}
    status, _ = await relay_post(gw, "/waha/api/sendImage", body, {"X-Api-Key": "wrong"})
    assert status == 401 and waha.sent == [] and await gw.count("media") == 0


async def test_meta_relay_stores_and_rewrites_link(gw, graph, aiohttp_server):
    public = await file_server(aiohttp_server)
    body = {"messaging_product": "whatsapp", "to": "16505551234", "type": "image",
            "image": {"link": f"{public}/photo.jpg", "caption": "hi"}}
    status, raw = await relay_post(gw, f"/meta/v23.0/{PNID}/messages", body, {"Authorization": "Bearer graph-token"})
    assert status == 200
    answer = json.loads(raw)
    [sent] = graph.messages
    assert sent["image"]["link"].startswith(f"{gw.url}/media/") and sent["sha256"] == MANIFEST["photo.jpg"]["sha256_hex"]
    rows = await gw.app[CATALOG].run(lambda db: list(db["media"].rows_where("direction = 'outbound'")))
    assert rows[0]["message_id"] == answer["messages"][0]["id"] and rows[0]["account"] == PNID
    status, _ = await relay_post(gw, f"/meta/v23.0/{PNID}/messages", body, {"Authorization": "Bearer stolen"})
    assert status == 401


async def test_outbound_metrics(gw, waha, sink, http):
    media_id = await inbound_media_id(gw, waha, sink, "photo.jpg")
    await api(gw, {"provider": "waha", "account": "default", "to": "1@c.us", "type": "image", "media": {"id": media_id}})
    async with http.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    assert 'gateway_outbound_sends_total{outcome="sent",provider="waha",type="image"} 1.0' in text


async def file_server(aiohttp_server) -> str:
    """A plain web server with the sample media, standing for a bot's public file host."""
    from aiohttp import web
    app = web.Application()
    app.router.add_static("/", MEDIA)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("")).rstrip("/")


async def test_relays_pass_a_deeply_nested_body_through_without_a_5xx(gw, waha, graph):
    """A bot's body nested past the interpreter's recursion limit is not the relay's to parse: it is
    passed through to the provider untouched (the provider judges it), never a 500."""
    deep = b"[" * 5000 + b"]" * 5000
    async with gw.http.post(f"{gw.url}/waha/api/sendImage", data=deep,
                            headers={"X-Api-Key": waha.api_key, "Content-Type": "application/json"}) as r:
        assert r.status < 500
    async with gw.http.post(f"{gw.url}/meta/v23.0/{PNID}/messages", data=deep,
                            headers={"Authorization": "Bearer graph-token", "Content-Type": "application/json"}) as r:
        assert r.status < 500
    assert await gw.count("media") == 0
