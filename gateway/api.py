"""The REST API under ``/api/v1`` for bots and operators (``Authorization: Bearer <API key>``).

``POST /api/v1/messages`` (scope ``write``): send media through the gateway. JSON::

    {"provider": "waha" | "meta", "account": <WAHA session | Meta phone_number_id>,
     "to": <chat id | wa_id>, "type": "image" | "video" | "audio" | "voice" | "document" | "sticker",
     "media": {"id": <stored media id>} | {"url": <http(s) URL>},
     "caption"?: str, "filename"?: str, "convert"?: bool, "by"?: "id" | "link"}

or ``multipart/form-data`` with the same fields as form fields and the file as the part ``file``
(sent last). The gateway stores a copy first (streamed; URLs follow the upload-from-URL rules),
then calls the provider's send, and answers ``200 {"provider_message_id", "media": {"id", "link"}}``.

Errors: 401 no or bad key, 403 missing scope, 404 unknown provider or media id, 413 media over
``media.max_bytes``, 422 a bad body (naming the field), a refused URL, or media the provider's
limits refuse; a provider's own 4xx/5xx is passed through with its status and body; 502 when the
provider or the media URL is unreachable; 503 storage unavailable.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from aiohttp import BodyPartReader, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.app import OUTBOUND, PROVIDERS, SETTINGS
from gateway.config import format_validation_error
from gateway.outbound import MediaUnavailable
from gateway.providers import OUTBOUND_TYPES, SendError, SendRequest
from gateway.routes import error, require
from gateway.store import Origin

log = logging.getLogger("gateway.api")

MediaType = Literal["image", "video", "audio", "voice", "document", "sticker"]
assert set(MediaType.__args__) == set(OUTBOUND_TYPES)  # type: ignore[attr-defined]
FORM_FIELDS = {"provider", "account", "to", "type", "caption", "filename", "convert", "by"}


class MediaSpec(BaseModel):
    """``media``: exactly one of a stored media ``id`` or a ``url`` to fetch."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, min_length=1, max_length=100)
    url: str | None = Field(None, min_length=1, max_length=4096)

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
    filename: str | None = Field(None, max_length=255)
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
        reader = await request.multipart()
        fields: dict[str, str] = {}
        body = record = None
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                return error(422, "nested multipart is not supported")
            if part.name == "file":
                try:
                    body = MessageBody(**fields)
                except ValidationError as err:
                    return _invalid(err)
                if body.provider not in request.app[PROVIDERS]:
                    return error(404, f"unknown provider {body.provider!r}")
                origin = origin_for(body)
                origin.declared_mimetype = part.headers.get("Content-Type")
                origin.filename = body.filename or part.filename
                try:
                    record = await outbound.store_stream(_part_chunks(part), origin)
                except MediaUnavailable as exc:
                    return error(exc.status, str(exc))
                break
            if part.name not in FORM_FIELDS:
                return error(422, f"unknown form field {part.name!r}")
            fields[part.name] = (await part.read(decode=False))[:8192].decode("utf-8", "replace")
        if body is None or record is None:
            return error(422, "file: the multipart body has no 'file' part (send it after the fields)")
    else:
        try:
            data = await request.json()
        except (ValueError, UnicodeDecodeError):
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


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(1024 * 1024):
        yield chunk


def setup_api_routes(app: web.Application) -> None:
    """Add the ``/api/v1`` routes."""
    app.router.add_post("/api/v1/messages", send_message)

