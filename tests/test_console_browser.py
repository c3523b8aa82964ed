"""The operator console at ``/console``, driven in a real headless Chromium (Debian's ``chromium``,
through Playwright; ``scripts/system-deps`` installs it). Each test saves screenshots of the pages
it visits under ``<basetemp>/console-screenshots/``.

The browser may reach only 127.0.0.1 (``--host-resolver-rules``): a page that fetched anything from
outside the gateway would fail to load it (and :func:`test_pages_fetch_nothing_from_outside`
checks every request)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright import async_api as playwright_api
from aiohttp import web
from yarl import URL

from gateway.keys import CATALOG
from gateway.web.console import QUEUE_PAGE
from tests.conftest import MANIFEST, MEDIA, waha_payload



CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"]
ADMIN, T1, T2, READER, WRITER = "console-admin", "console-t1", "console-t2", "console-reader", "console-writer"
KEYS = [{"name": "admin", "key": ADMIN, "scopes": ["admin"]},
        {"name": "t1", "key": T1, "scopes": ["read", "write"], "tenant": "t1"},
        {"name": "t2", "key": T2, "scopes": ["read", "write"], "tenant": "t2"},
        {"name": "reader", "key": READER, "scopes": ["read"]},
        {"name": "writer", "key": WRITER, "scopes": ["write"]}]
IMAGES = sorted(n for n, e in MANIFEST.items() if e["category"] == "image" and n != "not_really_an_image.jpg")
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "console-screenshots"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/system-deps (Debian's chromium package)")
    async with playwright_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def gw(start_gateway):
    return await start_gateway(api={"keys": KEYS}, retention={"enabled": False})


async def upload(gw, name: str, key: str = ADMIN, filename: str | None = None) -> dict:
    form = aiohttp.FormData()
    form.add_field("file", (MEDIA / name).read_bytes(), filename=filename or name,
                   content_type="application/octet-stream")
    async with gw.http.post(f"{gw.url}/api/v1/files", data=form, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def sign_in(browser, gw, key: str, viewport: dict | None = None):
    context = await browser.new_context(viewport=viewport or {"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(f"{gw.url}/console/gallery")
    assert page.url.startswith(f"{gw.url}/console/login")  # not signed in: sent to the sign-in form
    await page.fill("#key", key)
    await page.press("#key", "Enter")  # keyboard only
    await page.wait_for_url(f"{gw.url}/console/gallery")
    return page


async def shot(page, screenshots: Path, name: str) -> None:
    await page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)


async def loaded(img: playwright_api.Locator, timeout: float = 10.0) -> None:
    """Wait until the image ``img`` has loaded. Polled from here: Playwright's ``wait_for_function``
    polls in the page with ``new Function`` when its first check is false, and the console's CSP
    (no ``'unsafe-eval'``) refuses that, so it failed whenever the image was still loading."""
    deadline = time.monotonic() + timeout
    while not await img.evaluate("i => i.complete && i.naturalWidth > 0"):
        assert time.monotonic() < deadline, f"{img} did not load in {timeout} s"
        await asyncio.sleep(0.05)


async def test_sign_in_and_a_thumbnail_for_every_image(browser, gw, screenshots):
    uploaded = {name: await upload(gw, name) for name in [*IMAGES, "clip.mp4", "invoice.pdf", "voice.ogg"]}
    page = await sign_in(browser, gw, ADMIN)
    tiles = page.locator(".tile")
    assert await tiles.count() == len(uploaded)
    # newest first
    assert await page.locator(".tile .name").all_inner_texts() == list(reversed(uploaded))
    for name in IMAGES:
        img = page.locator(f'.tile img[alt="{name}"]')
        await img.scroll_into_view_if_needed()
        await loaded(img)
        assert max(await img.evaluate("i => [i.naturalWidth, i.naturalHeight]")) == 256
    assert await page.locator(".tile img").count() == len(IMAGES)  # others show their category
    await shot(page, screenshots, "gallery")
    # a wrong key is refused and sets no session
    context = await browser.new_context()
    other = await context.new_page()
    await other.goto(f"{gw.url}/console/login")
    await other.fill("#key", "not-a-key")
    await other.click("button[type=submit]")
    assert "not valid" in await other.locator(".error").inner_text()
    assert not [c for c in await context.cookies() if c["name"] == "gateway_console"]
    cookie = next(c for c in await page.context.cookies() if c["name"] == "gateway_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and ADMIN not in cookie["value"]


async def test_filter_by_category_and_page_with_the_cursor(browser, gw, screenshots):
    for name in [*IMAGES, "clip.mp4", "song.mp3"]:
        await upload(gw, name)
    page = await sign_in(browser, gw, ADMIN, PHONE)  # a phone's width
    await page.select_option("select[name=category]", "image")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_url("**/console/gallery?*category=image*")
    assert sorted(await page.locator(".tile .name").all_inner_texts()) == IMAGES
    assert set(await page.locator(".tile").evaluate_all("ts => ts.map(t => t.dataset.category)")) == {"image"}
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"]  # nothing wider than the phone
    await shot(page, screenshots, "gallery-phone-filtered")
    await page.fill("input[name=filename]", "clip")
    await page.select_option("select[name=category]", "")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_url("**filename=clip*")
    assert await page.locator(".tile .name").all_inner_texts() == ["clip.mp4"]


async def test_gallery_pages_with_the_cursor(browser, gw):
    catalog = gw.app[CATALOG]
    template = await catalog.get_media((await upload(gw, "invoice.pdf"))["id"])
    for n in range(60):  # more than a page (48)
        await catalog.insert_media({**template, "id": f"m_page{n:02d}", "key": f"k/{n}", "source_key": None,
                                    "filename": f"row{n:02d}.pdf", "created_at": template["created_at"] - 100 + n})
    page = await sign_in(browser, gw, ADMIN)
    first = await page.locator(".tile .name").all_inner_texts()
    assert len(first) == 48 and first[0] == "invoice.pdf" and first[1] == "row59.pdf"
    await page.click("a[rel=next]")
    second = await page.locator(".tile .name").all_inner_texts()
    assert len(second) == 13 and second[-1] == "row00.pdf" and not set(first) & set(second)
    assert await page.locator("a[rel=next]").count() == 0


async def test_open_a_video_and_seek_it(browser, gw, screenshots):
    info = await upload(gw, "clip.mp4")
    page = await sign_in(browser, gw, ADMIN)
    media_answers: list[tuple[int, str | None]] = []
    page.on("response", lambda r: media_answers.append((r.status, r.headers.get("content-range")))
            if "/media/" in r.url else None)
    await page.click('.tile a:has-text("clip.mp4")')
    await page.wait_for_url(f"**/console/files/{info['id']}")
    video = page.locator("video")
    await video.evaluate("v => new Promise((ok, fail) => { if (v.readyState >= 1) ok(); "
                         "v.onloadedmetadata = ok; v.onerror = () => fail(v.error && v.error.message); })")
    duration = await video.evaluate("v => v.duration")
    assert duration > 1
    target = round(duration * 0.6, 2)
    seeked = await video.evaluate("(v, t) => new Promise(ok => { v.onseeked = () => ok(v.currentTime); "
                                  "v.currentTime = t; })", target)
    assert abs(seeked - target) < 0.5
    await video.evaluate("v => new Promise(ok => { if (v.readyState >= 2) ok(); v.oncanplay = ok; })")
    # the player asked for byte ranges and got them
    assert any(status == 206 and (rng or "").startswith("bytes ") for status, rng in media_answers), media_answers
    await shot(page, screenshots, "detail-video")
    assert await page.locator("dd", has_text=MANIFEST["clip.mp4"]["sha256_hex"]).count() == 1


async def test_copy_a_link_and_fetch_it(browser, gw, screenshots):
    info = await upload(gw, "invoice.pdf")
    page = await sign_in(browser, gw, ADMIN)
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gw.url)
    await page.goto(f"{gw.url}/console/files/{info['id']}")
    await page.select_option("select[name=ttl]", "86400")
    await page.click("text=Make a link")
    await page.click("button[data-copy]")
    await playwright_api.expect(page.locator("button[data-copy]")).to_have_text("Copied")
    link = await page.evaluate("navigator.clipboard.readText()")
    assert link == await page.input_value("#link") and "sig=" in link
    exp = int(URL(link).query["exp"])
    assert abs(exp - (time.time() + 86400)) < 60  # the chosen expiry
    await shot(page, screenshots, "detail-pdf-link")
    async with aiohttp.ClientSession() as http:
        async with http.get(link) as r:
            assert r.status == 200 and await r.read() == (MEDIA / "invoice.pdf").read_bytes()


async def test_a_forwarded_image_shows_its_message(browser, gw, waha, sink):
    body = json.dumps(waha_payload(waha.add_file(MEDIA / "photo.jpg"), message_id="console-msg-1", filename="photo.jpg"))
    async with gw.http.post(f"{gw.url}/webhooks/waha", data=body) as r:
        assert r.status == 200
    [delivery] = await sink.wait_for(1, timeout=20)
    media_id = delivery.json["payload"]["media"]["gateway"]["id"]
    page = await sign_in(browser, gw, ADMIN)
    await page.locator('.tile img').evaluate("i => i.decode()")
    await page.goto(f"{gw.url}/console/files/{media_id}")
    message = await page.locator("section", has_text="The message it came with").inner_text()
    assert "waha" in message and "console-msg-1" in message
    assert await page.locator(".preview img").evaluate("i => i.decode().then(() => i.naturalWidth)") > 0


async def test_delete_an_object_with_confirmation(browser, gw, screenshots):
    keep, gone = await upload(gw, "song.mp3"), await upload(gw, "photo.jpg")
    page = await sign_in(browser, gw, ADMIN)
    await page.goto(f"{gw.url}/console/files/{gone['id']}")
    messages: list[str] = []

    async def refuse(dialog):
        messages.append(dialog.message)
        await dialog.dismiss()
    page.once("dialog", refuse)
    await page.click("button.danger")
    await asyncio.sleep(0.2)
    assert messages and "cannot be undone" in messages[0]
    assert await gw.app[CATALOG].get_media(gone["id"]) is not None  # dismissed: nothing deleted

    async def accept(dialog):
        await dialog.accept()
    page.once("dialog", accept)
    await page.click("button.danger")
    await page.wait_for_url(f"{gw.url}/console/gallery")
    assert await page.locator(".tile .name").all_inner_texts() == ["song.mp3"]
    assert await gw.app[CATALOG].get_media(gone["id"]) is None
    assert await gw.app[CATALOG].get_media(keep["id"]) is not None


async def test_make_public_and_private(browser, gw):
    info = await upload(gw, "photo.jpg")
    page = await sign_in(browser, gw, ADMIN)
    await page.goto(f"{gw.url}/console/files/{info['id']}")
    page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
    await page.click("text=Make public")
    await page.wait_for_selector("text=Make private")
    public = await page.locator("a[href*='/public/']").get_attribute("href")
    async with gw.http.get(public) as r:
        assert r.status == 200
    await page.click("text=Make private")
    await page.wait_for_selector("text=Make public")
    async with gw.http.get(public) as r:
        assert r.status == 404


async def test_forms_without_the_csrf_token_are_refused(browser, gw):
    info = await upload(gw, "photo.jpg")
    page = await sign_in(browser, gw, ADMIN)
    answer = await page.request.post(f"{gw.url}/console/files/{info['id']}/delete", form={"csrf": "forged"})
    assert answer.status == 403
    assert await gw.app[CATALOG].get_media(info["id"]) is not None
    # a read-only key may look but not delete
    reader = await sign_in(browser, gw, READER)
    await reader.goto(f"{gw.url}/console/files/{info['id']}")
    assert await reader.locator("button.danger").count() == 0
    csrf = await reader.locator("input[name=csrf]").first.input_value()
    answer = await reader.request.post(f"{gw.url}/console/files/{info['id']}/delete", form={"csrf": csrf})
    assert answer.status == 403 and "lacks the &#39;write&#39; scope" in await answer.text()  # an HTML page
    # a write-only key may not look; no session, or a tampered one, is not signed in
    writer = await sign_in(browser, gw, WRITER)  # lands on a 403
    assert (await writer.goto(f"{gw.url}/console/gallery")).status == 403
    assert "lacks the 'read' scope" in await writer.locator("[role=alert]").inner_text()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/console/files/{info['id']}/delete", data={"csrf": csrf}) as r:
            assert r.status == 403
        forged = {"Cookie": "gateway_console=" + "0" * 64 + ".9999999999." + "0" * 64}
        async with http.get(f"{gw.url}/console/gallery", headers=forged, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"].startswith("/console/login")
    # signing out ends the session
    await reader.click("text=Sign out")
    await reader.wait_for_url(f"{gw.url}/console/login")
    await reader.goto(f"{gw.url}/console/gallery")
    assert reader.url.startswith(f"{gw.url}/console/login")
    assert await gw.app[CATALOG].get_media(info["id"]) is not None


async def test_a_tenant_key_sees_only_its_tenant(browser, gw, screenshots):
    mine = [await upload(gw, n, T1, f"t1-{n}") for n in ("photo.jpg", "invoice.pdf")]
    theirs = [await upload(gw, n, T2, f"t2-{n}") for n in ("screenshot.png", "clip.mp4")]
    page = await sign_in(browser, gw, T1)
    assert sorted(await page.locator(".tile .name").all_inner_texts()) == sorted(i["filename"] for i in mine)
    await page.goto(f"{gw.url}/console/gallery?filename=t2")
    assert await page.locator(".tile").count() == 0
    for other in theirs:
        answer = await page.goto(f"{gw.url}/console/files/{other['id']}")
        assert answer.status == 404
    await page.goto(f"{gw.url}/console")
    rows = await page.locator("section", has_text="Stored by category").locator("tbody tr").all_inner_texts()
    assert [r.split("\t")[:2] for r in rows] == [["document", "1"], ["image", "1"]], rows
    answer = await page.goto(f"{gw.url}/console/queue")
    assert answer.status == 403
    assert await page.locator("header a", has_text="Queue").count() == 0
    await page.goto(f"{gw.url}/console/gallery")
    await shot(page, screenshots, "gallery-tenant")


async def job_state(gw, job_id: int, awaited: str) -> str:
    """The job's state once it is ``awaited`` (or after 10 s)."""
    for _ in range(200):
        state = (await gw.app[CATALOG].get_job(job_id))["state"]
        if state == awaited:
            break
        await asyncio.sleep(0.05)
    return state


