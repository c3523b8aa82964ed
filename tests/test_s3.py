"""storage_s3 against moto's S3 server over HTTP: the WAHA flow into S3, multipart failure,
an S3 outage, redirect serving, per-category buckets and server-side encryption."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from plugins.storage_s3 import S3Settings, S3Storage
from tests.conftest import MANIFEST, MEDIA, boto3_client, s3_config, waha_payload
from tests.emulators.s3 import SerialMotoServer

MiB = 1024 * 1024


async def test_waha_flow_into_s3_read_back_with_plain_boto3(start_gateway, moto_server, waha, sink):
    cfg = s3_config(moto_server, prefix="gw/")
    gw = await start_gateway(storage={"backend": "s3", "s3": cfg})
    for i, name in enumerate(("photo.jpg", "invoice.pdf", "voice.ogg")):
        url = waha.add_file(MEDIA / name)
        await gw.post_waha(waha_payload(url, message_id=f"s3-{i}", filename=name,
                                        mimetype=MANIFEST[name]["mime"]))
    deliveries = await sink.wait_for(3)
    client = boto3_client(moto_server.url)
    for d in deliveries:
        g = d.json["payload"]["media"]["gateway"]
        name = d.json["payload"]["media"]["filename"]
        listed = client.list_objects_v2(Bucket=cfg["bucket"], Prefix="gw/")["Contents"]
        [key] = [o["Key"] for o in listed if g["id"] in o["Key"]]
        obj = client.get_object(Bucket=cfg["bucket"], Key=key)
        body = obj["Body"].read()
        assert hashlib.sha256(body).hexdigest() == MANIFEST[name]["sha256_hex"] == g["sha256"]
        assert obj["Metadata"]["sha256"] == MANIFEST[name]["sha256_hex"]
        assert obj["Metadata"]["filename"] == name
        assert obj["ContentType"] == MANIFEST[name]["mime"]
        assert name in obj["ContentDisposition"]
        async with gw.http.get(d.json["payload"]["media"]["url"]) as r:  # served through the gateway
            assert r.status == 200 and await r.read() == body


async def test_failed_multipart_upload_leaves_no_parts(moto_server):
    storage = S3Storage(S3Settings(**s3_config(moto_server)))
    await storage.start()

    async def breaks_after_two_parts():
        for _ in range(20):  # 20 MiB, parts of 8 MiB
            yield b"\0" * MiB
        raise ConnectionResetError("provider went away")

    with pytest.raises(ConnectionResetError):
        await storage.put("x/broken", breaks_after_two_parts(), "video/mp4", {})
    client = boto3_client(moto_server.url)
    assert client.list_multipart_uploads(Bucket=storage.settings.bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=storage.settings.bucket).get("KeyCount") == 0
    await storage.close()


async def test_s3_outage_loses_nothing(start_gateway, waha, sink, unused_tcp_port, http):
    moto = SerialMotoServer(port=unused_tcp_port)
    moto.start()
    url = moto.url
    cfg = s3_config(moto)
    gw = await start_gateway(storage={"backend": "s3", "s3": cfg},
                             queue={"max_attempts": 2, "backoff_base": 0.05, "backoff_max": 0.3})
    moto.stop()
    async with http.get(f"{gw.url}/readyz") as r:
        assert r.status == 503 and (await r.json())["storage"] != "ok"
    names = ["photo.jpg", "clip.mp4", "song.mp3", "report.docx", "sticker.webp"]
    for name in names:
        resp = await gw.post_waha(waha_payload(waha.add_file(MEDIA / name), message_id=f"out-{name}"))
        assert resp.status == 200
    await asyncio.sleep(1.0)  # several attempts fail meanwhile, more than max_attempts
    assert sink.deliveries == []
    assert await gw.count("jobs", "state = 'dead'") == 0

    moto = SerialMotoServer(port=unused_tcp_port)
    moto.start()
    try:
        deliveries = await sink.wait_for(len(names), timeout=20)
        got = {d.json["payload"]["id"]: d.json["payload"]["media"]["gateway"]["sha256"] for d in deliveries}
        assert got == {f"out-{n}": MANIFEST[n]["sha256_hex"] for n in names}
        client = boto3_client(url)
        assert client.list_objects_v2(Bucket=cfg["bucket"])["KeyCount"] == len(names)
        async with http.get(f"{gw.url}/readyz") as r:
            assert r.status == 200
    finally:
        moto.stop()


async def test_redirect_serving(start_gateway, moto_server, waha, sink, http):
    gw = await start_gateway(storage={"backend": "s3", "serving": "redirect", "s3": s3_config(moto_server)})
    await gw.post_waha(waha_payload(waha.add_file(MEDIA / "photo.jpg"), message_id="redir-1"))
    [d] = await sink.wait_for(1)
    link = d.json["payload"]["media"]["url"]
    async with http.get(link, allow_redirects=False) as r:
        assert r.status == 302
        location = r.headers["Location"]
    assert location.startswith(moto_server.url) and "X-Amz-Signature" in location
    async with http.get(location) as r:
        assert hashlib.sha256(await r.read()).hexdigest() == MANIFEST["photo.jpg"]["sha256_hex"]
    async with http.get(link.replace("sig=", "sig=x"), allow_redirects=False) as r:
        assert r.status == 403  # the gateway's own signature is checked before any redirect


async def test_category_buckets_and_sse(start_gateway, moto_server, waha, sink, http):
    cfg = s3_config(moto_server, sse="AES256")
    video_bucket = cfg["bucket"] + "-video"
    cfg["category_buckets"] = {"video": video_bucket}
    gw = await start_gateway(storage={"backend": "s3", "s3": cfg})
    await gw.post_waha(waha_payload(waha.add_file(MEDIA / "clip.mp4"), message_id="cat-1", mimetype="video/mp4"))
    await gw.post_waha(waha_payload(waha.add_file(MEDIA / "photo.jpg"), message_id="cat-2"))
    deliveries = await sink.wait_for(2)
    client = boto3_client(moto_server.url)
    [video] = client.list_objects_v2(Bucket=video_bucket)["Contents"]
    [photo] = client.list_objects_v2(Bucket=cfg["bucket"])["Contents"]
    assert "/video/" in video["Key"] and "/image/" in photo["Key"]
    assert client.head_object(Bucket=video_bucket, Key=video["Key"])["ServerSideEncryption"] == "AES256"
    for d in deliveries:  # served from the right bucket
        async with http.get(d.json["payload"]["media"]["url"]) as r:
            assert r.status == 200
            assert hashlib.sha256(await r.read()).hexdigest() == d.json["payload"]["media"]["gateway"]["sha256"]
