"""The files API under ``/api/v1/files`` (``Authorization: Bearer <API key>``): upload (multipart,
or from a URL), list, get, change, delete, download, links, stats and categories.

Scopes: ``read`` (list, get, download, links, stats), ``write`` (upload, change, delete). A key
bound to a tenant sees only that tenant's objects: anything else answers 404, as if absent.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from aiohttp import web
from pydantic import ValidationError

from gateway.catalog.rows import MediaRow
from gateway.keys import (
    CATALOG,
    LINKS,
    MEDIA_STORE,
    OUTBOUND,
    PLUGINS,
    SETTINGS,
    STORAGE,
)
from gateway.media import safe_filename
from gateway.plugins import notify
from gateway.sdk.outbound import MediaUnavailable, Origin
from gateway.sdk.storage import StorageError
from gateway.thumbnails import DEFAULT_SIZE, has_thumbnail
from gateway.web.auth import Principal, require
from gateway.web.errors import ApiError
from gateway.web.forms import Form, invalid, json_body, refuse_oversize
from gateway.web.media import serve_object
from gateway.web.models import (
    CATEGORY_NAMES,
    FromUrlBody,
    ListQuery,
    PatchBody,
    UploadFields,
    iso,
)

log = logging.getLogger("gateway.api")


def file_view(request_or_app: web.Request | web.Application, record: Mapping[str, Any]) -> dict[str, Any]:
    """The API's JSON object for a media row (``FileInfo`` in the OpenAPI document)."""
    app = request_or_app.app if isinstance(request_or_app, web.Request) else request_or_app
    extra = record.get("extra")
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError:
            extra = None
    extra = extra if isinstance(extra, dict) else {}
    links = app[LINKS]
    public = (f"{links.base_url}/public/{quote(record['id'], safe='')}/{quote(record['filename'], safe='')}"
              if record.get("is_public") else None)
    return {
        "id": record["id"], "filename": record["filename"], "mimetype": record["mimetype"],
        "declared_mimetype": record.get("declared_mimetype"), "category": record["category"],
        "size": record["size"], "sha256": record["sha256"], "provider": record.get("provider"),
        "account": record.get("account"), "chat": record.get("chat"), "message_id": record.get("message_id"),
        "direction": record.get("direction"), "backend": record.get("backend"),
        "state": record.get("state") or "stored", "tenant": record.get("tenant"),
        "is_public": bool(record.get("is_public")), "created_at": iso(record["created_at"]),
        "expires_at": iso(record.get("expires_at")), "metadata": extra.get("metadata") or {},
        "links": {"content": links.link(record["id"], record["filename"]), "public": public,
                  "thumbnail": links.thumbnail_link(record["id"], DEFAULT_SIZE) if has_thumbnail(record) else None},
    }


def _visible(record: Mapping[str, Any] | None, principal: Principal) -> bool:
    if record is None or record.get("state") == "deleting":
        return False
    return principal.tenant is None or record.get("tenant") == principal.tenant


async def _visible_record(request: web.Request, principal: Principal) -> MediaRow:
    record = await request.app[CATALOG].get_media(request.match_info["id"])
    if not _visible(record, principal):
        raise ApiError(404, "no such file")
    assert record is not None
    return record


def _parse_bool(value: str, field: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"{field}: expected true or false")



async def upload_file(request: web.Request) -> web.Response:
    """``POST /files``: multipart upload (``file`` last: a field after it is a 422 and stores
    nothing; ``category``, ``metadata`` (JSON), ``is_public``, ``expires_at`` before it), streamed;
    413 at once for a Content-Length over the limit, and when the stream crosses it."""
    principal = require(request, "write")
    refuse_oversize(request)
    if request.content_type != "multipart/form-data":
        raise ApiError(415, "send multipart/form-data with a 'file' part")
    form = await Form.read(request, UploadFields.model_fields, 65536)
    if form.file is None:
        raise ApiError(422, "the multipart body has no 'file' part", field="file")
    fields: dict[str, Any] = dict(form.fields)
    try:
        if "is_public" in fields:
            fields["is_public"] = _parse_bool(fields["is_public"], "is_public")
        upload = UploadFields(**fields)
    except ValidationError as err:
        raise invalid(err) from None
    except ValueError as err:
        raise ApiError(422, str(err)) from None
    origin = Origin(provider="api", account=principal.tenant or "_", filename=form.file.filename,
                    declared_mimetype=form.file.headers.get("Content-Type"), tenant=principal.tenant,
                    is_public=upload.is_public, expires_at=upload.expires_at, metadata=upload.metadata,
                    declared_category=upload.category)
    try:
        record = await request.app[OUTBOUND].store_stream(form.file_chunks(), origin, direction="upload")
    except MediaUnavailable as exc:
        raise ApiError(exc.status, str(exc)) from None
    return web.json_response(file_view(request, record), status=201)