async def refusing_bot(start_gateway, aiohttp_server) -> tuple[Any, asyncio.Event, list[str]]:
    """A gateway whose one target, ``strict``, answers 400 (so each delivery dies at once) until
    the returned event is set, then 2xx: ``(gateway, event, Idempotency-Keys received)``."""
    accept = asyncio.Event()
    received: list[str] = []

    async def hook(request):
        if not accept.is_set():
            return web.json_response({"error": "not yet"}, status=400)
        received.append(request.headers["Idempotency-Key"])
        return web.json_response({})
    target = web.Application()
    target.router.add_post("/hook", hook)
    server = await aiohttp_server(target, host="127.0.0.1")
    gw = await start_gateway(api={"keys": KEYS}, retention={"enabled": False},
                             targets=[{"name": "strict", "url": str(server.make_url("/hook"))}])
    return gw, accept, received


async def test_queue_retry_a_dead_job(browser, start_gateway, aiohttp_server, screenshots):
    gw, accept, received = await refusing_bot(start_gateway, aiohttp_server)
    for status in ("WORKING", "STOPPED"):
        await gw.post_waha({"event": "session.status", "session": "default", "payload": {"status": status}})
    for _ in range(200):
        dead = await gw.app[CATALOG].list_jobs(state="dead")
        if len(dead) == 2:
            break
        await asyncio.sleep(0.05)
    job, other = sorted(dead, key=lambda j: j["id"])
    page = await sign_in(browser, gw, ADMIN)
    await page.goto(f"{gw.url}/console/queue")
    row = page.locator(f"#job-{job['id']}")
    assert "400" in await row.locator(".error-text").inner_text()
    assert "none waiting" in await page.locator("#oldest").inner_text()
    await shot(page, screenshots, "queue")
    accept.set()
    await row.locator("button").click()
    await page.wait_for_url(f"{gw.url}/console/queue")
    assert await job_state(gw, job["id"], "done") == "done" and len(received) == 1
    await page.reload()
    assert await page.locator(f"#job-{job['id']}").count() == 0
    assert (await gw.app[CATALOG].get_job(other["id"]))["state"] == "dead"  # only the one retried
    page.once("dialog", lambda d: asyncio.ensure_future(d.accept()))
    await page.click("text=Retry all dead deliver jobs (1)")
    await page.wait_for_url(f"{gw.url}/console/queue")
    assert await job_state(gw, other["id"], "done") == "done" and len(received) == 2
    await page.reload()
    assert "empty" in await page.locator("section", has_text="Dead letter").inner_text()


