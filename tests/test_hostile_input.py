"""Hostile webhook and API input (issue 10): whatever a sender puts in a body or a header, the
answer is never a 5xx and an accepted event never ends in the dead letter.

Covered: lone UTF-16 surrogates in the fields the gateway extracts, deep nesting, non-ASCII
signature headers, event names unfit for a header, and non-canonical IP literals in
upload-from-URL."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from gateway.keys import CATALOG
from gateway.sdk.provider import MAX_JSON_DEPTH, MediaOutcome, PayloadError, WebhookEvent, load_json
from plugins.whatsapp_meta import MetaProvider, MetaSettings
from plugins.whatsapp_waha import WahaProvider, WahaSettings
from tests.conftest import MEDIA, waha_hmac, waha_payload
from tests.test_files_api import KEYS, T1, call, file_server
from tests.test_meta import PNID, meta_settings, message, post, sign, webhook
from tests.test_meta import graph  # noqa: F401  (fixture)

SURROGATE = "\ud800"  # json.dumps writes it as the escape "\ud800", which json.loads accepts


async def settle(gw, timeout: float = 15.0) -> dict[str, int]:
    """Wait until no job is queued or running; return ``{state: count}`` of all jobs."""
    deadline = time.monotonic() + timeout
    while await gw.count("jobs", "state IN ('queued', 'running')"):
        assert time.monotonic() < deadline, "jobs did not finish in time"
        await asyncio.sleep(0.05)
    counts = {}
    for state in ("done", "dead"):
        counts[state] = await gw.count("jobs", "state = ?", [state])
    return counts


# -- 1. lone surrogates ----------------------------------------------------------------------------

def _set(data: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


@pytest.mark.parametrize("field", ["session", "event", "id", "payload.id", "payload.from",
                                   "payload.media.mimetype", "payload.media.filename"])
async def test_lone_surrogate_in_a_waha_field_is_accepted_and_forwarded(gateway, waha, sink, field):
    url = waha.add_file(MEDIA / "photo.jpg")
    data = waha_payload(url, message_id="sur-1")
    _set(data, field, f"x{SURROGATE}y")
    body = json.dumps(data).encode()
    assert b"\\ud800" in body
    resp = await gateway.post_waha(body)
    assert resp.status == 200, field
    [d] = await sink.wait_for(1)
    assert (await settle(gateway))["dead"] == 0
    # the raw body is kept as it came; the forward keeps the sender's value (escaped) as well
    [raw] = await gateway.app[CATALOG].run(lambda db: [r[0] for r in db.execute("SELECT raw FROM events")])
    assert raw == body
    forwarded = d.json
    for part in field.split("."):
        forwarded = forwarded[part]
    assert forwarded == f"x{SURROGATE}y"
    if field.startswith("payload.media.") or field == "payload.id":
        assert "gateway" in d.json["payload"]["media"], d.json["gateway"]["notes"]


@pytest.mark.parametrize("field", ["phone_number_id", "from", "wamid", "media_id", "mime_type"])
async def test_lone_surrogate_in_a_meta_field_is_accepted_and_forwarded(start_gateway, graph, sink,  # noqa: F811
                                                                        field):
    gw = await start_gateway(providers={"meta": meta_settings(graph)})
    media_id = graph.add_media(MEDIA / "photo.jpg", "image/jpeg")
    msg = message("photo.jpg", media_id, "wamid.sur")
    data = webhook([msg])
    value = data["entry"][0]["changes"][0]["value"]
    if field == "phone_number_id":
        value["metadata"]["phone_number_id"] = f"1{SURROGATE}"
    elif field == "from":
        msg["from"] = f"1{SURROGATE}"
    elif field == "wamid":
        msg["id"] = f"wamid.{SURROGATE}"
    elif field == "media_id":
        msg["image"]["id"] = f"1{SURROGATE}"
    else:
        msg["image"]["mime_type"] = f"image/{SURROGATE}"
    status, answer = await post(gw, json.dumps(data).encode())
    assert status == 200 and answer["accepted"] == 1, answer
    [d] = await sink.wait_for(1)
    assert (await settle(gw))["dead"] == 0
    image = d.json["entry"][0]["changes"][0]["value"]["messages"][0]["image"]
    if field == "media_id":  # no such media at Meta: forwarded with a note
        assert "url" not in image and d.json["gateway"]["notes"]
    elif field != "phone_number_id":  # (an unknown number's media cannot be fetched either)
        assert "gateway" in image, d.json["gateway"]["notes"]


# -- 2. deep nesting -------------------------------------------------------------------------------

def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 500, 1200, 100_000])
async def test_deep_nesting_is_refused_with_400(start_gateway, graph, depth):  # noqa: F811
    gw = await start_gateway(providers={"meta": meta_settings(graph)})
    waha_body = ('{"event": "message", "session": "s", "payload": {"id": "d", "deep": '
                 + _nested(depth) + "}}").encode()
    resp = await gw.post_waha(waha_body)
    assert resp.status == 400
    status, answer = await post(gw, ('{"object": "x", "entry": ' + _nested(depth) + "}").encode())
    assert status == 400 and "nest" in answer["error"], answer
    assert (await gw.post_waha(_nested(depth).encode())).status == 400
    assert await gw.count("events") == 0


def test_load_json_counts_levels_not_brackets():
    assert load_json(_nested(MAX_JSON_DEPTH).encode()) is not None  # as many brackets as the limit
    wide = json.dumps([{"a": [i]} for i in range(100)]).encode()  # 201 brackets, 3 levels
    assert load_json(wide) == json.loads(wide)
    assert load_json(b'{"s": "' + b"[" * 500 + b'"}') == {"s": "[" * 500}  # brackets in a string
    for body in (_nested(MAX_JSON_DEPTH + 1), '{"a": ' + _nested(MAX_JSON_DEPTH) + "}"):
        with pytest.raises(PayloadError, match="nested deeper"):
            load_json(body.encode())
        with pytest.raises(PayloadError, match="nested deeper"):  # a plugin may pass text, as json.loads takes
            load_json(body)  # type: ignore[arg-type]
    assert load_json(_nested(MAX_JSON_DEPTH)) == json.loads(_nested(MAX_JSON_DEPTH))  # type: ignore[arg-type]


async def test_nesting_up_to_the_limit_is_accepted_and_forwarded(gateway, sink):
    # the envelope and payload are two levels; the rest of the limit is the sender's
    deep = json.loads(_nested(MAX_JSON_DEPTH - 2))
    resp = await gateway.post_waha({"event": "message", "session": "s", "payload": {"id": "d", "deep": deep}})
    assert resp.status == 200
    [d] = await sink.wait_for(1)
    assert d.json["payload"]["deep"] == deep
    assert (await settle(gateway))["dead"] == 0


@pytest.mark.parametrize("provider", ["waha", "meta"])
def test_rewrite_copies_only_what_it_changes(provider):
    """No recursion in rewrite: a payload far deeper than the interpreter's stack is fine."""
    deep: list = []
    for _ in range(50_000):
        deep = [deep]
    if provider == "waha":
        prov = WahaProvider(WahaSettings())
        payload = {"event": "message", "session": "s",
                   "payload": {"id": "m", "deep": deep, "media": {"url": "http://w/x", "mimetype": "image/jpeg"}}}
        [ref] = prov._media_refs("s", "k", payload["payload"])
    else:
        prov = MetaProvider(MetaSettings())
        payload = webhook([{**message("photo.jpg", "1", "wamid.d"), "deep": deep}])
        [ref] = prov._media_refs(PNID, payload["entry"][0]["changes"][0]["value"]["messages"][0])
    event = WebhookEvent("k", "message", "s", payload, [ref])
    record = {"id": "m1", "sha256": "00", "size": 1, "mimetype": "image/jpeg", "category": "image"}
    out = prov.rewrite(event, [MediaOutcome(ref, record=record, link="http://gw/media/m1/x.jpg")])
    node = out["payload"]["media"] if provider == "waha" else \
        out["entry"][0]["changes"][0]["value"]["messages"][0]["image"]
    assert node["url"] == "http://gw/media/m1/x.jpg" and node["gateway"]["id"] == "m1"
    original = payload["payload"]["media"] if provider == "waha" else \
        payload["entry"][0]["changes"][0]["value"]["messages"][0]["image"]
    assert "gateway" not in original  # the event's own payload is untouched


