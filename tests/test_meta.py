"""WhatsApp Cloud API provider against the Graph emulator: verified webhooks, two-step media
download with digest checks, batches, duplicates, and outbound upload + send."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json

import pytest

from gateway.keys import CATALOG, LINKS, PROVIDERS, STORAGE
from gateway.sdk.provider import OutboundMedia, SendRefused, SendRequest
from tests.conftest import FIXTURES, MANIFEST, MEDIA
from tests.emulators.graph import GraphEmulator

APP_SECRET = "meta-app-secret"
VERIFY_TOKEN = "meta-verify-token"
PNID = "106540352242922"
TEMPLATE = json.loads((FIXTURES / "payloads" / "meta" / "webhook_image.json").read_text())


def kind_of(name: str) -> str:
    """The Cloud API message type a fixture file arrives as."""
    if name == "sticker.webp":
        return "sticker"
    return {"image": "image", "video": "video", "audio": "audio"}.get(MANIFEST[name]["category"], "document")


def message(name: str, media_id: str, wamid: str) -> dict:
    kind = kind_of(name)
    obj = {"id": media_id, "mime_type": MANIFEST[name]["mime"], "sha256": MANIFEST[name]["sha256_base64"]}
    if kind == "document":
        obj["filename"] = name
    if name == "voice.ogg":
        obj.update(mime_type="audio/ogg; codecs=opus", voice=True)
    return {"from": "16505551234", "id": wamid, "timestamp": "1744344496", "type": kind, kind: obj}


def webhook(*entries: list[dict]) -> dict:
    """Meta's documented envelope with one entry per list of messages/statuses."""
    body = copy.deepcopy(TEMPLATE)
    template_entry = body["entry"][0]
    body["entry"] = []
    for items in entries:
        entry = copy.deepcopy(template_entry)
        value = entry["changes"][0]["value"]
        value["messages"] = [i for i in items if "status" not in i]
        value["statuses"] = [i for i in items if "status" in i]
        for key in ("messages", "statuses"):
            if not value[key]:
                del value[key]
        body["entry"].append(entry)
    return body


