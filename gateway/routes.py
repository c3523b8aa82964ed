"""HTTP handlers: webhooks, media serving, health, metrics and the admin cleanup trigger.
Errors are JSON ``{"error": ...}``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.app import API_KEYS, CATALOG, LINKS, METRICS, PROVIDERS, QUEUE, RETENTION, SETTINGS, STORAGE
from gateway.auth import Forbidden, Principal, Unauthorized
from gateway.links import LinkError
from gateway.media import content_disposition
from gateway.metrics import http_method
from gateway.sdk.provider import PayloadError, SignatureError
from gateway.retention import CleanupBusy
from gateway.sdk.storage import ObjectNotFound

log = logging.getLogger("gateway.http")

STREAM_CHUNK = 256 * 1024


def error(status: int, message: str, **extra: object) -> web.Response:
    """A JSON error answer ``{"error": message, ...}`` with ``status``."""
    return web.json_response({"error": message, **extra}, status=status)


def require(request: web.Request, scope: str) -> Principal:
    """The API key's principal if it has ``scope``; else raise 401 (no or bad key) or 403."""
    try:
        return request.app[API_KEYS].require(request, scope)
    except Unauthorized as exc:
        raise web.HTTPUnauthorized(text=json.dumps({"error": str(exc)}), content_type="application/json",
                                   headers={"WWW-Authenticate": 'Bearer realm="gateway"'}) from None
    except Forbidden as exc:
        raise web.HTTPForbidden(text=json.dumps({"error": str(exc)}), content_type="application/json") from None


@web.middleware
async def observe_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                             ) -> web.StreamResponse:
    """Count and time every request by route template; turn errors into JSON answers."""
    started = time.monotonic()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        if exc.status >= 400 and exc.content_type != "application/json":
            return error(exc.status, exc.reason)
        raise
    except HttpProcessingError as exc:  # malformed input the HTTP parser found late (multipart headers)
        status = 400
        return error(400, f"malformed request: {exc.message}")
    except ConnectionError:  # ConnectionResetError, BrokenPipeError, aiohttp's "Connection lost"
        # the client hung up (players and Range probes do it all the time): an expected condition,
        # not an error of ours. Answering a fresh response lets aiohttp notice the closed
        # connection quietly and log the request as 499 in the access log, without a traceback.
        status = 499
        return web.Response(status=499)
    except asyncio.CancelledError:
        status = 499
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, route)
        return error(500, "internal error")
    finally:
        metrics = request.app[METRICS]
        method = http_method(request.method)
        metrics.http_requests.labels(route, method, str(status)).inc()
        metrics.http_duration.labels(route, method).observe(time.monotonic() - started)


