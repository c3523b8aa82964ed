"""The one route table of the host's HTTP API: :data:`ROUTES` builds the router
(:func:`add_routes`) and, with the pydantic models of :mod:`gateway.web.models`, the OpenAPI
document (:func:`openapi_document`, served at ``GET /openapi.json``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.web import admin, console, events, files, health, jobs, media, messages, webhooks
from gateway.web import models as m
from gateway.web.openapi import BYTES, Answer, Route, build_document

FILE_ID = {"id": {"schema": {"type": "string"}, "description": "a media id"}}
JOB_ID = {"id": {"schema": {"type": "integer", "minimum": 0}}}
NO_FILE: dict[int | str, Answer] = {404: "no such file"}
NOT_JSON, TOO_LARGE = "the body is not JSON", "the body is over the limit"
INVALID, STORAGE_DOWN = "a bad body or query; the message names the field", "storage unavailable"


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /openapi.json``: :func:`openapi_document` of this app (no key needed)."""
    return web.json_response(openapi_document(request.app))


# {filename:[^/]+}: aiohttp's default [^{}/]+ would not route a stored name with a brace
ROUTES: tuple[Route, ...] = (
    Route("POST", "/api/v1/messages", messages.send_message, "sendMessage", "Send media through a provider",
          "messages", "write", {
              200: (m.SendResult, "sent: the provider's message id and the stored copy"),
              400: "the body is not JSON, or a malformed multipart body",
              404: "unknown provider, media id or account", 413: "the media is over `media.max_bytes`",
              422: "a bad body, a refused URL, or media the provider's limits refuse",
              502: "the provider or the media URL is unreachable", 503: STORAGE_DOWN,
              "4XX": "the provider's own refusal, passed through", "5XX": "the provider's own failure, passed through"},
          body={"application/json": "MessageRequest", "multipart/form-data": "MessageForm"}, errors="SendFailure",
          description="Stores a copy of the media (a stored id, a URL fetched under the `[fetch]` rules, "
                      "or the uploaded file), then sends it with the provider's API."),
    Route("POST", "/api/v1/files", files.upload_file, "uploadFile", "Upload a file", "files", "write",
          {201: (m.FileInfo, "stored"), 400: "a malformed multipart body", 413: TOO_LARGE,
           415: "not multipart/form-data", 422: INVALID, 503: STORAGE_DOWN},
          body={"multipart/form-data": "UploadForm"}),
    Route("POST", "/api/v1/files/from-url", files.upload_from_url, "uploadFromUrl", "Store a file fetched from a URL",
          "files", "write", {201: (m.FileInfo, "stored"), 400: NOT_JSON, 413: TOO_LARGE,
                             422: "a bad body, a URL the `[fetch]` rules refuse, or a link of this gateway that "
                                  "is wrongly signed or expired",
                             502: "the URL could not be fetched", 503: STORAGE_DOWN},
          body={"application/json": m.FromUrlBody}),
    Route("GET", "/api/v1/files", files.list_files, "listFiles", "List files", "files", "read",
          {200: m.FileList, 422: INVALID}, query=m.ListQuery),
    Route("GET", "/api/v1/files/stats", files.file_stats, "fileStats",
          "Count and bytes by category, provider and backend", "files", "read", {200: m.Stats}),
    Route("GET", "/api/v1/files/categories", files.file_categories, "fileCategories",
          "Every category with its count and bytes", "files", "read", {200: m.Categories}),
    Route("GET", "/api/v1/files/{id}", files.get_file, "getFile", "A file's information and links", "files",
          "read", {200: m.FileInfo, **NO_FILE}, params=FILE_ID),
    Route("PATCH", "/api/v1/files/{id}", files.patch_file, "patchFile",
          "Change a file's metadata, filename, visibility or expiry", "files", "write",
          {200: (m.FileInfo, "the changed file"), 400: NOT_JSON, **NO_FILE, 413: TOO_LARGE, 422: INVALID},
          body={"application/json": "PatchBody"}, params=FILE_ID),  # PatchBody says what null does
    Route("DELETE", "/api/v1/files/{id}", files.delete_file, "deleteFile", "Delete a file", "files", "write",
          {204: {"description": "deleted"}, **NO_FILE,
           503: "storage unavailable; the next cleanup finishes the deletion"}, params=FILE_ID),
    Route("GET", "/api/v1/files/{id}/content", files.file_content, "getFileContent", "A file's bytes", "files",
          "read", params=FILE_ID, serves_bytes=True),
    Route("GET", "/api/v1/files/{id}/link", files.file_link, "getFileLink", "A signed link to a file", "files",
          "read", {200: m.Link, **NO_FILE, 409: "`direct` asked, and the storage backend has no direct URLs",
                   422: INVALID}, params=FILE_ID, query=m.LinkQuery),
    Route("GET", "/api/v1/jobs", jobs.list_jobs, "listJobs", "The durable queue, newest first", "jobs", "admin",
          {200: m.JobList, 422: INVALID}, query=m.JobsQuery),
    Route("GET", "/api/v1/jobs/{id}", jobs.get_job, "getJob", "A job's state, attempts and last error", "jobs",
          "admin", {200: m.Job, 404: "no such job"}, params=JOB_ID),
    Route("POST", "/api/v1/jobs/{id}/retry", jobs.retry_job, "retryJob", "Queue a dead job again", "jobs", "admin",
          {200: (m.Job, "queued again"), 404: "no such job", 409: "the job is not dead"}, params=JOB_ID),
    Route("GET", "/api/v1/events", events.events, "fileEvents", "Live file notices (WebSocket)", "events", "read",
          {101: {"description": "switching to the WebSocket; each message is a `FileEvent` as JSON text"},
           400: "not a WebSocket upgrade"},
          description="A WebSocket: `{\"type\": \"created\"|\"updated\"|\"deleted\", \"file\": FileInfo}` "
                      "(schema `FileEvent`) for every file the key may see. A listener that falls far "
                      "behind is closed with code 1013.",
          extra={"x-websocket-message": m.FileEvent}),
    Route("POST", "/api/v1/admin/cleanup", admin.admin_cleanup, "runCleanup", "Run the retention cleanup now",
          "admin", "admin", {200: (m.CleanupReport, "the run's report"), 400: "`dry_run` is not a boolean",
                             409: "a cleanup is already running",
                             503: (m.CleanupReport, "storage or the catalog failed during the run "
                                                    "(`error` says why)")},
          query=m.CleanupQuery),
    Route("POST", "/webhooks/{provider}", webhooks.webhook, "receiveWebhook", "A provider's webhook", "webhooks",
          answers={200: (m.WebhookAccepted, "committed; forwarded later"), 413: "over `server.max_webhook_bytes`",
                   400: "the body is not what the provider sends", 401: "the signature is missing or wrong",
                   404: "unknown provider (`providers` lists the configured ones)",
                   503: "the catalog is unavailable, or (a webhook with media, with `Retry-After`) the gateway "
                        "is too far behind to store it before the provider deletes it; the provider should "
                        "retry"},
          body={"application/json": m.ProviderPayload},
          description="Authenticated by the provider's own signature (WAHA `X-Webhook-Hmac`, Meta "
                      "`X-Hub-Signature-256`) when configured."),
    Route("GET", "/media/{id}/thumbnail", media.thumbnail, "getThumbnail",
          "A stored image's thumbnail by signed link (WebP)", "media",
          answers={200: {"description": "the thumbnail", "content": {"image/webp": {"schema": BYTES}}},
                   304: {"description": "not modified (`If-None-Match`)"},
                   403: "the signature is missing, wrong or expired", 404: "no such media",
                   422: "a size not offered, or no thumbnail: not an image, undecodable, or over the "
                        "pixel or byte bounds", 503: STORAGE_DOWN},
          query=m.ThumbnailQuery, params=FILE_ID,
          description="Made with Pillow on the first request, stored beside the original and deleted "
                      "with it. Signed like a media link, for the name `thumbnail:{size}` "
                      "(`media.gateway.thumbnail` of a forwarded image carries one)."),
    Route("GET", "/media/{id}/{filename:[^/]+}", media.media, "getMedia", "A stored object by signed link",
          "media", answers={403: "the signature is missing, wrong or expired"}, query=m.MediaQuery,
          serves_bytes=True),
    Route("GET", "/public/{id}/{filename:[^/]+}", media.public_media, "getPublicMedia",
          "A public file's stable link", "media", serves_bytes=True),
    Route("GET", "/healthz", health.healthz, "healthz", "The process answers", "operations", answers={200: m.Health}),
    Route("GET", "/readyz", health.readyz, "readyz", "The catalog and storage answer", "operations",
          answers={200: (m.Ready, "ready"), 503: (m.Ready, "not ready: the failed check says why")}),
    Route("GET", "/metrics", health.metrics, "metrics", "Prometheus metrics", "operations", "read", {200: {
        "description": "the text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}},
          key_optional=True),
    # the operator console's HTML pages (gateway/web/console): not part of the API document
    *(Route(method, path, handler, f"console{i}", "", "console", documented=False) for i, (method, path, handler)
      in enumerate((("GET", "/console", console.overview), ("GET", "/console/", console.root),
                    ("GET", "/console/login", console.login_page), ("POST", "/console/login", console.login),
                    ("POST", "/console/logout", console.logout), ("POST", "/console/cleanup", console.cleanup),
                    ("GET", "/console/gallery", console.gallery), ("GET", "/console/files/{id}", console.detail),
                    ("POST", "/console/files/{id}/delete", console.delete),
                    ("POST", "/console/files/{id}/visibility", console.visibility),
                    ("GET", "/console/queue", console.queue), ("POST", "/console/jobs/retry", console.retry),
                    ("GET", "/console/static/{name}", console.static)))),
    Route("GET", "/openapi.json", openapi_json, "openapi", "This document", "operations", answers={200: {
        "description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}),
)


def add_routes(app: web.Application, tag: str | None = None) -> None:
    """Add every route of :data:`ROUTES` (``tag``: those of that tag only) to ``app``'s router
    (a GET also answers HEAD)."""
    for route in ROUTES:
        if tag is not None and route.tag != tag:
            continue
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)
        else:
            app.router.add_route(route.method, route.path, route.handler)


def openapi_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of :data:`ROUTES` for ``app`` (a fresh dict each call)."""
    return build_document(app, ROUTES)
