"""``GET /media/{id}/thumbnail``: every image fixture gets one, stored beside the original and
deleted with it; a decompression bomb and a non-image declared as an image are refused without
harm; forwarded images carry a thumbnail link in ``media.gateway``."""

from __future__ import annotations

import io
import json
import time

import aiohttp
import pytest
from PIL import Image
from yarl import URL

from gateway.keys import CATALOG, LINKS, MEDIA_STORE, RETENTION, STORAGE
from gateway.sdk.storage import ObjectNotFound
from gateway import thumbnails
from gateway.thumbnails import SIZES, thumbnail_key
from tests.conftest import MANIFEST, MEDIA, waha_payload

ADMIN = "thumb-admin"
KEYS = [{"name": "admin", "key": ADMIN, "scopes": ["admin"]}]
IMAGES = [name for name, entry in MANIFEST.items() if entry.get("category") in ("image", "sticker")
          and name != "not_really_an_image.jpg"]


@pytest.fixture
async def gw(start_gateway):
    return await start_gateway(api={"keys": KEYS}, retention={"enabled": False})


async def upload(gw, data: bytes, filename: str, content_type: str = "application/octet-stream") -> dict:
    form = aiohttp.FormData()
    form.add_field("file", data, filename=filename, content_type=content_type)
    async with gw.http.post(f"{gw.url}/api/v1/files", data=form, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def get(gw, url: str) -> tuple[int, bytes, str]:
    async with gw.http.get(url) as r:
        return r.status, await r.read(), r.content_type


def test_the_image_fixtures_are_there():
    assert sorted(IMAGES) == ["photo.jpg", "screenshot.png", "sticker.webp"]


@pytest.mark.parametrize("name", IMAGES)
async def test_every_image_fixture_gets_a_thumbnail_stored_beside_it(gw, name):
    info = await upload(gw, (MEDIA / name).read_bytes(), name)
    assert info["links"]["thumbnail"]
    record = await gw.app[CATALOG].get_media(info["id"])
    with pytest.raises(ObjectNotFound):  # made on first request, not before
        await gw.app[STORAGE].stat(thumbnail_key(record["key"], 256), bucket=record["bucket"])
    status, body, ctype = await get(gw, info["links"]["thumbnail"])
    assert (status, ctype) == (200, "image/webp")
    image = Image.open(io.BytesIO(body))
    original = Image.open(MEDIA / name)
    assert max(image.size) == min(256, max(original.size))
    assert abs(image.size[0] / image.size[1] - original.size[0] / original.size[1]) < 0.05  # aspect kept
    stat = await gw.app[STORAGE].stat(thumbnail_key(record["key"], 256), bucket=record["bucket"])
    assert stat.size == len(body)
    # the second request reads the stored one back; other sizes are bounded as asked
    assert await get(gw, info["links"]["thumbnail"]) == (200, body, "image/webp")
    for size in SIZES:
        status, small, _ = await get(gw, gw.app[LINKS].thumbnail_link(info["id"], size))
        assert status == 200 and max(Image.open(io.BytesIO(small)).size) <= size


async def test_deleting_the_original_deletes_its_thumbnails(gw):
    info = await upload(gw, (MEDIA / "photo.jpg").read_bytes(), "photo.jpg")
    record = await gw.app[CATALOG].get_media(info["id"])
    for size in (128, 512):
        assert (await get(gw, gw.app[LINKS].thumbnail_link(info["id"], size)))[0] == 200
    async with gw.http.delete(f"{gw.url}/api/v1/files/{info['id']}", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 204
    for size in SIZES:
        with pytest.raises(ObjectNotFound):
            await gw.app[STORAGE].stat(thumbnail_key(record["key"], size), bucket=record["bucket"])
    assert (await get(gw, info["links"]["thumbnail"]))[0] == 404
    assert [o.key async for o in gw.app[STORAGE].list()] == []  # nothing left behind


async def test_the_retention_cleanup_deletes_thumbnails_with_their_original(gw):
    form = aiohttp.FormData()
    form.add_field("expires_at", str(int(time.time()) + 60))
    form.add_field("file", (MEDIA / "photo.jpg").read_bytes(), filename="photo.jpg")
    async with gw.http.post(f"{gw.url}/api/v1/files", data=form, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        info = await r.json()
    assert (await get(gw, info["links"]["thumbnail"]))[0] == 200
    assert len([o async for o in gw.app[STORAGE].list()]) == 2
    gw.app[RETENTION].clock = lambda: time.time() + 120
    report = await gw.app[RETENTION].run()
    assert report.deleted["expires_at"]["objects"] == 1
    assert [o.key async for o in gw.app[STORAGE].list()] == []


@pytest.mark.parametrize("side", [8000, 12000])  # over our bound; over Pillow's own too
async def test_a_decompression_bomb_is_refused_without_harm(gw, side):
    bomb = io.BytesIO()
    Image.new("1", (side, side)).save(bomb, "PNG")  # 64 or 144 million pixels in a few kilobytes
    assert len(bomb.getvalue()) < 100_000
    info = await upload(gw, bomb.getvalue(), "bomb.png")
    assert info["category"] == "image"
    started = time.monotonic()
    status, body, _ = await get(gw, info["links"]["thumbnail"])
    assert status == 422 and "pixels" in json.loads(body)["error"]
    assert time.monotonic() - started < 2  # refused from the header, never decoded
    record = await gw.app[CATALOG].get_media(info["id"])
    with pytest.raises(ObjectNotFound):
        await gw.app[STORAGE].stat(thumbnail_key(record["key"], 256), bucket=record["bucket"])
    async with gw.http.get(f"{gw.url}/healthz") as r:  # the daemon is fine
        assert r.status == 200


async def test_a_non_image_declared_as_an_image_is_refused(gw):
    elf = (MEDIA / "not_really_an_image.jpg").read_bytes()
    info = await upload(gw, elf, "not_really_an_image.jpg", "image/jpeg")
    # the content decides the category: an ELF is no image, so it has no thumbnail link ...
    assert info["category"] != "image" and info["links"]["thumbnail"] is None
    status, body, _ = await get(gw, gw.app[LINKS].thumbnail_link(info["id"], 256))
    assert status == 422 and "has no thumbnail" in json.loads(body)["error"]
    # ... and a row that says "image" over bytes that are not one is refused by the decoder
    await gw.app[MEDIA_STORE].update(info["id"], {"category": "image", "mimetype": "image/jpeg"})  # as the API does
    status, body, _ = await get(gw, gw.app[LINKS].thumbnail_link(info["id"], 256))
    assert status == 422 and "not a decodable image" in json.loads(body)["error"]


async def test_a_rendering_over_the_time_bound_is_refused(gw, monkeypatch):
    info = await upload(gw, (MEDIA / "screenshot.png").read_bytes(), "screenshot.png")
    monkeypatch.setattr(thumbnails, "RENDER_SECONDS", 0.000001)
    status, body, _ = await get(gw, info["links"]["thumbnail"])
    assert status == 422 and "rendering took over" in json.loads(body)["error"]
    monkeypatch.undo()  # the abandoned rendering may still hold one of the two slots: one is free
    assert (await get(gw, info["links"]["thumbnail"]))[0] == 200


async def test_thumbnail_links_are_signed(gw):
    info = await upload(gw, (MEDIA / "photo.jpg").read_bytes(), "photo.jpg")
    url = URL(info["links"]["thumbnail"])
    assert (await get(gw, str(url.update_query(size="512"))))[0] == 403  # the size is signed too
    assert (await get(gw, str(url.update_query(sig="x"))))[0] == 403
    assert (await get(gw, str(url.with_query({}))))[0] == 403
    assert (await get(gw, gw.app[LINKS].thumbnail_link(info["id"], 100)))[0] == 422  # not an offered size
    content = URL(info["links"]["content"])  # a media link does not open the thumbnail
    assert (await get(gw, str(url.with_query(size="256", exp=content.query["exp"], sig=content.query["sig"]))))[0] == 403


async def test_a_stored_file_named_thumbnail_is_still_served_by_its_link(gw):
    info = await upload(gw, b"just text\n", "thumbnail")
    status, body, _ = await get(gw, info["links"]["content"])
    assert (status, body) == (200, b"just text\n")


async def test_forwarded_images_carry_a_thumbnail_link(start_gateway, waha, sink):
    gw = await start_gateway()
    body = json.dumps(waha_payload(waha.add_file(MEDIA / "photo.jpg"), message_id="thumb-1", filename="photo.jpg"))
    async with gw.http.post(f"{gw.url}/webhooks/waha", data=body) as r:
        assert r.status == 200
    [delivery] = await sink.wait_for(1, timeout=20)
    media = delivery.json["payload"]["media"]
    status, thumb, ctype = await get(gw, media["gateway"]["thumbnail"])
    assert (status, ctype) == (200, "image/webp") and max(Image.open(io.BytesIO(thumb)).size) == 256