async def webhook(request: web.Request) -> web.Response:
    """``POST /webhooks/{provider}``: verify, parse, commit events and jobs, then answer 200.

    401 bad signature, 400 bad body, 404 unknown provider, 413 too large, 503 catalog unavailable
    (the provider retries). Nothing is stored unless the answer is 200.
    """
    name = request.match_info["provider"]
    provider = request.app[PROVIDERS].get(name)
    metrics = request.app[METRICS]
    if provider is None:
        return error(404, f"unknown provider {name!r}", providers=sorted(request.app[PROVIDERS]))
    limit = request.app[SETTINGS].server.max_webhook_bytes
    if request.content_length is not None and request.content_length > limit:
        metrics.webhooks.labels(name, "too_large").inc()
        return error(413, f"webhook body over the limit of {limit} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.webhooks.labels(name, "too_large").inc()
        return error(413, f"webhook body over the limit of {limit} bytes")
    try:
        provider.verify(request.headers, body)
    except SignatureError as exc:
        metrics.webhooks.labels(name, "unauthorized").inc()
        log.warning("%s webhook refused: %s (from %s)", name, exc, request.remote,
                    extra={"provider": name})
        return error(401, str(exc))
    try:
        events = provider.parse(body)
    except PayloadError as exc:
        metrics.webhooks.labels(name, "invalid").inc()
        log.warning("%s webhook invalid: %s", name, exc, extra={"provider": name})
        return error(400, str(exc))
    try:
        accepted, duplicates = await request.app[CATALOG].record_webhook(name, body, events)
    except Exception:
        metrics.webhooks.labels(name, "unavailable").inc()
        log.exception("could not commit a %s webhook; answering 503 so the provider retries", name,
                      extra={"provider": name})
        return error(503, "catalog unavailable, retry later")
    if accepted:
        request.app[QUEUE].notify()
    metrics.webhooks.labels(name, "accepted").inc(len(accepted))
    metrics.webhooks.labels(name, "duplicate").inc(len(duplicates))
    for event_id in accepted:
        log.info("%s webhook accepted", name, extra={"provider": name, "event_id": event_id})
    return web.json_response({"accepted": len(accepted), "duplicates": len(duplicates),
                              "event_ids": accepted})


async def media(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD /media/{id}/{filename}?exp=&sig=``: a stored object, streamed.

    403 wrong/expired signature; 404 unknown id; 304 on a matching ``If-None-Match``; 206 with
    ``Content-Range`` for a satisfiable single ``Range`` (RFC 9110 §14); 416 otherwise.
    """
    media_id, filename = request.match_info["id"], request.match_info["filename"]
    try:
        request.app[LINKS].verify(media_id, filename, request.query.get("exp"), request.query.get("sig"))
    except LinkError as exc:
        return error(403, str(exc))
    record = await request.app[CATALOG].get_media(media_id)
    if record is None:
        return error(404, "no such media")
    return await serve_object(request, record)


async def serve_object(request: web.Request, record: dict) -> web.StreamResponse:
    """Stream the object of catalog ``record`` with ETag, Range and conditional support, or, with
    ``storage.serving = "redirect"`` and a backend that has direct URLs, answer 302 to a fresh
    presigned URL (valid for the link TTL, at most an hour)."""
    size = record["size"]
    etag = f'"{record["sha256"]}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, max-age=3600",
        "X-Content-Type-Options": "nosniff",
        "Content-Disposition": content_disposition(record["filename"], record["mimetype"]),
    }
    inm = request.headers.get("If-None-Match")
    if inm and (inm.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in inm.split(",")]):
        return web.Response(status=304, headers=headers)
    start, end, status = 0, size - 1, 200
    if "Range" in request.headers and request.headers.get("If-Range", etag) == etag:
        try:
            rng = request.http_range
        except ValueError:
            rng = None  # malformed or multi-range: RFC 9110 lets us ignore it and send it all
        if rng is not None and (rng.start is not None or rng.stop is not None):
            if rng.start is None:  # cannot happen with aiohttp's parser; be safe
                rng = slice(0, rng.stop)
            if rng.start < 0:  # suffix range: the last N bytes
                start = max(0, size + rng.start)
            else:
                start = rng.start
            if rng.stop is not None:
                end = min(size - 1, rng.stop - 1)
            if start >= size or start > end:
                return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    storage = request.app[STORAGE]
    if request.app[SETTINGS].storage.serving == "redirect":
        ttl = min(request.app[SETTINGS].media.link_ttl, 3600)
        direct = await storage.url(record["key"], ttl, filename=record["filename"],
                                   bucket=record["bucket"], content_type=record["mimetype"])
        if direct is not None:
            return web.Response(status=302, headers={"Location": direct, "Cache-Control": "no-store"})
    try:
        obj = await storage.open(record["key"], start, end if size else None, bucket=record["bucket"])
    except ObjectNotFound:
        log.error("catalog row %s points at a missing object %s", record["id"], record["key"],
                  extra={"media_id": record["id"]})
        return error(404, "object missing from storage")
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = record["mimetype"]
    response.content_length = obj.length if size else 0
    sent = 0
    try:
        await response.prepare(request)
        if request.method != "HEAD":
            async for chunk in obj.chunks:
                await response.write(chunk)
                sent += len(chunk)
        await response.write_eof()
    except ConnectionError:
        log.info("client hung up after %d of %d bytes of %s (%s %s)", sent, response.content_length,
                 record["id"], request.method, request.path, extra={"media_id": record["id"]})
        raise
    finally:
        await obj.close()
    return response


async def public_media(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD /public/{id}/{filename}``: a stable, unsigned link to an object marked public
    (``is_public``); 404 for any other object."""
    record = await request.app[CATALOG].get_media(request.match_info["id"])
    if record is None or not record.get("is_public") or record.get("state", "stored") != "stored":
        return error(404, "no such public file")
    return await serve_object(request, record)


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 when the catalog and storage answer, else 503 naming what failed."""
    checks: dict[str, str] = {}
    for name, check in (("catalog", request.app[CATALOG].check), ("storage", request.app[STORAGE].check)):
        try:
            await asyncio.wait_for(check(), 5)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"{type(exc).__name__}: {exc}"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format (behind an API key with ``api.metrics_key``)."""
    if request.app[SETTINGS].api.metrics_key:
        require(request, "read")
    m = request.app[METRICS]
    await m.refresh(request.app[CATALOG], ["ingest", "deliver"])
    await m.refresh_storage(request.app[STORAGE])
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "")


async def admin_cleanup(request: web.Request) -> web.Response:
    """``POST /api/v1/admin/cleanup[?dry_run=true]``: run the retention cleanup now and answer its
    report (:meth:`gateway.retention.CleanupReport.to_dict`). Needs an API key with the ``admin``
    scope and no tenant (a run covers every tenant's objects).

    200 with the report; 409 if a run is in progress (here or in another process); 503 with the
    report when storage or the catalog failed during the run (its ``error`` says why); 400 for a
    ``dry_run`` that is not a boolean; 401/403 for a missing, wrong or tenant-limited key. The run
    goes on if the client hangs up.
    """
    if require(request, "admin").tenant is not None:
        return error(403, "a cleanup covers every tenant: use an admin key without a tenant")
    flag = request.query.get("dry_run", "false").lower()
    if flag not in _TRUE + _FALSE:
        return error(400, "dry_run must be true or false")
    try:
        task = request.app[RETENTION].spawn(dry_run=flag in _TRUE, trigger="api")
        report = await asyncio.shield(task)
    except CleanupBusy as exc:
        return error(409, str(exc))
    return web.json_response(report.to_dict(), status=503 if report.error else 200)


def setup_routes(app: web.Application) -> None:
    """Add the host's routes to ``app``."""
    app.router.add_post("/webhooks/{provider}", webhook)
    # {filename:[^/]+}: aiohttp's default [^{}/]+ would not route a stored name with a brace
    app.router.add_get("/media/{id}/{filename:[^/]+}", media)  # also answers HEAD
    app.router.add_get("/public/{id}/{filename:[^/]+}", public_media)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/api/v1/admin/cleanup", admin_cleanup)
