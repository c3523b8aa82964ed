"""storage_s3 against SeaweedFS's S3 gateway over HTTP: the WAHA flow into S3, what an object
carries (S3 checksums, no copy), multipart failure, S3 outages (before and during a multipart
upload), the cleanup's sweep of incomplete uploads, redirect serving, per-category buckets and
server-side encryption."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.keys import RETENTION, STORAGE
from gateway.media import new_media_id
from gateway.sdk.storage import StorageError
from plugins.storage_s3 import S3Settings, S3Storage
from tests.conftest import MANIFEST, MEDIA, REPO, boto3_client, s3_config, waha_payload
from tests.daemon import write_toml
from tests.emulators.waha import WahaEmulator

MiB = 1024 * 1024
DAY = 86400.0


def uploads(server, bucket: str) -> list[dict]:
    """The bucket's incomplete multipart uploads (ListMultipartUploads)."""
    return boto3_client(server.url).list_multipart_uploads(Bucket=bucket).get("Uploads", [])


async def until(condition, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_waha_flow_into_s3_read_back_with_plain_boto3(start_gateway, s3_server, waha, sink):
    cfg = s3_config(s3_server, prefix="gw/")
    gw = await start_gateway(storage={"backend": "s3", "s3": cfg})
    for i, name in enumerate(("photo.jpg", "invoice.pdf", "voice.ogg")):
        url = waha.add_file(MEDIA / name)
        await gw.post_waha(waha_payload(url, message_id=f"s3-{i}", filename=name,
                                        mimetype=MANIFEST[name]["mime"]))
    deliveries = await sink.wait_for(3)
    client = boto3_client(s3_server.url)
    for d in deliveries:
        g = d.json["payload"]["media"]["gateway"]
        name = d.json["payload"]["media"]["filename"]
        listed = client.list_objects_v2(Bucket=cfg["bucket"], Prefix="gw/")["Contents"]
        [key] = [o["Key"] for o in listed if g["id"] in o["Key"]]
        obj = client.get_object(Bucket=cfg["bucket"], Key=key, ChecksumMode="ENABLED")
        body = obj["Body"].read()
        assert hashlib.sha256(body).hexdigest() == MANIFEST[name]["sha256_hex"] == g["sha256"]
        # the bucket holds the gateway's SHA-256 as S3's own (verified) checksum, not as metadata
        assert base64.b64decode(obj["ChecksumSHA256"]).hex() == g["sha256"]
        assert obj["Metadata"] == {"media-id": g["id"], "filename": name}
        assert obj["ContentType"] == MANIFEST[name]["mime"]
        assert name in obj["ContentDisposition"]
        async with gw.http.get(d.json["payload"]["media"]["url"]) as r:  # served through the gateway
            assert r.status == 200 and await r.read() == body


async def test_multipart_object_is_not_copied_and_carries_part_checksums(s3_server):
    storage = S3Storage(S3Settings(**s3_config(s3_server, part_size=8 * MiB)))
    await storage.start()
    data = os.urandom(20 * MiB + 5)  # parts of 8 MiB: 3 parts
    meta = {"media-id": "m_1", "filename": "clip.mp4"}

    async def sealed():
        for i in range(0, len(data), 256 * 1024):
            yield data[i:i + 256 * 1024]
        meta["sha256"] = hashlib.sha256(data).hexdigest()  # as the host does, once the stream ends

    result = await storage.put("v/clip.mp4", sealed(), "video/mp4", meta)
    await storage.close()
    head = boto3_client(s3_server.url).head_object(Bucket=result.bucket, Key="v/clip.mp4", ChecksumMode="ENABLED")
    # metadata known before the upload started, nothing added afterwards (no CopyObject onto itself)
    assert head["Metadata"] == {"media-id": "m_1", "filename": "clip.mp4"}
    assert head["ContentType"] == "video/mp4" and "clip.mp4" in head["ContentDisposition"]
    # S3's CRC32 of the parts' CRC32s, each verified by S3 on arrival
    client = boto3_client(s3_server.url)
    parts = [client.head_object(Bucket=result.bucket, Key="v/clip.mp4", PartNumber=n)["ContentRange"]
             for n in range(1, head["PartsCount"] + 1 if "PartsCount" in head else 4)]
    spans = [tuple(int(x) for x in r.removeprefix("bytes ").split("/")[0].split("-")) for r in parts]
    crcs = b"".join(zlib_crc32(data[first:last + 1]) for first, last in spans)
    assert spans[-1][1] == len(data) - 1 and len(spans) == 3
    assert head["ChecksumCRC32"] == base64.b64encode(zlib_crc32(crcs)).decode() + "-3"
    assert head["ContentLength"] == len(data) == result.size


def zlib_crc32(data: bytes) -> bytes:
    import zlib
    return zlib.crc32(data).to_bytes(4, "big")


async def test_s3_refuses_a_single_put_whose_bytes_differ_from_the_gateways_digest(s3_server):
    storage = S3Storage(S3Settings(**s3_config(s3_server)))
    await storage.start()
    meta: dict[str, str] = {}

    async def sealed_wrongly():
        yield b"what was hashed is not what is sent"
        meta["sha256"] = hashlib.sha256(b"something else").hexdigest()

    with pytest.raises(StorageError, match="BadDigest"):
        await storage.put("x/bad", sealed_wrongly(), "text/plain", meta)
    assert boto3_client(s3_server.url).list_objects_v2(Bucket=storage.settings.bucket)["KeyCount"] == 0
    await storage.close()


async def test_failed_multipart_upload_leaves_no_parts(s3_server):
    storage = S3Storage(S3Settings(**s3_config(s3_server)))
    await storage.start()

    async def breaks_after_two_parts():
        for _ in range(20):  # 20 MiB, parts of 5 MiB
            yield b"\0" * MiB
        raise ConnectionResetError("provider went away")

    with pytest.raises(ConnectionResetError):
        await storage.put("x/broken", breaks_after_two_parts(), "video/mp4", {})
    assert uploads(s3_server, storage.settings.bucket) == []
    assert boto3_client(s3_server.url).list_objects_v2(Bucket=storage.settings.bucket).get("KeyCount") == 0
    assert storage.unaborted == {}
    await storage.close()


class FaultyS3Proxy:
    """An HTTP proxy in front of a real S3 server (SeaweedFS) that can fail on purpose: with
    ``down`` every request gets a ``503 ServiceUnavailable``; the next ``fail_aborts``
    ``AbortMultipartUpload`` requests (``DELETE ...?uploadId=``) get a ``500 InternalError``, as from
    a restarted server not quite ready. Everything else is passed on as it is (the ``Host`` header
    too, so that the client's SigV4 signature still holds)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.down = False
        self.fail_aborts = 0
        self.aborts = 0  # AbortMultipartUpload requests seen
        self.app = web.Application(client_max_size=64 * MiB)
        self.app.router.add_route("*", "/{path:.*}", self.forward)

    @staticmethod
    def _error(status: int, code: str) -> web.Response:
        return web.Response(status=status, content_type="application/xml",
                            text=f"<Error><Code>{code}</Code><Message>{code}</Message></Error>")

    async def forward(self, request: web.Request) -> web.Response:
        aborting = request.method == "DELETE" and "uploadId" in request.query
        self.aborts += aborting
        if self.down:
            return self._error(503, "ServiceUnavailable")
        if aborting and self.fail_aborts > 0:
            self.fail_aborts -= 1
            return self._error(500, "InternalError")
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length",)}
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            async with http.request(request.method, self.upstream + request.path_qs, data=body,
                                    headers=headers, allow_redirects=False) as resp:
                payload = await resp.read()
                kept = {k: v for k, v in resp.headers.items()
                        if k.lower() not in ("content-length", "transfer-encoding", "connection")}
                return web.Response(status=resp.status, body=payload, headers=kept)


async def test_a_failed_abort_is_retried_soon_after_s3_answers_again(aiohttp_server, s3_server):
    """A multipart upload whose abort failed stays recorded through an outage of S3 (many failing
    puts meanwhile); when S3 answers a put again, the abort is retried at once, and when that try
    fails too (a server not quite ready) the next one comes within seconds, not after the backoff
    the outage built up."""
    proxy = FaultyS3Proxy(s3_server.url)
    server = await aiohttp_server(proxy.app, host="127.0.0.1")
    cfg = s3_config(s3_server, part_size=5 * MiB, multipart_threshold=5 * MiB)
    storage = S3Storage(S3Settings(**{**cfg, "endpoint_url": str(server.make_url("")).rstrip("/")}))
    await storage.start()

    async def breaks_after_a_part():
        for _ in range(6):
            yield b"\0" * MiB
        raise ConnectionResetError("provider went away")

    async def small():
        yield b"hello"

    proxy.fail_aborts = 1
    with pytest.raises(ConnectionResetError):
        await storage.put("x/broken", breaks_after_a_part(), "video/mp4", {})
    [pending] = uploads(s3_server, storage.settings.bucket)
    assert list(storage.unaborted) == [pending["UploadId"]]

    proxy.down = True  # an outage: every put fails, the abort's retries too
    for n in range(8):
        with pytest.raises(StorageError):
            await storage.put(f"x/during-{n}", small(), "text/plain", {})
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)
    assert list(storage.unaborted) == [pending["UploadId"]]

    proxy.down, proxy.fail_aborts = False, 1  # back, but the first abort it sees fails
    seen = proxy.aborts
    await storage.put("x/after", small(), "text/plain", {})
    await until(lambda: proxy.aborts > seen, timeout=2, what="an abort right after S3 answered")
    await until(lambda: not storage.unaborted and not uploads(s3_server, storage.settings.bucket),
                timeout=5, what="the upload aborted on a try soon after")
    await storage.close()


async def test_s3_outage_loses_nothing(start_gateway, waha, sink, own_s3_server, http):
    cfg = s3_config(own_s3_server)
    gw = await start_gateway(storage={"backend": "s3", "s3": cfg},
                             queue={"max_attempts": 2, "backoff_base": 0.05, "backoff_max": 0.3})
    await asyncio.to_thread(own_s3_server.stop, 0.5)
    async with http.get(f"{gw.url}/readyz") as r:
        assert r.status == 503 and (await r.json())["storage"] != "ok"
    names = ["photo.jpg", "clip.mp4", "song.mp3", "report.docx", "sticker.webp"]
    for name in names:
        resp = await gw.post_waha(waha_payload(waha.add_file(MEDIA / name), message_id=f"out-{name}"))
        assert resp.status == 200
    await asyncio.sleep(1.0)  # several attempts fail meanwhile, more than max_attempts
    assert sink.deliveries == []
    assert await gw.count("jobs", "state = 'dead'") == 0

    await asyncio.to_thread(own_s3_server.start)  # same data directory, same ports
    deliveries = await sink.wait_for(len(names), timeout=20)
    got = {d.json["payload"]["id"]: d.json["payload"]["media"]["gateway"]["sha256"] for d in deliveries}
    assert got == {f"out-{n}": MANIFEST[n]["sha256_hex"] for n in names}
    assert boto3_client(own_s3_server.url).list_objects_v2(Bucket=cfg["bucket"])["KeyCount"] == len(names)
    async with http.get(f"{gw.url}/readyz") as r:
        assert r.status == 200


class PausingWaha(WahaEmulator):
    """The WAHA emulator; the first download of a file stops after ``pause_after`` bytes
    (``paused`` is set) until ``resume`` is set. Later downloads run straight through."""

    def __init__(self, pause_after: int, **kwargs):
        super().__init__(**kwargs)
        self.pause_after = pause_after
        self.paused, self.resume = asyncio.Event(), asyncio.Event()
        self.downloads = 0

    async def _serve_file(self, request: web.Request) -> web.StreamResponse:
        self.downloads += 1
        entry = self.files.get((request.match_info["session"], request.match_info["file"]))
        if self.downloads > 1 or entry is None:
            return await super()._serve_file(request)
        resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        with entry.path.open("rb") as fh:
            while chunk := fh.read(64 * 1024):
                await resp.write(chunk)
                sent += len(chunk)
                if sent >= self.pause_after and not self.resume.is_set():
                    self.paused.set()
                    await self.resume.wait()
        await resp.write_eof()
        return resp


async def test_s3_stopped_during_a_multipart_upload(aiohttp_server, start_gateway, sink, own_s3_server,
                                                    tmp_path: Path):
    """S3 goes away with a multipart upload in flight and comes back (same data): the job is
    deferred, never dead; the message is then stored and forwarded; the upload the failed attempt
    began is aborted once S3 answers again, so no incomplete upload of the gateway's remains."""
    waha = PausingWaha(11 * MiB, api_key="waha-key", workdir=tmp_path / "waha-files")
    server = await aiohttp_server(waha.app, host="127.0.0.1")
    waha.base_url = str(server.make_url("")).rstrip("/")
    video = tmp_path / "long.mp4"
    video.write_bytes((MEDIA / "clip.mp4").read_bytes() + os.urandom(12 * MiB))
    sha256 = hashlib.sha256(video.read_bytes()).hexdigest()
    cfg = s3_config(own_s3_server, multipart_threshold=5 * MiB, part_size=5 * MiB, max_concurrency=1)
    gw = await start_gateway(
        providers={"waha": {"base_url": waha.base_url, "api_key": waha.api_key}},
        storage={"backend": "s3", "s3": cfg},
        queue={"max_attempts": 2, "backoff_base": 0.05, "backoff_max": 0.3})
    storage = gw.app[STORAGE]
    resp = await gw.post_waha(waha_payload(waha.add_file(video), message_id="mp-1", mimetype="video/mp4"))
    assert resp.status == 200

    await asyncio.wait_for(waha.paused.wait(), 20)  # 2 parts handed to S3, the 3rd filling
    [pending] = uploads(own_s3_server, cfg["bucket"])
    await asyncio.to_thread(own_s3_server.stop, 0.5)
    waha.resume.set()  # the next part meets a dead S3; so does the abort
    await until(lambda: pending["UploadId"] in storage.unaborted, what="the failed abort to be recorded")
    await asyncio.sleep(1.0)  # several attempts fail meanwhile, more than max_attempts
    assert sink.deliveries == []
    assert await gw.count("jobs", "state = 'dead'") == 0
    assert await gw.count("jobs", "kind = 'ingest' AND state IN ('queued', 'running') AND attempts > 2") == 1

    await asyncio.to_thread(own_s3_server.start)  # same data directory: the upload is still there
    [d] = await sink.wait_for(1, timeout=30)
    assert d.json["payload"]["media"]["gateway"]["sha256"] == sha256
    await until(lambda: uploads(own_s3_server, cfg["bucket"]) == [], what="no incomplete upload")
    assert storage.unaborted == {}
    client = boto3_client(own_s3_server.url)
    [obj] = client.list_objects_v2(Bucket=cfg["bucket"])["Contents"]
    body = client.get_object(Bucket=cfg["bucket"], Key=obj["Key"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256
    assert await gw.count("jobs", "state = 'dead'") == 0


async def test_cleanup_aborts_incomplete_uploads_left_behind(start_gateway, s3_server, http):
    """Uploads a crash left (no abort was ever tried) go in the retention cleanup once older than
    ``orphan_grace_hours``: counted in the report and in a metric; foreign uploads stay."""
    cfg = s3_config(s3_server, prefix="gw/")
    gw = await start_gateway(storage={"backend": "s3", "s3": cfg}, retention={"orphan_grace_hours": 24})
    client = boto3_client(s3_server.url)
    bucket = cfg["bucket"]
    ours = f"gw/waha/acct/2026/11/30/video/{new_media_id()}.mp4"
    started = client.create_multipart_upload(Bucket=bucket, Key=ours)
    client.upload_part(Bucket=bucket, Key=ours, UploadId=started["UploadId"], PartNumber=1, Body=b"x" * 1000)
    foreign = client.create_multipart_upload(Bucket=bucket, Key="gw/someone-else/backup.tar")
    outside = client.create_multipart_upload(Bucket=bucket, Key="other/m_" + "0" * 27)
    retention = gw.app[RETENTION]
    now = time.time()

    retention.clock = lambda: now + 23 * 3600  # within the grace period: may still be going on
    report = await retention.run()
    assert (report.aborted_uploads, report.uploads_in_grace) == (0, 1)
    assert len(uploads(s3_server, bucket)) == 3

    retention.clock = lambda: now + 25 * 3600
    dry = await retention.run(dry_run=True)
    assert (dry.aborted_uploads, dry.uploads_in_grace) == (1, 0) and len(uploads(s3_server, bucket)) == 3
    report = await retention.run()
    assert (report.aborted_uploads, report.uploads_in_grace, report.failed) == (1, 0, 0)
    assert report.to_dict()["aborted_uploads"] == 1
    left = {u["UploadId"] for u in uploads(s3_server, bucket)}
    assert left == {foreign["UploadId"], outside["UploadId"]}
    async with http.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    assert 'gateway_cleanup_aborted_uploads_total{backend="s3"} 1.0' in text
    for u in (foreign, outside):
        client.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])


async def test_gateway_cleanup_command_reports_the_aborted_uploads(s3_server, tmp_path: Path):
    cfg = s3_config(s3_server)
    client = boto3_client(s3_server.url)
    client.create_bucket(Bucket=cfg["bucket"])
    key = f"waha/acct/2026/11/30/video/{new_media_id()}.mp4"
    client.create_multipart_upload(Bucket=cfg["bucket"], Key=key)
    config = write_toml(tmp_path / "cleanup.toml", {
        "catalog": {"path": str(tmp_path / "var" / "gateway.db")}, "storage": {"backend": "s3", "s3": cfg},
        "retention": {"orphan_grace_hours": 0}, "log": {"format": "json"}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "cleanup", "--config", str(config), "--verbose", cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0, out
    assert "aborted 1 incomplete uploads; 0 within the grace period" in out
    assert "aborted       incomplete_upload" in out and key in out
    assert uploads(s3_server, cfg["bucket"]) == []


async def test_redirect_serving(start_gateway, s3_server, waha, sink, http):
    gw = await start_gateway(storage={"backend": "s3", "serving": "redirect", "s3": s3_config(s3_server)})
    await gw.post_waha(waha_payload(waha.add_file(MEDIA / "photo.jpg"), message_id="redir-1"))
    [d] = await sink.wait_for(1)
    link = d.json["payload"]["media"]["url"]
    async with http.get(link, allow_redirects=False) as r:
        assert r.status == 302
        location = r.headers["Location"]
    assert location.startswith(s3_server.url) and "X-Amz-Signature" in location
    async with http.get(location) as r:
        assert hashlib.sha256(await r.read()).hexdigest() == MANIFEST["photo.jpg"]["sha256_hex"]
    async with http.get(link.replace("sig=", "sig=x"), allow_redirects=False) as r:
        assert r.status == 403  # the gateway's own signature is checked before any redirect


async def test_category_buckets_and_sse(start_gateway, s3_server, waha, sink, http):
    cfg = s3_config(s3_server, sse="AES256")
    video_bucket = cfg["bucket"] + "-video"
    cfg["category_buckets"] = {"video": video_bucket}
    gw = await start_gateway(storage={"backend": "s3", "s3": cfg})
    await gw.post_waha(waha_payload(waha.add_file(MEDIA / "clip.mp4"), message_id="cat-1", mimetype="video/mp4"))
    await gw.post_waha(waha_payload(waha.add_file(MEDIA / "photo.jpg"), message_id="cat-2"))
    deliveries = await sink.wait_for(2)
    client = boto3_client(s3_server.url)
    [video] = client.list_objects_v2(Bucket=video_bucket)["Contents"]
    [photo] = client.list_objects_v2(Bucket=cfg["bucket"])["Contents"]
    assert "/video/" in video["Key"] and "/image/" in photo["Key"]
    assert client.head_object(Bucket=video_bucket, Key=video["Key"])["ServerSideEncryption"] == "AES256"
    for d in deliveries:  # served from the right bucket
        async with http.get(d.json["payload"]["media"]["url"]) as r:
            assert r.status == 200
            assert hashlib.sha256(await r.read()).hexdigest() == d.json["payload"]["media"]["gateway"]["sha256"]
