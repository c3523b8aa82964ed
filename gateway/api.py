"""The REST API under ``/api/v1`` for bots and operators (``Authorization: Bearer <API key>``).

Scopes: ``read`` (list, get, download, links, stats, events), ``write`` (upload, change, delete,
send), ``admin`` (jobs; implies the others). A key bound to a tenant sees only that tenant's objects:
anything else answers 404, as if absent. ``GET /openapi.json`` describes every route.

``POST /api/v1/messages`` (scope ``write``): send media through the gateway. JSON::

    {"provider": "waha" | "meta", "account": <WAHA session | Meta phone_number_id>,
     "to": <chat id | wa_id>, "type": "image" | "video" | "audio" | "voice" | "document" | "sticker",
     "media": {"id": <stored media id>} | {"url": <http(s) URL>},
     "caption"?: str, "filename"?: str, "convert"?: bool, "by"?: "id" | "link"}

or ``multipart/form-data`` with the same fields as form fields and the file as the part ``file``,
sent last (it is streamed to storage as it arrives; a field after it is a 422 and stores nothing).
The gateway stores a copy first (streamed; URLs follow the upload-from-URL rules; a link of this
gateway is copied, not fetched), then calls the provider's send, and answers
``200 {"provider_message_id", "media": {"id", "link"}}``; a refused send (4xx) keeps no copy.

Errors: 401 no or bad key, 403 missing scope, 404 unknown provider or media id, 413 media over
``media.max_bytes``, 422 a bad body (naming the field), a refused URL, or media the provider's
limits refuse; a provider's own 4xx/5xx is passed through with its status and body; 502 when the
provider or the media URL is unreachable; 503 storage unavailable.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

from aiohttp import BodyPartReader, MultipartReader, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.app import (
    CATALOG,
    LINKS,
    MEDIA_STORE,
    NOTIFIER,
    OUTBOUND,
    PLUGINS,
    PROVIDERS,
    QUEUE,
    SETTINGS,
    STORAGE,
)
from gateway.auth import Principal
from gateway.catalog import JOB_STATES, exact_time
from gateway.config import format_validation_error
from gateway.media import CATEGORIES, safe_filename
from gateway.sdk.outbound import MediaUnavailable, Origin
from gateway.plugins import notify
from gateway.sdk.provider import OUTBOUND_TYPES, SendError, SendRequest
from gateway.routes import error, require, serve_object
from gateway.sdk.storage import StorageError

log = logging.getLogger("gateway.api")

MediaType = Literal["image", "video", "audio", "voice", "document", "sticker"]
assert set(MediaType.__args__) == set(OUTBOUND_TYPES)  # type: ignore[attr-defined]
FORM_FIELDS = {"provider", "account", "to", "type", "caption", "filename", "convert", "by"}


class MediaSpec(BaseModel):
    """``media``: exactly one of a stored media ``id`` or a ``url`` to fetch."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, min_length=1, max_length=100, description="a stored media id")
    url: str | None = Field(None, min_length=1, max_length=4096,
                            description="an http(s) URL, fetched under the `[fetch]` rules; a link of this "
                                        "gateway (a signed media link, or a public file's link) is not "
                                        "fetched: its stored object is copied")

    @model_validator(mode="after")
    def _one(self) -> MediaSpec:
        if (self.id is None) == (self.url is None):
            raise ValueError("give exactly one of media.id and media.url")
        return self