async def test_queue_pages_through_many_jobs_and_retries_every_dead_one(browser, start_gateway, aiohttp_server):
    gw, accept, received = await refusing_bot(start_gateway, aiohttp_server)
    count = QUEUE_PAGE + 5  # more dead jobs than a page shows, or a retry reads at once
    for n in range(count):
        await gw.post_waha({"event": "session.status", "session": "default", "payload": {"status": f"S{n}"}})
    for _ in range(400):
        dead = await gw.app[CATALOG].list_jobs(state="dead")
        if len(dead) == count:
            break
        await asyncio.sleep(0.05)
    assert len(dead) == count
    ids = sorted((j["id"] for j in dead), reverse=True)
    page = await sign_in(browser, gw, ADMIN)
    await page.goto(f"{gw.url}/console/queue")
    jobs = page.locator("section", has_text="Jobs").last.locator("tbody tr")
    assert [int(t.split("\t")[0]) for t in await jobs.all_inner_texts()] == ids[:QUEUE_PAGE]
    await page.click("text=Older jobs")
    assert [int(t.split("\t")[0]) for t in await jobs.all_inner_texts()] == ids[QUEUE_PAGE:]
    assert await page.locator("text=Older jobs").count() == 0
    accept.set()
    page.once("dialog", lambda d: asyncio.ensure_future(d.accept()))
    await page.click(f"text=Retry all dead deliver jobs ({count})")
    await page.wait_for_url(f"{gw.url}/console/queue")
    for _ in range(400):
        if len(set(received)) == count:
            break
        await asyncio.sleep(0.05)
    assert len(set(received)) == count and await gw.app[CATALOG].list_jobs(state="dead") == []


