"""The operator console at ``/console`` (DESIGN §12): server-rendered pages (aiohttp-jinja2) for a
gateway operator, signed in with an API key.

Signing in checks the key as the API does and keeps only its SHA-256 digest, with an expiry, in a
cookie signed with HMAC-SHA256 (``HttpOnly``, ``SameSite=Strict``, ``Secure`` when the gateway's
base URL is HTTPS; :class:`Session`). Every page re-reads the key's scopes and tenant from the
configuration: a key removed from ``[[api.keys]]`` is signed out, and a tenant key sees exactly what
the files API shows it. Every action is a POST form carrying a CSRF token (an HMAC of the session
under the console's key); a POST without it, or with another session's, is refused (403).

Pages: the overview (counts and bytes, webhook events per minute over the last hour as an inline
SVG, readiness, the last cleanup and a dry-run button), the gallery (thumbnails, the files API's
filters and cursor paging), a file's detail (inline preview, metadata, the message it came with,
signed links, delete and visibility), and the queue (jobs by state and kind, the dead letter, retry).
Assets are served from :data:`STATIC` under ``/console/static/``; nothing is fetched from elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
from aiohttp import web

from gateway.catalog import JOB_STATES
from gateway.keys import API_KEYS, CATALOG, LINKS, MEDIA_STORE, PLUGINS, QUEUE, RETENTION, SETTINGS, STORAGE
from gateway.plugins import notify
from gateway.retention import CleanupBusy
from gateway.sdk.storage import StorageError
from gateway.thumbnails import has_thumbnail
from gateway.web.auth import Principal, Unauthorized
from gateway.web.errors import ApiError
from gateway.web.files import file_view, query_files
from gateway.web.health import readiness
from gateway.web.jobs import job_view
from gateway.web.models import CATEGORY_NAMES, iso

STATIC = Path(__file__).parent / "static"
COOKIE = "gateway_console"
SESSION_SECONDS = 12 * 3600
LINK_EXPIRIES = (("1 hour", 3600), ("1 day", 86400), ("7 days", 7 * 86400))
FILTERS = ("category", "provider", "account", "chat", "direction", "filename", "created_after", "created_before")
PAGE_SIZE = 48
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
CHART_MINUTES = 60
DIRECTIONS = ("inbound", "outbound", "upload")
SESSION: web.AppKey[Session] = web.AppKey("console_session")


class Session:
    """Signs and reads the console's session cookie: ``{key digest}.{expiry}.{HMAC}`` (the key
    itself never leaves the sign-in form), and the CSRF token bound to it."""

    def __init__(self, secret: bytes) -> None:
        self._secret = hmac.new(secret, b"gateway console", hashlib.sha256).digest()

    def _mac(self, message: str) -> str:
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def cookie(self, digest: str, now: float | None = None) -> str:
        """The cookie value for the key of SHA-256 ``digest`` (hex), valid :data:`SESSION_SECONDS`."""
        body = f"{digest}.{int((now or time.time()) + SESSION_SECONDS)}"
        return f"{body}.{self._mac(body)}"

    def digest(self, cookie: str | None, now: float | None = None) -> str | None:
        """The key digest of a well-signed, unexpired ``cookie``, else None."""
        parts = (cookie or "").split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        if not hmac.compare_digest(self._mac(f"{parts[0]}.{parts[1]}"), parts[2]):
            return None
        return parts[0] if int(parts[1]) >= (now or time.time()) else None

    def csrf(self, cookie: str) -> str:
        """The CSRF token of the session ``cookie``."""
        return self._mac(f"csrf:{cookie}")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def page(handler: Handler) -> Handler:
    """A console view whose :class:`ApiError` answers as an HTML page (``error.html``) with the
    error's status, rather than the API's JSON."""
    @functools.wraps(handler)
    async def view(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            found = _signed_in(request)
            context: dict[str, Any] = {"status": exc.status, "message": exc.message, "path": request.path,
                                       "principal": None}
            if found is not None:
                context.update(principal=found[0], csrf=request.app[SESSION].csrf(found[1]),
                               operator=found[0].allows("admin") and found[0].tenant is None)
            return aiohttp_jinja2.render_template("error.html", request, context, status=exc.status)
    return view


def setup(app: web.Application) -> None:
    """Give ``app`` the console's templates and session signer (the routes are in the route table)."""
    env = aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("gateway.web.console", "templates"),
                               autoescape=jinja2.select_autoescape(default=True))
    env.filters["iso"] = iso
    env.filters["size"] = human_size
    app[SESSION] = Session(app[SETTINGS].link_secret())