class MessageBody(BaseModel):
    """The body of ``POST /api/v1/messages``."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1, max_length=64)
    account: str = Field(min_length=1, max_length=200)
    to: str = Field(min_length=1, max_length=200)
    type: MediaType
    media: MediaSpec | None = None
    caption: str | None = Field(None, max_length=4096)
    filename: str | None = Field(None, max_length=1024)
    convert: bool = False
    by: Literal["id", "link"] | None = None

    @field_validator("to", "account", mode="before")
    @classmethod
    def _digits_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _invalid(err: ValidationError) -> web.Response:
    return error(422, format_validation_error(err))


async def send_message(request: web.Request) -> web.StreamResponse:
    """``POST /api/v1/messages``: store a copy, send it, answer the provider's message id."""
    principal = require(request, "write")
    settings = request.app[SETTINGS]
    limit = settings.media.max_bytes + 1024 * 1024
    if request.content_length is not None and request.content_length > limit:
        return error(413, f"body over the limit of {limit} bytes")
    outbound = request.app[OUTBOUND]

    def origin_for(body: MessageBody) -> Origin:
        return Origin(provider=body.provider, account=body.account, chat=body.to,
                      filename=body.filename, tenant=principal.tenant)

    if request.content_type == "multipart/form-data":
        reader = await open_multipart(request)
        fields: dict[str, str] = {}
        body = record = None
        while (part := await next_part(reader)) is not None:
            if part.name == "file":
                try:
                    body = MessageBody(**fields)
                except ValidationError as err:
                    missing = any(e["type"] == "missing" for e in err.errors())
                    return error(422, format_validation_error(err) + (f"; {FILE_LAST}" if missing else ""))
                if body.provider not in request.app[PROVIDERS]:
                    return error(404, f"unknown provider {body.provider!r}")
                origin = origin_for(body)
                origin.declared_mimetype = part.headers.get("Content-Type")
                origin.filename = body.filename or part.filename
                try:
                    record = await outbound.store_stream(_file_last(part, reader), origin)
                except MediaUnavailable as exc:
                    return error(exc.status, str(exc))
                except PartAfterFile as exc:
                    return error(422, str(exc))
                break
            if part.name not in FORM_FIELDS:
                return error(422, f"unknown form field {part.name!r}")
            fields[part.name] = await read_field(part, 8192)
        if body is None or record is None:
            return error(422, "file: the multipart body has no 'file' part (send it after the fields)")
    else:
        try:
            data = await request.json()
        except (ValueError, UnicodeDecodeError, LookupError):  # LookupError: unknown charset
            return error(400, "body is not JSON (or send multipart/form-data with a 'file' part)")
        if not isinstance(data, dict):
            return error(422, "body must be a JSON object")
        try:
            body = MessageBody(**data)
        except ValidationError as err:
            return _invalid(err)
        except TypeError:
            return error(422, "body must be a JSON object with string keys")
        if body.media is None:
            return error(422, "media: Field required")
        if body.provider not in request.app[PROVIDERS]:
            return error(404, f"unknown provider {body.provider!r}")
        try:
            if body.media.id is not None:
                record = await outbound.store_copy(body.media.id, origin_for(body), tenant=principal.tenant)
            else:
                assert body.media.url is not None
                record = await outbound.store_url(body.media.url, origin_for(body))
        except MediaUnavailable as exc:
            return error(exc.status, str(exc))

    provider = request.app[PROVIDERS][body.provider]
    media = outbound.outbound_media(record)
    send = SendRequest(account=body.account, to=body.to, type=body.type, media=media,
                       caption=body.caption, filename=body.filename, by=body.by, convert=body.convert)
    try:
        result = await outbound.send(provider, send)
    except SendError as exc:
        if isinstance(exc.body, (dict, list)):
            return web.json_response(exc.body, status=exc.status)
        return error(exc.status, str(exc.body))
    return web.json_response({"provider_message_id": result.provider_message_id,
                              "media": {"id": record["id"], "link": media.link}})


async def next_part(reader: MultipartReader) -> BodyPartReader | None:
    """The next part of a multipart body; a malformed body is HTTP 400, not an error of ours."""
    try:
        part = await reader.next()
    except ValueError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"malformed multipart body: {exc}"}),
                                 content_type="application/json") from None
    if part is not None and not isinstance(part, BodyPartReader):
        raise web.HTTPUnprocessableEntity(text=json.dumps({"error": "nested multipart is not supported"}),
                                          content_type="application/json")
    return part


async def open_multipart(request: web.Request) -> MultipartReader:
    """The request's multipart reader; a Content-Type without a boundary is HTTP 400."""
    try:
        return await request.multipart()
    except ValueError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"malformed multipart body: {exc}"}),
                                 content_type="application/json") from None