async def upload_from_url(request: web.Request) -> web.Response:
    """``POST /files/from-url``: fetch (public addresses only, see ``[fetch]``) and store."""
    principal = require(request, "write")
    body = await json_body(request, FromUrlBody)
    origin = Origin(provider="api", account=principal.tenant or "_", filename=body.filename,
                    tenant=principal.tenant, is_public=body.is_public, expires_at=body.expires_at,
                    metadata=body.metadata)
    try:
        record = await request.app[OUTBOUND].store_url(body.url, origin, direction="upload")
    except MediaUnavailable as exc:
        raise ApiError(exc.status, str(exc)) from None
    return web.json_response(file_view(request, record), status=201)



def _encode_cursor(sort: str, order: str, value: Any, media_id: str) -> str:
    raw = json.dumps({"s": sort, "o": order, "v": value, "i": media_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_cursor(cursor: str, sort: str, order: str) -> tuple[Any, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        value, media_id = data["v"], data["i"]
        ok = data["s"] == sort and data["o"] == order and isinstance(media_id, str) \
            and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and (isinstance(value, float) or -2 ** 63 <= value < 2 ** 63)  # SQLite INTEGER
    except (ValueError, KeyError, TypeError, binascii.Error):
        ok = False
    if not ok:
        raise ValueError("cursor: not a cursor of this listing (keep sort and order as they were)")
    return value, media_id


async def list_files(request: web.Request) -> web.Response:
    """``GET /files``: filters, sort, and a keyset cursor that stays correct while files are added."""
    principal = require(request, "read")
    rows, cursor = await query_files(request.app, principal, request.query)
    return web.json_response({"items": [file_view(request, r) for r in rows], "next_cursor": cursor})


async def query_files(app: web.Application, principal: Principal, params: Mapping[str, str]
                      ) -> tuple[list[MediaRow], str | None]:
    """One page of the files ``principal`` may see, filtered by the query ``params``
    (:class:`ListQuery`): ``(rows, next cursor or None)``. Raises :class:`ApiError` 422 for a bad query."""
    try:
        query = ListQuery(**{k: v for k, v in params.items()})
        after = _decode_cursor(query.cursor, query.sort, query.order) if query.cursor else None
    except ValidationError as err:
        raise invalid(err) from None
    except ValueError as err:
        raise ApiError(422, str(err))
    where: list[str] = ["state != 'deleting'"]
    args: list[Any] = []
    if principal.tenant is not None:
        where.append("tenant = ?")
        args.append(principal.tenant)
    for column in ("category", "provider", "account", "chat", "tenant", "direction", "message_id"):
        value = getattr(query, column)
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if query.mime:
        where.append("substr(mimetype, 1, ?) = ?")
        args.extend([len(query.mime), query.mime.lower()])
    if query.filename:
        where.append("instr(lower(filename), ?) > 0")
        args.append(query.filename.lower())
    if query.created_after is not None:
        where.append("created_at > ?")
        args.append(query.created_after)
    if query.created_before is not None:
        where.append("created_at < ?")
        args.append(query.created_before)
    if query.is_public is not None:
        where.append("is_public = ?")
        args.append(int(query.is_public))
    rows = await app[CATALOG].list_media(where, args, query.sort, query.order == "desc",
                                         after, query.limit + 1)
    more = len(rows) > query.limit
    rows = rows[:query.limit]
    cursor = _encode_cursor(query.sort, query.order, rows[-1][query.sort], rows[-1]["id"]) if more else None
    return rows, cursor


async def get_file(request: web.Request) -> web.Response:
    """``GET /files/{id}``: the file's information and links."""
    principal = require(request, "read")
    return web.json_response(file_view(request, await _visible_record(request, principal)))




async def patch_file(request: web.Request) -> web.Response:
    """``PATCH /files/{id}``: metadata, filename, is_public, expires_at; ``null`` resets a field
    to its default (see :class:`PatchBody`)."""
    principal = require(request, "write")
    record = await _visible_record(request, principal)
    body = await json_body(request, PatchBody)
    changes: dict[str, Any] = {}
    if "filename" in body.model_fields_set and body.filename is not None:
        changes["filename"] = safe_filename(body.filename, fallback=record["filename"])
    if "is_public" in body.model_fields_set:
        changes["is_public"] = int(bool(body.is_public))
    if "expires_at" in body.model_fields_set:
        changes["expires_at"] = body.expires_at
    if "metadata" in body.model_fields_set:
        extra = record.get("extra")
        extra = json.loads(extra) if isinstance(extra, str) else (extra or {})
        extra["metadata"] = body.metadata or {}
        changes["extra"] = extra
    updated = await request.app[MEDIA_STORE].update(record["id"], changes)
    if updated is None:
        raise ApiError(404, "no such file")
    await notify(request.app[PLUGINS], "media_updated", record=updated)
    return web.json_response(file_view(request, updated))


async def delete_file(request: web.Request) -> web.Response:
    """``DELETE /files/{id}``: the object first, then the row; 204 (a second delete is 404).
    If storage fails, 503: the row stays marked for the next cleanup to finish."""
    principal = require(request, "write")
    record = await _visible_record(request, principal)
    try:
        claimed = await request.app[MEDIA_STORE].delete(record["id"])
    except StorageError as exc:
        log.error("could not delete %s: %s (the next cleanup retries)", record["key"], exc,
                  extra={"media_id": record["id"]})
        raise ApiError(503, f"storage unavailable: {exc}; the deletion will be finished by the next cleanup")
    if claimed is None:
        raise ApiError(404, "no such file")
    return web.Response(status=204)


async def file_content(request: web.Request) -> web.StreamResponse:
    """``GET /files/{id}/content``: the bytes, as ``/media`` serves them (Range, ETag, 304)."""
    principal = require(request, "read")
    return await serve_object(request, await _visible_record(request, principal))


async def file_link(request: web.Request) -> web.Response:
    """``GET /files/{id}/link?expires=SECONDS[&direct=true]``: a signed gateway link, or with
    ``direct`` a presigned storage URL (409 if the backend has none)."""
    principal = require(request, "read")
    record = await _visible_record(request, principal)
    try:
        expires = int(request.query.get("expires", request.app[SETTINGS].media.link_ttl))
        direct = _parse_bool(request.query.get("direct", "false"), "direct")
    except ValueError as err:
        raise ApiError(422, str(err) if "direct" in str(err) else "expires: expected whole seconds") from None
    if not 1 <= expires <= 7 * 24 * 3600:
        raise ApiError(422, "between 1 and 604800 seconds", field="expires")
    if direct:
        url = await request.app[STORAGE].url(record["key"], expires, filename=record["filename"],
                                             bucket=record["bucket"], content_type=record["mimetype"])
        if url is None:
            raise ApiError(409, "this storage backend has no direct URLs")
    else:
        url = request.app[LINKS].link(record["id"], record["filename"], ttl=expires)
    return web.json_response({"url": url, "expires_at": iso(time.time() + expires), "direct": direct})


def _totals(rows: list[tuple[str, int, int]]) -> dict[str, dict[str, int]]:
    return {name: {"count": count, "bytes": size} for name, count, size in rows}


async def file_stats(request: web.Request) -> web.Response:
    """``GET /files/stats``: count and bytes by category, provider and backend."""
    principal = require(request, "read")
    stats = await request.app[CATALOG].media_stats(principal.tenant)
    total_count = sum(c for _, c, _ in stats["category"])
    total_bytes = sum(b for _, _, b in stats["category"])
    return web.json_response({"total": {"count": total_count, "bytes": total_bytes},
                              "by_category": _totals(stats["category"]),
                              "by_provider": _totals(stats["provider"]),
                              "by_backend": _totals(stats["backend"])})


async def file_categories(request: web.Request) -> web.Response:
    """``GET /files/categories``: every category with its count and bytes."""
    principal = require(request, "read")
    stats = _totals((await request.app[CATALOG].media_stats(principal.tenant))["category"])
    return web.json_response({"categories": [
        {"name": name, **stats.get(name, {"count": 0, "bytes": 0})} for name in CATEGORY_NAMES]})


# -- jobs ----------------------------------------------------------------------------------------