# -- 3. non-ASCII signature headers ----------------------------------------------------------------

async def test_non_ascii_waha_signature_is_401_without_a_traceback(start_gateway, waha, sink, caplog):
    gw = await start_gateway(providers={"waha": {"hmac_key": "hmac-secret"}})
    body = json.dumps(waha_payload(waha.add_file(MEDIA / "photo.jpg"), message_id="na-1")).encode()
    caplog.set_level(logging.INFO)
    for given in ("é" * 128, waha_hmac("hmac-secret", body)[:-1] + "é", "\u0661" * 128):
        resp = await gw.post_waha(body, {"X-Webhook-Hmac": given})
        assert resp.status == 401, given
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert len([r for r in caplog.records if "webhook refused" in r.getMessage()]) == 3
    assert await gw.count("events") == 0


async def test_non_ascii_meta_signature_is_401_without_a_traceback(start_gateway, graph, caplog):  # noqa: F811
    gw = await start_gateway(providers={"meta": meta_settings(graph)})
    body = json.dumps(webhook([message("photo.jpg", "1", "wamid.na")])).encode()
    caplog.set_level(logging.INFO)
    for given in ("sha256=" + "é" * 64, sign(body)[:-1] + "ü", "sha256=\u0661" * 2):
        status, _ = await post(gw, body, signature=given)
        assert status == 401, given
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert await gw.count("events") == 0