async def read_field(part: BodyPartReader, limit: int) -> str:
    """A form field's text, cut at ``limit`` bytes; a body that ends inside it is HTTP 400."""
    try:
        return (await part.read(decode=False))[:limit].decode("utf-8", "replace")
    except ValueError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"malformed multipart body: {exc}"}),
                                 content_type="application/json") from None


FILE_LAST = ("send every form field before the 'file' part (the file is streamed to storage as it "
             "arrives, so it comes last)")


class PartAfterFile(Exception):
    """A multipart body has a part after ``file`` (HTTP 422; nothing is stored)."""


async def _file_last(part: BodyPartReader, reader: MultipartReader) -> AsyncIterator[bytes]:
    """The ``file`` part's bytes, streamed. The file must be the last part (as in S3's POST
    upload): once its bytes end, a further part raises :class:`PartAfterFile` before the stream
    does, so the storage backend discards what it wrote and nothing is stored."""
    while chunk := await part.read_chunk(1024 * 1024):
        yield chunk
    late = await next_part(reader)
    if late is not None:
        raise PartAfterFile(f"form field {late.name or '(unnamed)'!r} comes after the 'file' part: "
                            f"{FILE_LAST}; nothing was stored")


# -- files -------------------------------------------------------------------------------------

MAX_LIMIT = 1000
CATEGORY_NAMES = tuple(CATEGORIES)


def iso(ts: float | None) -> str | None:
    """Epoch seconds as RFC 3339 UTC (``2026-11-21T05:30:00.123456Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: Any) -> float:
    """Epoch seconds from a number, a numeric string or an RFC 3339 / ISO 8601 time (naive: UTC).
    Raises ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError("not a time")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class Timestamp(BaseModel):
    """Validator holder: accepts what :func:`parse_time` accepts."""

    @staticmethod
    def check(value: Any) -> float | None:
        if value is None:
            return None
        try:
            ts = exact_time(parse_time(value))  # stored and compared at whole microseconds
            iso(ts)  # within years 1..9999, so that every view of it can show it
            return ts
        except (ValueError, OverflowError, OSError):
            raise ValueError("expected an RFC 3339 time or epoch seconds (years 1 to 9999)") from None


def file_view(request_or_app: web.Request | web.Application, record: dict[str, Any]) -> dict[str, Any]:
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
        "links": {"content": links.link(record["id"], record["filename"]), "public": public},
    }


def _visible(record: dict[str, Any] | None, principal: Principal) -> bool:
    if record is None or record.get("state") == "deleting":
        return False
    return principal.tenant is None or record.get("tenant") == principal.tenant


async def _visible_record(request: web.Request, principal: Principal) -> dict[str, Any]:
    record = await request.app[CATALOG].get_media(request.match_info["id"])
    if not _visible(record, principal):
        raise web.HTTPNotFound(text=json.dumps({"error": "no such file"}), content_type="application/json")
    assert record is not None
    return record


def _parse_bool(value: str, field: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"{field}: expected true or false")