def human_size(n: int | None) -> str:
    """``n`` bytes as a short human figure (``1.5 MiB``)."""
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""  # unreachable


# -- sessions ---------------------------------------------------------------------------------------

def _signed_in(request: web.Request) -> tuple[Principal, str] | None:
    cookie = request.cookies.get(COOKIE)
    digest = request.app[SESSION].digest(cookie)
    if digest is None or cookie is None:
        return None
    principal = request.app[API_KEYS].by_digest(digest)
    return (principal, cookie) if principal is not None else None


def _who(request: web.Request, scope: str = "read") -> tuple[Principal, str]:
    """The signed-in key (with ``scope``) and its session cookie; else a redirect to the sign-in
    page, or :class:`ApiError` 403 for a key without ``scope``."""
    found = _signed_in(request)
    if found is None:
        raise web.HTTPSeeOther("/console/login?" + urlencode({"next": request.path_qs}))
    if not found[0].allows(scope):
        raise ApiError(403, f"the API key {found[0].name!r} lacks the {scope!r} scope")
    return found


async def _form(request: web.Request, scope: str | None) -> tuple[Principal, Mapping[str, str]]:
    """The signed-in key (with ``scope``, unless None) and the POSTed form, its CSRF token checked. Raises
    :class:`ApiError` 403."""
    found = _signed_in(request)
    if found is None:
        raise ApiError(403, "not signed in: sign in at /console/login")
    principal, cookie = found
    form = await request.post()
    token = form.get("csrf")
    if not isinstance(token, str) or not hmac.compare_digest(token, request.app[SESSION].csrf(cookie)):
        raise ApiError(403, "the form's CSRF token is missing or wrong: reload the page")
    if scope is not None and not principal.allows(scope):
        raise ApiError(403, f"the API key {principal.name!r} lacks the {scope!r} scope")
    return principal, {k: v for k, v in form.items() if isinstance(v, str)}


def _page(request: web.Request, template: str, principal: Principal, cookie: str, **context: Any
          ) -> web.Response:
    response = aiohttp_jinja2.render_template(template, request, {
        "principal": principal, "csrf": request.app[SESSION].csrf(cookie), "path": request.path,
        "operator": principal.allows("admin") and principal.tenant is None, **context})
    response.headers.update({"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                             "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                                        "media-src 'self'; object-src 'self'; frame-ancestors 'none'"})
    return response


@page
async def login_page(request: web.Request) -> web.Response:
    """``GET /console/login``: the sign-in form."""
    return aiohttp_jinja2.render_template("login.html", request, {"next": _next(request.query.get("next")),
                                                                  "error": None})


def _next(target: str | None) -> str:
    return target if target and target.startswith("/console") and not target.startswith("//") else "/console"


@page
async def login(request: web.Request) -> web.Response:
    """``POST /console/login``: check the key (form field ``key``) and set the session cookie."""
    form = await request.post()
    key, target = str(form.get("key") or ""), _next(str(form.get("next") or ""))
    try:
        request.app[API_KEYS].identify(f"Bearer {key}")
    except Unauthorized as exc:
        response = aiohttp_jinja2.render_template("login.html", request, {"next": target, "error": str(exc)})
        response.set_status(401)
        return response
    response = web.HTTPSeeOther(target)  # raised: aiohttp sends an HTTPException's headers and cookies
    response.set_cookie(COOKIE, request.app[SESSION].cookie(hashlib.sha256(key.strip().encode()).hexdigest()),
                        max_age=SESSION_SECONDS, path="/console", httponly=True, samesite="Strict",
                        secure=request.app[SETTINGS].server.base_url.startswith("https:"))
    raise response


@page
async def logout(request: web.Request) -> web.Response:
    """``POST /console/logout``: forget the session."""
    await _form(request, None)
    response = web.HTTPSeeOther("/console/login")
    response.del_cookie(COOKIE, path="/console")
    raise response


# -- overview ---------------------------------------------------------------------------------------

@page
async def overview(request: web.Request) -> web.Response:
    """``GET /console``: counts and bytes, webhook events per minute, readiness, the last cleanup."""
    principal, cookie = _who(request)
    return await _overview(request, principal, cookie, None)