async def test_overview_chart_readiness_and_a_cleanup_dry_run(browser, gw, screenshots):
    await upload(gw, "photo.jpg")
    for n in range(3):
        await gw.post_waha({"event": "session.status", "session": "default", "payload": {"status": f"S{n}"}})
    page = await sign_in(browser, gw, ADMIN)
    await page.goto(f"{gw.url}/console")
    assert await page.locator("svg.chart rect").count() == 60
    assert "3 events" in await page.locator("section", has_text="Webhook events").inner_text()
    assert await page.locator("dd.ok").count() == 3  # catalog, storage and the media backlog ready
    await page.click("text=Run a cleanup dry run")
    await page.wait_for_selector("#report")
    assert "dry run" in await page.locator("#report").inner_text()
    # a dry run is not a cleanup run: the last real one is shown
    assert "No cleanup has run yet" in await page.locator("section", has_text="Last cleanup").inner_text()
    async with gw.http.post(f"{gw.url}/api/v1/admin/cleanup", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 200
    await page.goto(f"{gw.url}/console")
    last = await page.locator("section", has_text="Last cleanup").inner_text()
    assert "api" in last and "ok" in last
    await shot(page, screenshots, "overview")


async def test_pages_fetch_nothing_from_outside(browser, gw):
    info = await upload(gw, "photo.jpg")
    page = await sign_in(browser, gw, ADMIN)
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    for path in ("/console", "/console/gallery", f"/console/files/{info['id']}", "/console/queue"):
        await page.goto(gw.url + path)
        await page.wait_for_load_state("networkidle")
        await page.keyboard.press("Tab")  # the skip link takes the focus first
        assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
    assert urls and all(u.startswith(gw.url + "/") for u in urls), [u for u in urls if not u.startswith(gw.url)]
