"""The one route table of the host's HTTP API: :data:`ROUTES` builds the router
(:func:`add_routes`) and, with the pydantic models of :mod:`gateway.web.models`, the OpenAPI
document (:mod:`gateway.web.openapi`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.web import admin, events, files, health, jobs, media, messages, openapi, webhooks

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """One operation: ``method`` (a GET also answers HEAD), aiohttp ``path`` template, ``handler``."""

    method: str
    path: str
    handler: Handler


# {filename:[^/]+}: aiohttp's default [^{}/]+ would not route a stored name with a brace
ROUTES: tuple[Route, ...] = (
    Route("POST", "/webhooks/{provider}", webhooks.webhook),
    Route("GET", "/media/{id}/{filename:[^/]+}", media.media),
    Route("GET", "/public/{id}/{filename:[^/]+}", media.public_media),
    Route("GET", "/healthz", health.healthz),
    Route("GET", "/readyz", health.readyz),
    Route("GET", "/metrics", health.metrics),
    Route("POST", "/api/v1/admin/cleanup", admin.admin_cleanup),
    Route("POST", "/api/v1/messages", messages.send_message),
    Route("POST", "/api/v1/files", files.upload_file),
    Route("POST", "/api/v1/files/from-url", files.upload_from_url),
    Route("GET", "/api/v1/files", files.list_files),
    Route("GET", "/api/v1/files/stats", files.file_stats),
    Route("GET", "/api/v1/files/categories", files.file_categories),
    Route("GET", "/api/v1/files/{id}", files.get_file),
    Route("PATCH", "/api/v1/files/{id}", files.patch_file),
    Route("DELETE", "/api/v1/files/{id}", files.delete_file),
    Route("GET", "/api/v1/files/{id}/content", files.file_content),
    Route("GET", "/api/v1/files/{id}/link", files.file_link),
    Route("GET", "/api/v1/jobs", jobs.list_jobs),
    Route("GET", "/api/v1/jobs/{id}", jobs.get_job),
    Route("POST", "/api/v1/jobs/{id}/retry", jobs.retry_job),
    Route("GET", "/api/v1/events", events.events),
    Route("GET", "/openapi.json", openapi.openapi_json),
)


def add_routes(app: web.Application) -> None:
    """Add every route of :data:`ROUTES` to ``app``'s router."""
    for route in ROUTES:
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)  # also answers HEAD
        else:
            app.router.add_route(route.method, route.path, route.handler)