def sign(body: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@pytest.fixture
async def graph(aiohttp_server) -> GraphEmulator:
    emu = GraphEmulator(token="graph-token", url_ttl=300)
    server = await aiohttp_server(emu.app, host="127.0.0.1")
    emu.base_url = str(server.make_url("")).rstrip("/")
    return emu


def meta_settings(graph: GraphEmulator, **extra) -> dict:
    return {"app_secret": APP_SECRET, "verify_token": VERIFY_TOKEN, "access_token": graph.token,
            "graph_url": graph.base_url, "api_version": graph.api_version,
            "download_hosts": ["127.0.0.1"], **extra}


@pytest.fixture
async def meta_gateway(start_gateway, graph):
    return await start_gateway(providers={"meta": meta_settings(graph)})


async def post(gw, payload: dict | bytes, signature: str | None = "auto"):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if signature == "auto":
        headers["X-Hub-Signature-256"] = sign(body)
    elif signature is not None:
        headers["X-Hub-Signature-256"] = signature
    async with gw.http.post(f"{gw.url}/webhooks/meta", data=body, headers=headers) as r:
        return r.status, await r.json()


def media_of(delivery) -> dict:
    msg = delivery.json["entry"][0]["changes"][0]["value"]["messages"][0]
    return msg[msg["type"]]


@pytest.mark.parametrize("name", sorted(MANIFEST))
async def test_every_fixture_file_through_the_inbound_flow(meta_gateway, graph, sink, http, name):
    media_id = graph.add_media(MEDIA / name, MANIFEST[name]["mime"])
    status, answer = await post(meta_gateway, webhook([message(name, media_id, f"wamid.{name}")]))
    assert status == 200 and answer["accepted"] == 1
    [d] = await sink.wait_for(1)
    media = media_of(d)
    g = media["gateway"]
    assert g["sha256"] == MANIFEST[name]["sha256_hex"] and g["size"] == MANIFEST[name]["size"]
    assert g["category"] == MANIFEST[name]["category"] and g["original_id"] == media_id
    assert media["id"] == media_id  # the rest of Meta's object is kept
    assert d.json["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] == PNID
    async with http.get(media["url"]) as r:
        assert hashlib.sha256(await r.read()).hexdigest() == MANIFEST[name]["sha256_hex"]
    assert graph.retrievals == [(media_id, PNID)]
    if g["category"] == "image":  # images and stickers carry a thumbnail link
        async with http.get(g["thumbnail"]) as r:
            assert r.status == 200 and r.content_type == "image/webp"
    else:
        assert "thumbnail" not in g


async def test_a_batch_of_entries_messages_and_statuses(meta_gateway, graph, sink):
    status_item = json.loads((FIXTURES / "payloads/meta/webhook_status_sent.json").read_text())[
        "entry"][0]["changes"][0]["value"]["statuses"][0]
    ids = {n: graph.add_media(MEDIA / n, MANIFEST[n]["mime"]) for n in ("photo.jpg", "invoice.pdf", "song.mp3")}
    text = {"from": "16505551234", "id": "wamid.text", "timestamp": "1", "type": "text", "text": {"body": "hi"}}
    body = webhook(
        [message("photo.jpg", ids["photo.jpg"], "wamid.a"), message("invoice.pdf", ids["invoice.pdf"], "wamid.b")],
        [message("song.mp3", ids["song.mp3"], "wamid.c"), status_item],
        [text],
    )
    status, answer = await post(meta_gateway, body)
    assert status == 200 and answer["accepted"] == 5
    deliveries = await sink.wait_for(5)
    by_event = sorted((d.json and d.headers["X-Gateway-Event"]) for d in deliveries)
    assert by_event == ["message", "message", "message", "message", "status"]
    stored = [media_of(d)["gateway"]["sha256"] for d in deliveries
              if d.headers["X-Gateway-Event"] == "message"
              and d.json["entry"][0]["changes"][0]["value"]["messages"][0]["type"] != "text"]
    assert sorted(stored) == sorted(MANIFEST[n]["sha256_hex"] for n in ids)
    [st] = [d for d in deliveries if d.headers["X-Gateway-Event"] == "status"]
    assert st.json["entry"][0]["changes"][0]["value"]["statuses"] == [status_item]
    assert await meta_gateway.count("media") == 3


async def test_bad_or_missing_signature_is_401_and_stores_nothing(meta_gateway, graph, sink):
    media_id = graph.add_media(MEDIA / "photo.jpg", "image/jpeg")
    body = json.dumps(webhook([message("photo.jpg", media_id, "wamid.sig")])).encode()
    for signature in (None, "sha256=" + "0" * 64, sign(body, "other-secret"), "md5=abc"):
        status, _ = await post(meta_gateway, body, signature)
        assert status == 401
    await asyncio.sleep(0.3)
    assert await meta_gateway.count("events") == 0 and graph.requests == [] and sink.deliveries == []


async def test_verification_handshake(meta_gateway, http):
    url = f"{meta_gateway.url}/webhooks/meta"
    ok = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
    async with http.get(url, params=ok) as r:
        assert r.status == 200 and await r.text() == "1158201444"
        assert r.headers["Content-Type"].startswith("text/plain")
    for bad in ({**ok, "hub.verify_token": "nope"}, {**ok, "hub.mode": "unsubscribe"}, {}):
        async with http.get(url, params=bad) as r:
            assert r.status == 403


async def test_duplicate_delivery_stores_and_forwards_nothing_new(meta_gateway, graph, sink):
    media_id = graph.add_media(MEDIA / "screenshot.png", "image/png")
    body = json.dumps(webhook([message("screenshot.png", media_id, "wamid.dup")])).encode()
    assert (await post(meta_gateway, body))[1]["accepted"] == 1
    await sink.wait_for(1)
    status, answer = await post(meta_gateway, body)
    assert status == 200 and answer == {"accepted": 0, "duplicates": 1, "event_ids": []}
    await asyncio.sleep(0.4)
    assert len(sink.deliveries) == 1 and await meta_gateway.count("media") == 1
    assert graph.downloads == [media_id]


async def test_altered_bytes_are_never_stored_and_end_as_a_note(meta_gateway, graph, sink):
    media_id = graph.add_media(MEDIA / "photo.jpg", "image/jpeg")
    graph.alter_bytes.add(media_id)
    await post(meta_gateway, webhook([message("photo.jpg", media_id, "wamid.alt")]))
    [d] = await sink.wait_for(1, timeout=10)
    [note] = d.json["gateway"]["notes"]
    assert "sha256" in note["error"]
    assert "gateway" not in media_of(d)
    assert len(graph.downloads) == meta_gateway.settings.queue.max_attempts  # retried each time
    assert await meta_gateway.count("media") == 0 and meta_gateway.object_files() == []


async def test_download_url_expiring_between_the_two_steps(meta_gateway, graph, sink):
    media_id = graph.add_media(MEDIA / "clip.mp4", "video/mp4", file_size_as_string=True)
    graph.expire_next_urls = 1
    await post(meta_gateway, webhook([message("clip.mp4", media_id, "wamid.exp")]))
    [d] = await sink.wait_for(1)
    assert media_of(d)["gateway"]["sha256"] == MANIFEST["clip.mp4"]["sha256_hex"]
    assert len(graph.retrievals) == 2  # the expired URL was replaced by a fresh one in one attempt
    assert await meta_gateway.count("jobs", "kind = 'ingest' AND attempts = 1") == 1


async def test_unknown_media_id_is_final(meta_gateway, graph, sink):
    await post(meta_gateway, webhook([message("photo.jpg", "999999", "wamid.unknown")]))
    [d] = await sink.wait_for(1)
    assert "100/33" in d.json["gateway"]["notes"][0]["error"]
    assert graph.retrievals == [("999999", PNID)]  # no retry


async def test_bad_token_is_retried_counted_and_then_noted(start_gateway, graph, sink, http):
    gw = await start_gateway(providers={"meta": meta_settings(graph, access_token="expired-token")})
    media_id = graph.add_media(MEDIA / "photo.jpg", "image/jpeg")
    await post(gw, webhook([message("photo.jpg", media_id, "wamid.tok")]))
    [d] = await sink.wait_for(1, timeout=10)
    assert "access token" in d.json["gateway"]["notes"][0]["error"]
    asked = [r for r in graph.requests if r[0] == "GET" and r[1].endswith(f"/{media_id}")]
    assert len(asked) == gw.settings.queue.max_attempts
    assert all(r[2]["Authorization"] == "Bearer expired-token" for r in asked)
    async with http.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    line = f'gateway_media_fetch_failures_total{{provider="meta",reason="auth"}} {float(gw.settings.queue.max_attempts)}'
    assert line in text


async def test_per_number_tokens(start_gateway, graph, sink):
    gw = await start_gateway(providers={"meta": meta_settings(
        graph, access_token="wrong-for-this-number", access_tokens={PNID: graph.token})})
    media_id = graph.add_media(MEDIA / "photo.jpg", "image/jpeg")
    await post(gw, webhook([message("photo.jpg", media_id, "wamid.pn")]))
    [d] = await sink.wait_for(1)
    assert media_of(d)["gateway"]["sha256"] == MANIFEST["photo.jpg"]["sha256_hex"]


async def test_token_goes_only_to_allowed_download_hosts(start_gateway, graph, sink):
    gw = await start_gateway(providers={"meta": meta_settings(graph, download_hosts=["lookaside.fbsbx.com"],
                                                              graph_url=graph.base_url.replace("127.0.0.1", "localhost"))})
    media_id = graph.add_media(MEDIA / "photo.jpg", "image/jpeg")
    await post(gw, webhook([message("photo.jpg", media_id, "wamid.host")]))
    [d] = await sink.wait_for(1)
    assert "download_hosts" in d.json["gateway"]["notes"][0]["error"]
    assert graph.downloads == []  # the download URL (on 127.0.0.1) was never requested


async def test_bad_bodies_are_4xx(meta_gateway):
    for body in (b"{", b"[]", b'{"entry": 3}', b'{"entry": [{"changes": [{"value": {"messages": [{}]}}]}]}'):
        status, answer = await post(meta_gateway, body)
        assert status == 400, body
    assert "messages[0].id" in answer["error"]


# -- outbound ------------------------------------------------------------------------------------

async def stored(gw, graph, sink, name: str) -> OutboundMedia:
    """Bring ``name`` in through the inbound flow; return it as outbound media."""
    media_id = graph.add_media(MEDIA / name, MANIFEST[name]["mime"])
    before = len(sink.deliveries)
    await post(gw, webhook([message(name, media_id, f"wamid.in.{name}")]))
    deliveries = await sink.wait_for(before + 1)
    record = await gw.app[CATALOG].get_media(media_of(deliveries[before])["gateway"]["id"])
    storage = gw.app[STORAGE]
    return OutboundMedia(record=record, link=gw.app[LINKS].link(record["id"], record["filename"]),
                         open=lambda s, e: storage.open(record["key"], s, e, bucket=record["bucket"]))


@pytest.mark.parametrize("by", ["id", "link"])
@pytest.mark.parametrize("kind,name", [("image", "photo.jpg"), ("video", "clip.mp4"), ("audio", "song.mp3"),
                                       ("voice", "voice.ogg"), ("document", "invoice.pdf"),
                                       ("sticker", "sticker.webp")])
async def test_send_each_media_type(meta_gateway, graph, sink, kind, name, by):
    media = await stored(meta_gateway, graph, sink, name)
    provider = meta_gateway.app[PROVIDERS]["meta"]
    result = await provider.send(SendRequest(account=PNID, to="16505551234", type=kind, media=media,
                                             caption="look" if kind in ("image", "video", "document") else None,
                                             by=by))
    assert result.provider_message_id.startswith("wamid.")
    [sent] = graph.messages
    wire = "audio" if kind == "voice" else kind
    assert sent["type"] == wire and sent["phone_number_id"] == PNID
    assert sent["sha256"] == MANIFEST[name]["sha256_hex"]  # what Meta holds is the original
    if by == "id":
        [upload] = graph.uploads
        assert upload.sha256 == MANIFEST[name]["sha256_hex"] and upload.type == MANIFEST[name]["mime"]
        assert sent[wire]["id"]
    else:
        assert graph.uploads == [] and sent[wire]["link"].startswith(meta_gateway.url)
    if kind == "document":
        assert sent[wire]["filename"] == "invoice.pdf" and sent[wire]["caption"] == "look"


async def test_oversize_image_is_refused_before_any_upload(meta_gateway, graph, sink, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes((MEDIA / "photo.jpg").read_bytes() + b"\0" * 5_100_000)  # still sniffed as JPEG
    media_id = graph.add_media(big, "image/jpeg")
    await post(meta_gateway, webhook([{"from": "1", "id": "wamid.big", "timestamp": "1", "type": "image",
                                       "image": {"id": media_id, "mime_type": "image/jpeg"}}]))
    [d] = await sink.wait_for(1)
    record = await meta_gateway.app[CATALOG].get_media(media_of(d)["gateway"]["id"])
    storage = meta_gateway.app[STORAGE]
    media = OutboundMedia(record=record, link="http://unused",
                          open=lambda s, e: storage.open(record["key"], s, e))
    with pytest.raises(SendRefused) as err:
        await meta_gateway.app[PROVIDERS]["meta"].send(
            SendRequest(account=PNID, to="1", type="image", media=media))
    assert err.value.status == 422 and "5000000 bytes" in str(err.value.body)
    assert graph.uploads == [] and graph.messages == []
    assert [r for r in graph.requests if r[0] == "POST"] == []
