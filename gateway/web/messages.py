"""``POST /api/v1/messages`` (scope ``write``): send media through the gateway. JSON::

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

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from gateway.keys import OUTBOUND, PROVIDERS
from gateway.sdk.outbound import MediaUnavailable, Origin
from gateway.sdk.provider import SendError, SendRequest
from gateway.web.auth import require
from gateway.web.errors import ApiError
from gateway.web.forms import FILE_LAST, Form, invalid, json_body, refuse_oversize
from gateway.web.models import FORM_FIELDS, MessageBody, MessageRequest


async def send_message(request: web.Request) -> web.StreamResponse:
    """``POST /api/v1/messages``: store a copy, send it, answer the provider's message id."""
    principal = require(request, "write")
    refuse_oversize(request)
    outbound = request.app[OUTBOUND]

    def origin_for(body: MessageBody) -> Origin:
        if body.provider not in request.app[PROVIDERS]:
            raise ApiError(404, f"unknown provider {body.provider!r}")
        return Origin(provider=body.provider, account=body.account, chat=body.to,
                      filename=body.filename, tenant=principal.tenant)

    record: dict[str, Any]
    body: MessageBody
    try:
        if request.content_type == "multipart/form-data":
            form = await Form.read(request, FORM_FIELDS, 8192)
            if form.file is None:
                raise ApiError(422, "the multipart body has no 'file' part (send it after the fields)",
                               field="file")
            try:
                body = MessageBody.model_validate(form.fields)
            except ValidationError as err:
                missing = any(e["type"] == "missing" for e in err.errors())
                raise invalid(err, FILE_LAST if missing else "") from None
            origin = origin_for(body)
            origin.declared_mimetype = form.file.headers.get("Content-Type")
            origin.filename = body.filename or form.file.filename
            record = await outbound.store_stream(form.file_chunks(), origin)
        else:
            message = await json_body(request, MessageRequest,
                                      "body is not JSON (or send multipart/form-data with a 'file' part)")
            body = message
            if message.media.id is not None:
                record = await outbound.store_copy(message.media.id, origin_for(body), tenant=principal.tenant)
            else:
                assert message.media.url is not None
                record = await outbound.store_url(message.media.url, origin_for(body))
    except MediaUnavailable as exc:
        raise ApiError(exc.status, str(exc)) from None

    provider = request.app[PROVIDERS][body.provider]
    media = outbound.outbound_media(record)
    send = SendRequest(account=body.account, to=body.to, type=body.type, media=media,
                       caption=body.caption, filename=body.filename, by=body.by, convert=body.convert)
    try:
        result = await outbound.send(provider, send)
    except SendError as exc:
        if isinstance(exc.body, (dict, list)):
            return web.json_response(exc.body, status=exc.status)
        raise ApiError(exc.status, str(exc.body)) from None
    return web.json_response({"provider_message_id": result.provider_message_id,
                              "media": {"id": record["id"], "link": media.link}})