class UploadFields(BaseModel):
    """The form fields of ``POST /files`` (besides ``file``). ``category`` is what the client
    declares: the content decides the category; one that contradicts it is a type mismatch
    (``media.type_mismatch``: stored under the content's category and recorded, or refused)."""

    model_config = ConfigDict(extra="forbid")

    category: Literal["image", "video", "audio", "document", "other"] | None = Field(
        None, description="the category the client expects; the content decides, and a contradicting one "
                          "is a type mismatch (`media.type_mismatch`: recorded, or refused with 422)")
    metadata: dict[str, Any] | None = None
    is_public: bool = False
    expires_at: float | None = None

    @field_validator("metadata", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("must be a JSON object") from None
        return value

    @field_validator("expires_at", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        return Timestamp.check(value)


async def upload_file(request: web.Request) -> web.Response:
    """``POST /files``: multipart upload (``file`` last: a field after it is a 422 and stores
    nothing; ``category``, ``metadata`` (JSON), ``is_public``, ``expires_at`` before it), streamed;
    413 at once for a Content-Length over the limit, and when the stream crosses it."""
    principal = require(request, "write")
    limit = request.app[SETTINGS].media.max_bytes + 1024 * 1024
    if request.content_length is not None and request.content_length > limit:
        return error(413, f"body over the limit of {limit} bytes")
    if request.content_type != "multipart/form-data":
        return error(415, "send multipart/form-data with a 'file' part")
    reader = await open_multipart(request)
    fields: dict[str, str] = {}
    while (part := await next_part(reader)) is not None:
        if part.name != "file":
            if part.name not in UploadFields.model_fields:
                return error(422, f"unknown form field {part.name!r}")
            fields[part.name] = await read_field(part, 65536)
            continue
        try:
            if "is_public" in fields:
                fields["is_public"] = _parse_bool(fields["is_public"], "is_public")  # type: ignore[assignment]
            form = UploadFields(**fields)
        except ValueError as err:
            return _invalid(err) if isinstance(err, ValidationError) else error(422, str(err))
        origin = Origin(provider="api", account=principal.tenant or "_", filename=part.filename,
                        declared_mimetype=part.headers.get("Content-Type"), tenant=principal.tenant,
                        is_public=form.is_public, expires_at=form.expires_at, metadata=form.metadata,
                        declared_category=form.category)
        try:
            record = await request.app[OUTBOUND].store_stream(_file_last(part, reader), origin, direction="upload")
        except MediaUnavailable as exc:
            return error(exc.status, str(exc))
        except PartAfterFile as exc:
            return error(422, str(exc))
        return web.json_response(file_view(request, record), status=201)
    return error(422, "file: the multipart body has no 'file' part")


class FromUrlBody(BaseModel):
    """The body of ``POST /files/from-url``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=4096,
                     description="an http(s) URL, fetched under the `[fetch]` rules; a link of this gateway "
                                 "is not fetched: its stored object is copied")
    filename: str | None = Field(None, max_length=1024)
    metadata: dict[str, Any] | None = None
    is_public: bool = False
    expires_at: float | None = None

    @field_validator("expires_at", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        return Timestamp.check(value)


async def _json_body(request: web.Request, model: type[BaseModel]) -> BaseModel | web.Response:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError, LookupError):  # LookupError: unknown charset
        return error(400, "body is not JSON")
    if not isinstance(data, dict):
        return error(422, "body must be a JSON object")
    try:
        return model(**data)
    except ValidationError as err:
        return _invalid(err)
    except TypeError:
        return error(422, "body must be a JSON object with string keys")


async def upload_from_url(request: web.Request) -> web.Response:
    """``POST /files/from-url``: fetch (public addresses only, see ``[fetch]``) and store."""
    principal = require(request, "write")
    body = await _json_body(request, FromUrlBody)
    if isinstance(body, web.Response):
        return body
    assert isinstance(body, FromUrlBody)
    origin = Origin(provider="api", account=principal.tenant or "_", filename=body.filename,
                    tenant=principal.tenant, is_public=body.is_public, expires_at=body.expires_at,
                    metadata=body.metadata)
    try:
        record = await request.app[OUTBOUND].store_url(body.url, origin, direction="upload")
    except MediaUnavailable as exc:
        return error(exc.status, str(exc))
    return web.json_response(file_view(request, record), status=201)


class ListQuery(BaseModel):
    """The query of ``GET /files``."""

    model_config = ConfigDict(extra="forbid")

    category: Literal["image", "video", "audio", "document", "other"] | None = None
    provider: str | None = Field(None, max_length=100)
    account: str | None = Field(None, max_length=200)
    chat: str | None = Field(None, max_length=200)
    tenant: str | None = Field(None, max_length=200)
    direction: Literal["inbound", "outbound", "upload"] | None = Field(
        None, description="inbound (from a webhook), outbound (sent by a bot) or upload (the files API)")
    message_id: str | None = Field(None, max_length=200, description="the provider's message id")
    mime: str | None = Field(None, max_length=200, description="MIME type prefix, e.g. image/")
    filename: str | None = Field(None, max_length=255, description="substring, case-insensitive")
    created_after: float | None = None
    created_before: float | None = None
    is_public: bool | None = None
    sort: Literal["created_at", "size"] = "created_at"
    order: Literal["asc", "desc"] = "desc"
    limit: int = Field(100, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(None, max_length=1000)

    @field_validator("created_after", "created_before", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        return Timestamp.check(value)


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
    try:
        query = ListQuery(**{k: v for k, v in request.query.items()})
        after = _decode_cursor(query.cursor, query.sort, query.order) if query.cursor else None
    except ValidationError as err:
        return _invalid(err)
    except ValueError as err:
        return error(422, str(err))
    where, args = ["state != 'deleting'"], []
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
    rows = await request.app[CATALOG].list_media(where, args, query.sort, query.order == "desc",
                                                 after, query.limit + 1)
    more = len(rows) > query.limit
    rows = rows[:query.limit]
    cursor = _encode_cursor(query.sort, query.order, rows[-1][query.sort], rows[-1]["id"]) if more else None
    return web.json_response({"items": [file_view(request, r) for r in rows], "next_cursor": cursor})


async def get_file(request: web.Request) -> web.Response:
    """``GET /files/{id}``: the file's information and links."""
    principal = require(request, "read")
    return web.json_response(file_view(request, await _visible_record(request, principal)))


class PatchBody(BaseModel):
    """The body of ``PATCH /files/{id}``: at least one field. An absent field is left as it is;
    ``null`` resets a field to what an upload without it gets: ``metadata`` to ``{}``,
    ``is_public`` to false, ``expires_at`` to none (the retention rules apply). ``filename``
    cannot be null (every file has a name)."""

    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, Any] | None = None
    filename: str | None = Field(None, min_length=1, max_length=1024)
    is_public: bool | None = None
    expires_at: float | None = None

    @field_validator("expires_at", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        return Timestamp.check(value)

    @field_validator("filename", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("cannot be null: every file has a name")
        return value

    @model_validator(mode="after")
    def _some(self) -> PatchBody:
        if not self.model_fields_set:
            raise ValueError("give at least one of metadata, filename, is_public, expires_at")
        return self


async def patch_file(request: web.Request) -> web.Response:
    """``PATCH /files/{id}``: metadata, filename, is_public, expires_at; ``null`` resets a field
    to its default (see :class:`PatchBody`)."""
    principal = require(request, "write")
    record = await _visible_record(request, principal)
    body = await _json_body(request, PatchBody)
    if isinstance(body, web.Response):
        return body
    assert isinstance(body, PatchBody)
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
    if changes:
        await request.app[CATALOG].update_media(record["id"], changes)
    updated = await request.app[CATALOG].get_media(record["id"])
    if updated is None:
        return error(404, "no such file")
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
        return error(503, f"storage unavailable: {exc}; the deletion will be finished by the next cleanup")
    if claimed is None:
        return error(404, "no such file")
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
        return error(422, str(err) if "direct" in str(err) else "expires: expected whole seconds")
    if not 1 <= expires <= 7 * 24 * 3600:
        return error(422, "expires: between 1 and 604800 seconds")
    if direct:
        url = await request.app[STORAGE].url(record["key"], expires, filename=record["filename"],
                                             bucket=record["bucket"], content_type=record["mimetype"])
        if url is None:
            return error(409, "this storage backend has no direct URLs")
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

def job_view(job: dict[str, Any]) -> dict[str, Any]:
    """The API's JSON object for a job row (``Job`` in the OpenAPI document)."""
    return {"id": job["id"], "kind": job["kind"], "key": job["key"], "state": job["state"],
            "attempts": job["attempts"], "run_at": iso(job["run_at"]), "created_at": iso(job["created_at"]),
            "updated_at": iso(job["updated_at"]), "last_error": job.get("last_error"),
            "payload": job["payload"]}


def _require_operator(request: web.Request) -> Principal:
    principal = require(request, "admin")
    if principal.tenant is not None:
        raise web.HTTPForbidden(text=json.dumps({"error": "jobs span every tenant: use an admin key without a tenant"}),
                                content_type="application/json")
    return principal


async def list_jobs(request: web.Request) -> web.Response:
    """``GET /jobs?state=&kind=&limit=``: the durable queue, newest first (admin)."""
    _require_operator(request)
    state, kind = request.query.get("state"), request.query.get("kind")
    if state is not None and state not in JOB_STATES:
        return error(422, f"state: one of {', '.join(JOB_STATES)}")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return error(422, "limit: expected a whole number")
    if not 1 <= limit <= MAX_LIMIT:
        return error(422, f"limit: between 1 and {MAX_LIMIT}")
    jobs = await request.app[CATALOG].list_jobs(state=state, kind=kind)
    jobs = sorted(jobs, key=lambda j: j["id"], reverse=True)[:limit]
    return web.json_response({"items": [job_view(j) for j in jobs]})


async def _job(request: web.Request) -> dict[str, Any]:
    try:
        job_id = int(request.match_info["id"])
    except ValueError:
        job_id = -1
    job = await request.app[CATALOG].get_job(job_id) if 0 <= job_id < 2 ** 63 else None  # SQLite INTEGER
    if job is None:
        raise web.HTTPNotFound(text=json.dumps({"error": "no such job"}), content_type="application/json")
    return job


async def get_job(request: web.Request) -> web.Response:
    """``GET /jobs/{id}``: state, attempts, last error (admin)."""
    _require_operator(request)
    return web.json_response(job_view(await _job(request)))


async def retry_job(request: web.Request) -> web.Response:
    """``POST /jobs/{id}/retry``: queue a dead job again (admin) and answer it as the retry left
    it (``queued``, attempts 0); 409 unless it is dead."""
    _require_operator(request)
    job = await _job(request)
    queued = await request.app[CATALOG].retry_dead_job(job["id"])  # as queued, before a worker claims it
    if queued is None:
        return error(409, f"job {job['id']} is {job['state']}, not dead")
    request.app[QUEUE].notify()
    return web.json_response(job_view(queued))


# -- live events ---------------------------------------------------------------------------------

async def events(request: web.Request) -> web.WebSocketResponse:
    """``GET /events`` (WebSocket): ``{"type": "created"|"updated"|"deleted", "file": FileInfo}``
    for every object the key may see. A listener that falls far behind is closed (code 1013)."""
    principal = require(request, "read")
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    sub = request.app[NOTIFIER].subscribe(principal)

    async def drain_incoming() -> None:
        async for _ in ws:  # the client says nothing we need; this notices it closing
            pass

    reader = asyncio.create_task(drain_incoming())
    try:
        while not ws.closed:
            getter = asyncio.ensure_future(sub.queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            notice = getter.result()
            if notice is None:
                await ws.close(code=1013, message=b"too far behind")
                break
            await ws.send_json(notice)
    finally:
        request.app[NOTIFIER].unsubscribe(sub)
        reader.cancel()
        await ws.close()
    return ws


def setup_api_routes(app: web.Application) -> None:
    """Add the ``/api/v1`` routes."""
    add = app.router
    add.add_post("/api/v1/messages", send_message)
    add.add_post("/api/v1/files", upload_file)
    add.add_post("/api/v1/files/from-url", upload_from_url)
    add.add_get("/api/v1/files", list_files)
    add.add_get("/api/v1/files/stats", file_stats)
    add.add_get("/api/v1/files/categories", file_categories)
    add.add_get("/api/v1/files/{id}", get_file)
    add.add_patch("/api/v1/files/{id}", patch_file)
    add.add_delete("/api/v1/files/{id}", delete_file)
    add.add_get("/api/v1/files/{id}/content", file_content)
    add.add_get("/api/v1/files/{id}/link", file_link)
    add.add_get("/api/v1/jobs", list_jobs)
    add.add_get("/api/v1/jobs/{id}", get_job)
    add.add_post("/api/v1/jobs/{id}/retry", retry_job)
    add.add_get("/api/v1/events", events)
    from gateway.openapi import openapi_json  # it reads this module's models
    add.add_get("/openapi.json", openapi_json)