async def _overview(request: web.Request, principal: Principal, cookie: str, report: str | None) -> web.Response:
    catalog = request.app[CATALOG]
    stats = await catalog.media_stats(principal.tenant)
    context: dict[str, Any] = {"stats": stats, "chart": None, "ready": None, "cleanup": None}
    if principal.allows("admin") and principal.tenant is None:
        now = time.time()
        start = int(now // 60) * 60 - (CHART_MINUTES - 1) * 60
        counts = dict(await catalog.events_per_minute(start))
        context["chart"] = chart([counts.get(start + 60 * i, 0) for i in range(CHART_MINUTES)])
        context["ready"] = await readiness(request.app)
        runs = await catalog.cleanup_runs(1)
        context["cleanup"] = runs[0] if runs else None
        context["report"] = report
    return _page(request, "overview.html", principal, cookie, **context)


def chart(counts: list[int], width: int = 600, height: int = 120) -> dict[str, Any]:
    """An SVG bar chart of per-minute ``counts`` (oldest first): bars as ``(x, y, w, h, count)``."""
    top = max(counts) or 1
    step = width / len(counts)
    bars = [(round(i * step, 1), round(height - n / top * height, 1), round(max(step - 1, 1), 1),
             round(n / top * height, 1), n) for i, n in enumerate(counts)]
    return {"bars": bars, "width": width, "height": height, "top": max(counts), "total": sum(counts)}


@page
async def cleanup(request: web.Request) -> web.Response:
    """``POST /console/cleanup``: a cleanup dry run; the overview with its report."""
    principal, _ = await _form(request, "admin")
    if principal.tenant is not None:
        raise ApiError(403, "a cleanup covers every tenant: use an admin key without a tenant")
    try:
        report = await asyncio.shield(request.app[RETENTION].spawn(dry_run=True, trigger="console"))
        summary = report.to_dict()
        text = ", ".join(f"{k}: {v}" for k, v in summary.items() if isinstance(v, (int, float, str)) and v)
    except CleanupBusy as exc:
        text = str(exc)
    return await _overview(request, principal, request.cookies[COOKIE], f"dry run: {text}")


# -- gallery and files --------------------------------------------------------------------------------

@page
async def gallery(request: web.Request) -> web.Response:
    """``GET /console/gallery``: thumbnails, newest first, the files API's filters and cursor."""
    principal, cookie = _who(request)
    params = {k: v for k, v in request.query.items() if v and k in (*FILTERS, "cursor")}
    query = dict(params)
    for name, clock in (("created_after", "T00:00:00Z"), ("created_before", "T23:59:59.999999Z")):
        if DATE.fullmatch(query.get(name, "")):  # a date field: the whole day counts
            query[name] += clock
    error = None
    try:
        rows, cursor = await query_files(request.app, principal, {**query, "limit": str(PAGE_SIZE)})
    except ApiError as exc:
        rows, cursor, error = [], None, exc.message
    items = [file_view(request, r) for r in rows]
    for item in items:
        item["thumbnail"] = _local(request, item["links"]["thumbnail"]) if item["links"]["thumbnail"] else None
    more = "?" + urlencode({**{k: v for k, v in params.items() if k != "cursor"}, "cursor": cursor}) if cursor else None
    return _page(request, "gallery.html", principal, cookie, items=items, filters=params, next_page=more,
                 error=error, categories=CATEGORY_NAMES, directions=DIRECTIONS)


async def _visible(request: web.Request, principal: Principal) -> dict[str, Any]:
    record = await request.app[CATALOG].get_media(request.match_info["id"])
    if record is None or record.get("state") == "deleting" or (
            principal.tenant is not None and record.get("tenant") != principal.tenant):
        raise ApiError(404, "no such file")
    return dict(record)


@page
async def detail(request: web.Request) -> web.Response:
    """``GET /console/files/{id}``: preview, metadata, the message, links and actions."""
    principal, cookie = _who(request)
    record = await _visible(request, principal)
    view = file_view(request, record)
    message = None
    if record.get("event_id") and principal.tenant is None:  # events are not tenant-bound
        event = await request.app[CATALOG].get_event(record["event_id"])
        if event is not None:
            message = {"provider": event["provider"], "event": event["event"], "chat": event.get("chat"),
                       "message_id": event.get("message_id"), "received_at": iso(event["received_at"]),
                       "payload": event["payload"]}
    link = None
    try:
        ttl = int(request.query.get("ttl", ""))
    except ValueError:
        ttl = 0
    if ttl in dict(LINK_EXPIRIES).values():
        link = request.app[LINKS].link(record["id"], record["filename"], ttl)
    preview = _local(request, request.app[LINKS].link(record["id"], record["filename"]))
    return _page(request, "detail.html", principal, cookie, file=view, message=message, link=link,
                 expiries=LINK_EXPIRIES, preview=preview)


def _local(request: web.Request, url: str) -> str:
    """A gateway link as a path on this host (the page's own origin, whatever ``base_url`` says)."""
    base = request.app[LINKS].base_url
    return url[len(base):] if url.startswith(base + "/") else url


@page
async def delete(request: web.Request) -> web.Response:
    """``POST /console/files/{id}/delete``: delete the object and its thumbnails, then the row."""
    principal, _ = await _form(request, "write")
    record = await _visible(request, principal)
    try:
        await request.app[MEDIA_STORE].delete(record["id"])
    except StorageError as exc:
        raise ApiError(503, f"storage unavailable: {exc}; the next cleanup finishes the deletion")
    raise web.HTTPSeeOther("/console/gallery")


@page
async def visibility(request: web.Request) -> web.Response:
    """``POST /console/files/{id}/visibility`` (``public`` = ``1``|``0``): make public or private."""
    principal, form = await _form(request, "write")
    record = await _visible(request, principal)
    updated = await request.app[MEDIA_STORE].update(record["id"], {"is_public": int(form.get("public") == "1")})
    if updated is not None:
        await notify(request.app[PLUGINS], "media_updated", record=updated)
    raise web.HTTPSeeOther(f"/console/files/{record['id']}")


# -- queue ------------------------------------------------------------------------------------------

def _operator(principal: Principal) -> None:
    if not (principal.allows("admin") and principal.tenant is None):
        raise ApiError(403, "the queue spans every tenant: sign in with an admin key without a tenant")


QUEUE_PAGE = 200
"""Jobs the queue page lists at once (newest first), and dead jobs it shows."""


def _job_cursor(value: str | None) -> int | None:
    """``value`` (a form or query field) as a job id; None when absent or not one."""
    if value and value.isascii() and value.isdigit() and len(value) <= 19 and int(value) < 2 ** 63:
        return int(value)
    return None


@page
async def queue(request: web.Request) -> web.Response:
    """``GET /console/queue?state=&kind=&before=``: jobs by state and kind, newest first, a page at
    a time (``before``: a job id, for older ones); the dead letter; the oldest waiting job. Every
    listing is limited in the catalog: done jobs are kept for days, millions at a high rate."""
    principal, cookie = _who(request)
    _operator(principal)
    catalog = request.app[CATALOG]
    counts = await catalog.job_counts()
    kinds = sorted({kind for kind, _ in counts})
    state = request.query.get("state") or None
    state = state if state in JOB_STATES else None
    kind = request.query.get("kind") or None
    jobs = await catalog.list_jobs(state=state, kind=kind, limit=QUEUE_PAGE + 1, newest_first=True,
                                   before=_job_cursor(request.query.get("before")))
    older = None
    if len(jobs) > QUEUE_PAGE:
        jobs = jobs[:QUEUE_PAGE]
        older = "?" + urlencode({k: v for k, v in (("state", state), ("kind", kind)) if v} | {"before": jobs[-1]["id"]})
    oldest = await catalog.list_jobs(state="queued", limit=1)  # ids grow with creation: the first waits longest
    dead = await catalog.list_jobs(state="dead", limit=QUEUE_PAGE, newest_first=True)
    return _page(request, "queue.html", principal, cookie, counts=counts, kinds=kinds, states=JOB_STATES,
                 jobs=[job_view(j) for j in jobs], dead=[job_view(j) for j in dead], older=older,
                 state=state, kind=kind,
                 oldest_age=max(0, time.time() - oldest[0]["created_at"]) if oldest else None)


@page
async def retry(request: web.Request) -> web.Response:
    """``POST /console/jobs/retry`` (``id``, or ``kind`` for every dead job of a kind): queue dead jobs again."""
    principal, form = await _form(request, "admin")
    _operator(principal)
    catalog = request.app[CATALOG]
    if "id" in form:
        job_id = _job_cursor(form["id"])
        if job_id is None:
            raise ApiError(422, "not a job id", field="id")
        await catalog.retry_dead_job(job_id)
    else:
        before = None
        while page := await catalog.list_jobs(state="dead", kind=form.get("kind") or None, limit=QUEUE_PAGE,
                                              newest_first=True, before=before):
            for job in page:
                await catalog.retry_dead_job(job["id"])
            before = page[-1]["id"]
    request.app[QUEUE].notify()
    raise web.HTTPSeeOther("/console/queue")


@page
async def static(request: web.Request) -> web.StreamResponse:
    """``GET /console/static/{name}``: the console's own CSS and JavaScript."""
    name = request.match_info["name"]
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise ApiError(404, "no such asset")
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})


@page
async def root(request: web.Request) -> web.Response:
    """``GET /console/``: the overview."""
    raise web.HTTPSeeOther("/console")