# -- 4. the event name in X-Gateway-Event ----------------------------------------------------------

@pytest.mark.parametrize("event", ["bad\r\nX-Injected: 1", "ctl\x00\x01\x7f", "ünïcödé", "x" * 100_000],
                         ids=["crlf", "control", "non-ascii", "100k"])
async def test_any_event_name_is_forwarded_with_a_safe_header(gateway, sink, event):
    data = {"event": event, "session": "default", "payload": {"id": "ev-1"}}
    resp = await gateway.post_waha(data)
    assert resp.status == 200
    [d] = await sink.wait_for(1)
    assert (await settle(gateway))["dead"] == 0
    assert d.json["event"] == event  # the payload keeps the name as the provider sent it
    header = d.headers["X-Gateway-Event"]
    assert "X-Injected" not in d.headers
    assert header.isascii() and header.isprintable() and 0 < len(header) <= 200


async def test_an_ordinary_event_name_is_unchanged_in_the_header(gateway, sink):
    await gateway.post_waha({"event": "session.status", "session": "default", "payload": {"status": "WORKING"}})
    [d] = await sink.wait_for(1)
    assert d.headers["X-Gateway-Event"] == "session.status"


# -- 5. non-canonical IP literals in upload-from-URL ---------------------------------------------

async def test_non_canonical_ip_literals_are_refused_with_422(start_gateway, aiohttp_server):
    gw = await start_gateway(api={"keys": KEYS}, fetch={"allow_networks": ["127.0.0.2/32"]})
    private, hits = await file_server(aiohttp_server)
    port = private.rsplit(":", 1)[1]
    for host in ("2130706433", "127.1", "0x7f.0.0.1", "0177.0.0.1", "0x7f000001", "127.0.1"):
        url = f"http://{host}:{port}/photo.jpg"
        status, err = await call(gw, "POST", "/files/from-url", T1, json={"url": url})
        assert status == 422, (url, status, err)
        assert "refused" in err["error"] and host in err["error"], err
    assert hits == []
    assert await gw.count("media") == 0
