"""The OpenAPI 3.1 document of the gateway's HTTP API, served at ``GET /openapi.json``.

:func:`openapi_document` builds it for one application: every route the host registers
(:data:`gateway.web.routes.ROUTES`), with request and
response schemas and every status each handler answers. Request bodies and query parameters come
from the API's pydantic models (``model_json_schema()``, JSON Schema 2020-12 as OpenAPI 3.1 uses
it), so a field added to a model shows up here by itself; the response objects are written out
below and kept honest by ``tests/test_openapi.py``, which checks ``file_view()``, ``job_view()``
and ``CleanupReport.to_dict()`` against them and runs schemathesis against a live gateway.

What the app itself decides is taken from it: the configured provider names (``/webhooks/{provider}``
and a message's ``provider``), and whether ``/metrics`` needs a key. Routes that providers add
(:meth:`gateway.providers.Provider.routes`: the WAHA and Meta drop-in relays, Meta's verification
handshake) speak their provider's own API: they are described as pass-through operations (tag
``pass-through``, any answer, bodies as the provider documents them).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from gateway.catalog import JOB_STATES
from gateway.keys import PROVIDERS, SETTINGS
from gateway.version import gateway_version
from gateway.web.models import (
    CATEGORY_NAMES,
    FORM_FIELDS,
    MAX_LIMIT,
    FromUrlBody,
    ListQuery,
    MessageBody,
    PatchBody,
    UploadFields,
)

OPENAPI_VERSION = "3.1.0"
SCHEMAS = "#/components/schemas/"
BEARER = [{"bearerAuth": []}]
NO_AUTH: list[dict[str, list[str]]] = []


def _ref(name: str) -> dict[str, str]:
    return {"$ref": SCHEMAS + name}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or JSON null."""
    return {"anyOf": [schema, {"type": "null"}]}


STR = {"type": "string"}
INT = {"type": "integer"}
COUNT = {"type": "integer", "minimum": 0}
TIME = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC"}
OBJECT = {"type": "object", "additionalProperties": True}
TIME_INPUT = {  # what gateway.web.models.Timestamp.check takes: years 1 to 9999
    "anyOf": [{"type": "number", "description": "epoch seconds", "minimum": -62135596800, "maximum": 253402300799},
              {"type": "string", "format": "date-time", "description": "RFC 3339 (naive: UTC)"}],
}


def _obj(properties: dict[str, Any], *, required: list[str] | None = None, extra: bool = False,
         description: str | None = None) -> dict[str, Any]:
    """An object schema; ``required`` defaults to every property."""
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "required": list(properties) if required is None else required,
                              "additionalProperties": extra}
    if description:
        schema["description"] = description
    return schema


# -- response objects --------------------------------------------------------------------------

def _response_schemas() -> dict[str, Any]:
    totals = _obj({"count": COUNT, "bytes": COUNT})
    return {
        "Error": {
            "type": "object", "properties": {"error": {"type": "string", "description": "what went wrong"}},
            "required": ["error"], "additionalProperties": True,
            "description": "Every error the gateway itself answers; some carry more fields "
                           "(an unknown provider lists the `providers`).",
        },
        "FileLinks": _obj({
            "content": {"type": "string", "format": "uri",
                        "description": "a signed `/media` link, valid for `media.link_ttl` seconds"},
            "public": {**_nullable({"type": "string", "format": "uri"}),
                       "description": "the stable `/public` link while the file is public"},
        }),
        "FileInfo": _obj({
            "id": {"type": "string", "description": "media id, `m_` and 27 characters"},
            "filename": STR,
            "mimetype": {"type": "string", "description": "sniffed from the bytes"},
            "declared_mimetype": {**_nullable(STR), "description": "what the sender said"},
            "category": {"type": "string", "enum": list(CATEGORY_NAMES)},
            "size": {**COUNT, "description": "bytes"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "provider": _nullable(STR),
            "account": _nullable(STR),
            "chat": _nullable(STR),
            "message_id": _nullable(STR),
            "direction": _nullable({"type": "string", "enum": ["inbound", "outbound", "upload"]}),
            "backend": _nullable(STR),
            "state": {"type": "string", "enum": ["stored", "missing", "deleting"]},
            "tenant": _nullable(STR),
            "is_public": {"type": "boolean"},
            "created_at": TIME,
            "expires_at": _nullable(TIME),
            "metadata": {**OBJECT, "description": "the caller's own JSON object"},
            "links": _ref("FileLinks"),
        }, description="A stored file (`file_view()`)."),
        "FileList": _obj({
            "items": {"type": "array", "items": _ref("FileInfo"), "maxItems": MAX_LIMIT},
            "next_cursor": {**_nullable(STR), "description": "pass as `cursor` for the next page; null on the last"},
        }),
        "Totals": totals,
        "Stats": _obj({
            "total": _ref("Totals"),
            "by_category": {"type": "object", "additionalProperties": _ref("Totals")},
            "by_provider": {"type": "object", "additionalProperties": _ref("Totals")},
            "by_backend": {"type": "object", "additionalProperties": _ref("Totals")},
        }),
        "Categories": _obj({"categories": {"type": "array", "items": _obj({
            "name": {"type": "string", "enum": list(CATEGORY_NAMES)}, "count": COUNT, "bytes": COUNT})}}),
        "Link": _obj({
            "url": {"type": "string", "format": "uri"},
            "expires_at": TIME,
            "direct": {"type": "boolean", "description": "a presigned storage URL rather than a gateway link"},
        }),
        "Job": _obj({
            "id": COUNT, "kind": {"type": "string", "description": "`ingest` or `deliver`"}, "key": STR,
            "state": {"type": "string", "enum": list(JOB_STATES)}, "attempts": COUNT,
            "run_at": TIME, "created_at": TIME, "updated_at": TIME,
            "last_error": _nullable(STR), "payload": OBJECT,
        }, description="A job of the durable queue (`job_view()`)."),
        "JobList": _obj({"items": {"type": "array", "items": _ref("Job"), "maxItems": MAX_LIMIT}}),
        "SendResult": _obj({
            "provider_message_id": {"type": "string", "description": "the provider's id of the sent message"},
            "media": _obj({"id": STR, "link": {"type": "string", "format": "uri"}}),
        }),
        "SendFailure": {
            "description": "The gateway's own `Error`, or the provider's answer passed through as it came "
                           "(any JSON, with the provider's status).",
            "anyOf": [_ref("Error"), {"description": "the provider's answer"}],
        },
        "CleanupReport": _obj({
            "dry_run": {"type": "boolean"},
            "trigger": {"type": "string", "description": "`api`, `schedule` or `cli`"},
            "backend": STR,
            "now": {"type": "number", "description": "the policy clock, epoch seconds"},
            "started_at": {"type": "number"},
            "finished_at": _nullable({"type": "number"}),
            "deleted": {"type": "object", "description": "by reason: `age`, `expires_at`, `orphan`",
                        "additionalProperties": _obj({"objects": COUNT, "bytes": COUNT})},
            "rows_without_object": COUNT,
            "failed": COUNT,
            "errors": {"type": "array", "items": STR},
            "kept_in_use": COUNT,
            "missing": COUNT,
            "missing_ids": {"type": "array", "items": STR},
            "listed": _nullable(COUNT),
            "orphans_in_grace": COUNT,
            "foreign_objects": COUNT,
            "aborted_uploads": {**_nullable(COUNT), "description": "incomplete (multipart) uploads aborted; "
                                "null when the backend has none"},
            "uploads_in_grace": _nullable(COUNT),
            "pruned": _obj({"events": COUNT, "jobs": COUNT}),
            "error": {**_nullable(STR), "description": "why the run stopped early (then the status is 503)"},
            "objects": COUNT,
            "bytes": COUNT,
        }, description="What a cleanup run did, or in a dry run would have done "
                       "(`CleanupReport.to_dict()`)."),
        "WebhookAccepted": _obj({
            "accepted": COUNT, "duplicates": COUNT,
            "event_ids": {"type": "array", "items": STR, "description": "the new events' ids"},
        }),
        "Health": _obj({"status": {"type": "string", "const": "ok"}}),
        "Ready": {
            "type": "object", "properties": {"ready": {"type": "boolean"}}, "required": ["ready"],
            "additionalProperties": {"type": "string", "description": "`ok`, or why the check failed"},
            "description": "`ready`, and one entry per check (`catalog`, `storage`).",
        },
        "FileEvent": _obj({
            "type": {"type": "string", "enum": ["created", "updated", "deleted"]},
            "file": _ref("FileInfo"),
        }, description="One message of the `/api/v1/events` WebSocket."),
    }


# -- request objects from the pydantic models --------------------------------------------------

def _model_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """``model``'s JSON Schema with its ``$defs`` moved into ``components`` (refs rewritten)."""
    schema = model.model_json_schema(ref_template=SCHEMAS + "{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    return schema


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` without its ``null`` branch and null default: a form field or a query parameter
    cannot be null, only absent."""
    out = {k: v for k, v in schema.items() if not (k == "default" and v is None)}
    if "anyOf" in out:
        options = [o for o in out["anyOf"] if o != {"type": "null"}]
        del out["anyOf"]
        if len(options) == 1:
            out = {**options[0], **out}
        else:
            out["anyOf"] = options
    return out


# fields whose validators take what gateway.web.models.parse_time takes, not only the float they hold
_TIME_FIELDS = {"UploadFields": ["expires_at"], "FromUrlBody": ["expires_at"], "PatchBody": ["expires_at"],
                "ListQuery": ["created_after", "created_before"]}


def _times(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    for field in _TIME_FIELDS.get(name, []):
        prop = schema["properties"][field]  # KeyError: the model changed, update _TIME_FIELDS
        nullable = any(o == {"type": "null"} for o in prop.get("anyOf", []))
        options = TIME_INPUT["anyOf"] + ([{"type": "null"}] if nullable else [])
        schema["properties"][field] = {k: v for k, v in prop.items() if k not in ("anyOf", "type")} | {
            "anyOf": copy.deepcopy(options)}
    return schema


def _patch_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``filename`` refuses ``null`` (its validator): only a string or absent."""
    schema["properties"]["filename"] = _without_null(schema["properties"]["filename"])
    return schema


def _query_parameters(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """One query parameter per property of a model's object schema."""
    params = []
    for name, prop in schema["properties"].items():
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in schema.get("required", []),
                                 "schema": _without_null({k: v for k, v in prop.items() if k != "title"})}
        if "description" in prop:
            param["description"] = prop["description"]
        params.append(param)
    return params


def _request_schemas(app: web.Application, components: dict[str, Any]) -> dict[str, Any]:
    providers = sorted(app[PROVIDERS])
    message = _model_schema(MessageBody, components)
    if providers:
        message["properties"]["provider"] = {**message["properties"]["provider"], "enum": providers,
                                             "description": "a configured provider"}
    # MediaSpec: exactly one of id and url (its model validator)
    media_spec = components["MediaSpec"]
    media_spec["oneOf"] = [{"required": ["id"], "properties": {"id": {"type": "string"}}},
                           {"required": ["url"], "properties": {"url": {"type": "string"}}}]
    # a JSON message needs media; the multipart form sends the file instead
    json_message = copy.deepcopy(message)
    json_message["properties"]["media"] = _ref("MediaSpec")
    json_message["required"] = [*json_message["required"], "media"]
    json_message["title"] = "MessageRequest"
    form = {"type": "object", "title": "MessageForm", "additionalProperties": False,
            "description": "The fields of a message, then the file (the part `file`), last: it is "
                           "streamed to storage as it arrives, and a part after it is a 422 that stores nothing.",
            "properties": {n: _without_null(p) for n, p in message["properties"].items() if n in FORM_FIELDS},
            "required": [*message["required"], "file"]}
    form["properties"]["file"] = {"type": "string", "contentMediaType": "application/octet-stream",
                                  "format": "binary"}

    upload = _times("UploadFields", _model_schema(UploadFields, components))
    upload_form = {"type": "object", "title": "UploadForm", "additionalProperties": False,
                   "description": "Fields first, the file (the part `file`) last: it is streamed to storage as "
                                  "it arrives, and a part after it is a 422 that stores nothing. `metadata` "
                                  "is a JSON object.",
                   "properties": {n: _without_null(p) for n, p in upload["properties"].items()},
                   "required": ["file"]}
    upload_form["properties"]["file"] = dict(form["properties"]["file"])
    return {
        "MessageRequest": json_message,
        "MessageForm": form,
        "UploadForm": upload_form,
        "FromUrlBody": _times("FromUrlBody", _model_schema(FromUrlBody, components)),
        "PatchBody": {**_patch_body(_times("PatchBody", _model_schema(PatchBody, components))),
                      "minProperties": 1},
        "ListQuery": _times("ListQuery", _model_schema(ListQuery, components)),
    }


# -- responses ---------------------------------------------------------------------------------

def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json(_ref("Error"))}


def _ok(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": _json(_ref(schema))}


UNAUTHORIZED = {"description": "no API key, or a key that is not valid", "content": _json(_ref("Error")),
                "headers": {"WWW-Authenticate": {"schema": STR}}}
NOT_JSON = _error("the body is not JSON")
TOO_LARGE = _error("the body is over the limit")
INVALID = _error("a bad body or query; the message names the field")


def _forbidden(scope: str) -> dict[str, Any]:
    return _error(f"the key lacks the `{scope}` scope")


def _content_responses(signed: bool) -> dict[str, Any]:
    """What serving a stored object answers (``gateway.web.media.serve_object``)."""
    headers = {"ETag": {"schema": STR}, "Accept-Ranges": {"schema": STR},
               "Content-Disposition": {"schema": STR}}
    body = {"*/*": {"schema": {"type": "string", "contentMediaType": "application/octet-stream",
                               "format": "binary"}}}
    responses: dict[str, Any] = {
        "200": {"description": "the bytes, with the stored type", "headers": headers, "content": body},
        "206": {"description": "the requested range",
                "headers": {**headers, "Content-Range": {"required": True, "schema": STR}}, "content": body},
        "302": {"description": "with `storage.serving = \"redirect\"`: to a presigned storage URL",
                "headers": {"Location": {"required": True, "schema": STR}}},
        "304": {"description": "`If-None-Match` matched", "headers": {"ETag": {"schema": STR}}},
        "404": _error("no such file, or its object is missing from storage"),
        "416": {"description": "the range is not satisfiable",
                "headers": {"Content-Range": {"required": True, "schema": STR}}},
    }
    if signed:
        responses["403"] = _error("the signature is missing, wrong or expired")
    return responses


RANGE_HEADERS = [
    {"name": "Range", "in": "header", "required": False, "schema": STR,
     "description": "one byte range (RFC 9110 §14); several or a malformed one: the whole object"},
    {"name": "If-None-Match", "in": "header", "required": False, "schema": STR},
]


URL_TOO_LONG = ("the request line is over 8190 bytes: the HTTP server refuses it before any handler, "
                "in text/plain")


def _url_limit(paths: dict[str, Any]) -> dict[str, Any]:
    """Add the HTTP server's own 400 to every operation whose URL carries parameters (long ones
    can push the request line over aiohttp's limit)."""
    paths = copy.deepcopy(paths)  # responses are shared between operations (and module constants)
    for item in paths.values():
        for op in item.values():
            if not any(p["in"] in ("path", "query") for p in op.get("parameters", [])):
                continue
            response = op["responses"].setdefault("400", {"description": URL_TOO_LONG})
            if response["description"] != URL_TOO_LONG:
                response["description"] += "; or " + URL_TOO_LONG
            if not op["operationId"].endswith("Head"):  # a HEAD answer has no body
                response["content"] = {**response.get("content", {}), "text/plain": {"schema": STR}}
    return paths


def _op(summary: str, responses: dict[str, Any], *, tag: str, security: list[Any] = BEARER,
        scope: str | None = None, operation_id: str, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary, "tags": [tag],
                          "security": security, "responses": responses}
    if scope:
        op["description"] = (extra.pop("description", "") + f"\n\nScope: `{scope}`.").strip()
        op["x-scope"] = scope
    op.update(extra)
    return op


def _head(get: dict[str, Any]) -> dict[str, Any]:
    """The ``HEAD`` twin of a ``GET`` that serves bytes: the same answers without a body."""
    head = copy.deepcopy(get)
    head["operationId"] = get["operationId"] + "Head"
    head["summary"] = get["summary"] + " (headers only)"
    for response in head["responses"].values():
        response.pop("content", None)
    return head


def _paths(app: web.Application, requests: dict[str, Any]) -> dict[str, Any]:
    settings = app[SETTINGS]
    providers = sorted(app[PROVIDERS])
    file_id = {"name": "id", "in": "path", "required": True, "schema": STR, "description": "a media id"}
    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
    media_path = [{"name": "id", "in": "path", "required": True, "schema": STR},
                  {"name": "filename", "in": "path", "required": True, "schema": STR}]
    boolean = {"type": "boolean"}
    read = {"401": UNAUTHORIZED, "403": _forbidden("read")}
    write = {"401": UNAUTHORIZED, "403": _forbidden("write")}
    admin = {"401": UNAUTHORIZED,
             "403": _error("the key lacks the `admin` scope, or is bound to a tenant")}
    send_failure = {"content": _json(_ref("SendFailure"))}

    send = _op("Send media through a provider", {
        "200": _ok("SendResult", "sent: the provider's message id and the stored copy"),
        "400": {"description": "the body is not JSON, or a malformed multipart body", **send_failure},
        "401": {**UNAUTHORIZED, **send_failure},
        "403": {"description": "the key lacks the `write` scope", **send_failure},
        "404": {"description": "unknown provider, media id or account", **send_failure},
        "413": {"description": "the media is over `media.max_bytes`", **send_failure},
        "422": {"description": "a bad body, a refused URL, or media the provider's limits refuse", **send_failure},
        "502": {"description": "the provider or the media URL is unreachable", **send_failure},
        "503": {"description": "storage unavailable", **send_failure},
        "4XX": {"description": "the provider's own refusal, passed through", **send_failure},
        "5XX": {"description": "the provider's own failure, passed through", **send_failure},
    }, tag="messages", scope="write", operation_id="sendMessage",
        description="Stores a copy of the media (a stored id, a URL fetched under the `[fetch]` rules, "
                    "or the uploaded file), then sends it with the provider's API.",
        requestBody={"required": True, "content": {
            "application/json": {"schema": _ref("MessageRequest")},
            "multipart/form-data": {"schema": _ref("MessageForm"),
                                    "encoding": {"file": {"contentType": "application/octet-stream"}}},
        }})

    upload = _op("Upload a file", {
        "201": _ok("FileInfo", "stored"),
        "400": _error("a malformed multipart body"),
        **write,
        "413": TOO_LARGE,
        "415": _error("not multipart/form-data"),
        "422": INVALID,
        "503": _error("storage unavailable"),
    }, tag="files", scope="write", operation_id="uploadFile",
        requestBody={"required": True, "content": {"multipart/form-data": {
            "schema": _ref("UploadForm"),
            "encoding": {"metadata": {"contentType": "application/json"},
                         "file": {"contentType": "application/octet-stream"}}}}})

    from_url = _op("Store a file fetched from a URL", {
        "201": _ok("FileInfo", "stored"),
        "400": NOT_JSON, **write, "413": TOO_LARGE,
        "422": _error("a bad body, a URL the `[fetch]` rules refuse, or a link of this gateway that is "
                      "wrongly signed or expired"),
        "502": _error("the URL could not be fetched"),
        "503": _error("storage unavailable"),
    }, tag="files", scope="write", operation_id="uploadFromUrl",
        requestBody={"required": True, "content": _json(_ref("FromUrlBody"))})

    list_files = _op("List files", {"200": _ok("FileList"), **read, "422": INVALID},
                     tag="files", scope="read", operation_id="listFiles",
                     parameters=_query_parameters(requests["ListQuery"]))
    get_file = _op("A file's information and links", {"200": _ok("FileInfo"), **read,
                                                      "404": _error("no such file")},
                   tag="files", scope="read", operation_id="getFile", parameters=[file_id])
    patch_file = _op("Change a file's metadata, filename, visibility or expiry", {
        "200": _ok("FileInfo", "the changed file"), "400": NOT_JSON, **write,
        "404": _error("no such file"), "413": TOO_LARGE, "422": INVALID,
    }, tag="files", scope="write", operation_id="patchFile", parameters=[file_id],
        description="An absent field is left as it is; `null` resets a field to what an upload without "
                    "it gets: `metadata` to `{}`, `is_public` to false, `expires_at` to none (the "
                    "retention rules apply). `filename` cannot be null.",
        requestBody={"required": True, "content": _json(_ref("PatchBody"))})
    delete_file = _op("Delete a file", {
        "204": {"description": "deleted"}, **write, "404": _error("no such file"),
        "503": _error("storage unavailable; the next cleanup finishes the deletion"),
    }, tag="files", scope="write", operation_id="deleteFile", parameters=[file_id])
    content = _op("A file's bytes", {**_content_responses(signed=False), **read},
                  tag="files", scope="read", operation_id="getFileContent", parameters=[file_id, *RANGE_HEADERS])
    link = _op("A signed link to a file", {
        "200": _ok("Link"), **read, "404": _error("no such file"),
        "409": _error("`direct` asked, and the storage backend has no direct URLs"),
        "422": INVALID,
    }, tag="files", scope="read", operation_id="getFileLink", parameters=[
        file_id,
        {"name": "expires", "in": "query", "required": False, "description": "seconds the link is valid "
         "(default `media.link_ttl`)", "schema": {"type": "integer", "minimum": 1, "maximum": 7 * 24 * 3600}},
        {"name": "direct", "in": "query", "required": False,
         "description": "a presigned storage URL instead of a gateway link",
         "schema": boolean},
    ])
    stats = _op("Count and bytes by category, provider and backend", {"200": _ok("Stats"), **read},
                tag="files", scope="read", operation_id="fileStats")
    categories = _op("Every category with its count and bytes", {"200": _ok("Categories"), **read},
                     tag="files", scope="read", operation_id="fileCategories")

    list_jobs = _op("The durable queue, newest first", {"200": _ok("JobList"), **admin, "422": INVALID},
                    tag="jobs", scope="admin", operation_id="listJobs", parameters=[
                        {"name": "state", "in": "query", "required": False,
                         "schema": {"type": "string", "enum": list(JOB_STATES)}},
                        {"name": "kind", "in": "query", "required": False, "schema": STR},
                        {"name": "limit", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100}},
                    ])
    get_job = _op("A job's state, attempts and last error", {"200": _ok("Job"), **admin,
                                                            "404": _error("no such job")},
                  tag="jobs", scope="admin", operation_id="getJob", parameters=[job_id])
    retry_job = _op("Queue a dead job again", {
        "200": _ok("Job", "queued again"), **admin, "404": _error("no such job"),
        "409": _error("the job is not dead"),
    }, tag="jobs", scope="admin", operation_id="retryJob", parameters=[job_id])
    events = _op("Live file notices (WebSocket)", {
        "101": {"description": "switching to the WebSocket; each message is a `FileEvent` as JSON text"},
        "400": _error("not a WebSocket upgrade"),
        **read,
    }, tag="events", scope="read", operation_id="fileEvents",
        description="A WebSocket: `{\"type\": \"created\"|\"updated\"|\"deleted\", \"file\": FileInfo}` "
                    "(schema `FileEvent`) for every file the key may see. A listener that falls far behind "
                    "is closed with code 1013.",
        **{"x-websocket-message": _ref("FileEvent")})
    cleanup = _op("Run the retention cleanup now", {
        "200": _ok("CleanupReport", "the run's report"),
        "400": _error("`dry_run` is not a boolean"),
        **admin,
        "409": _error("a cleanup is already running"),
        "503": _ok("CleanupReport", "storage or the catalog failed during the run (`error` says why)"),
    }, tag="admin", scope="admin", operation_id="runCleanup", parameters=[
        {"name": "dry_run", "in": "query", "required": False, "schema": boolean,
         "description": "report what would be deleted, delete nothing"}])

    webhook = _op("A provider's webhook", {
        "200": _ok("WebhookAccepted", "committed; forwarded later"),
        "400": _error("the body is not what the provider sends"),
        "401": _error("the signature is missing or wrong"),
        "404": _error("unknown provider (`providers` lists the configured ones)"),
        "413": _error("over `server.max_webhook_bytes`"),
        "503": _error("the catalog is unavailable; the provider should retry"),
    }, tag="webhooks", security=NO_AUTH, operation_id="receiveWebhook",
        description="Authenticated by the provider's own signature (WAHA `X-Webhook-Hmac`, Meta "
                    "`X-Hub-Signature-256`) when configured.",
        parameters=[{"name": "provider", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": providers} if providers else STR}],
        requestBody={"required": True, "content": _json({**OBJECT, "description": "the provider's payload"})})
    media = _op("A stored object by signed link", _content_responses(signed=True), tag="media",
                security=NO_AUTH, operation_id="getMedia", parameters=[
                    *media_path,
                    {"name": "exp", "in": "query", "required": True, "schema": INT,
                     "description": "expiry, epoch seconds"},
                    {"name": "sig", "in": "query", "required": True, "schema": STR},
                    *RANGE_HEADERS])
    public = _op("A public file's stable link", _content_responses(signed=False), tag="media",
                 security=NO_AUTH, operation_id="getPublicMedia", parameters=[*media_path, *RANGE_HEADERS])
    metrics_security = BEARER if settings.api.metrics_key else NO_AUTH
    metrics = _op("Prometheus metrics", {
        "200": {"description": "the text exposition format",
                "content": {"text/plain": {"schema": STR}}},
        **({"401": UNAUTHORIZED, "403": _forbidden("read")} if settings.api.metrics_key else {}),
    }, tag="operations", security=metrics_security, operation_id="metrics")
    return _url_limit({
        "/api/v1/messages": {"post": send},
        "/api/v1/files": {"get": list_files, "post": upload},
        "/api/v1/files/from-url": {"post": from_url},
        "/api/v1/files/stats": {"get": stats},
        "/api/v1/files/categories": {"get": categories},
        "/api/v1/files/{id}": {"get": get_file, "patch": patch_file, "delete": delete_file},
        "/api/v1/files/{id}/content": {"get": content, "head": _head(content)},
        "/api/v1/files/{id}/link": {"get": link},
        "/api/v1/jobs": {"get": list_jobs},
        "/api/v1/jobs/{id}": {"get": get_job},
        "/api/v1/jobs/{id}/retry": {"post": retry_job},
        "/api/v1/events": {"get": events},
        "/api/v1/admin/cleanup": {"post": cleanup},
        "/webhooks/{provider}": {"post": webhook},
        "/media/{id}/{filename}": {"get": media, "head": _head(media)},
        "/public/{id}/{filename}": {"get": public, "head": _head(public)},
        "/healthz": {"get": _op("The process answers", {"200": _ok("Health")}, tag="operations",
                                security=NO_AUTH, operation_id="healthz")},
        "/readyz": {"get": _op("The catalog and storage answer", {
            "200": _ok("Ready", "ready"), "503": _ok("Ready", "not ready: the failed check says why")},
            tag="operations", security=NO_AUTH, operation_id="readyz")},
        "/metrics": {"get": metrics},
        "/openapi.json": {"get": _op("This document", {"200": {
            "description": "OpenAPI 3.1", "content": _json({"type": "object"})}},
            tag="operations", security=NO_AUTH, operation_id="openapi")},
    })


_TEMPLATE_PART = re.compile(r"\{(\w+)(?::((?:[^{}]|\{[^{}]*\})*))?\}")
PASS_THROUGH_METHODS = ("get", "post", "put", "patch", "delete")


def _pass_through(app: web.Application) -> dict[str, Any]:
    """The providers' own routes as pass-through operations: their path parameters, any answer."""
    paths: dict[str, Any] = {}
    for name, provider in sorted(app[PROVIDERS].items()):
        for route in provider.routes():
            params = [{"name": m.group(1), "in": "path", "required": True,
                       "schema": {**STR, **({"pattern": f"^{m.group(2)}$"} if m.group(2) else {})}}
                      for m in _TEMPLATE_PART.finditer(route.path)]
            path = _TEMPLATE_PART.sub(lambda m: "{" + m.group(1) + "}", route.path)
            methods = PASS_THROUGH_METHODS if route.method == "*" else (route.method.lower(),)
            for method in methods:
                slug = re.sub(r"\W+", "_", path).strip("_")
                paths.setdefault(path, {})[method] = _op(
                    route.summary or f"{name}: the provider's own API, passed through",
                    {"default": {"description": "the provider's answer (or the gateway's JSON error)"}},
                    tag="pass-through", security=NO_AUTH, operation_id=f"{method}_{slug}",
                    description=f"Provider `{name}`. Request and answer as the provider's API "
                                "documents them; authentication is the provider's.",
                    **({"parameters": params} if params else {}))
    return paths


def openapi_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``app`` (a fresh dict each call)."""
    components: dict[str, Any] = _response_schemas()
    requests = _request_schemas(app, components)
    components.update(requests)
    paths = _paths(app, requests)
    for path, item in _pass_through(app).items():
        paths.setdefault(path, {}).update(item)
    del components["ListQuery"]  # described as query parameters
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "chat-media gateway",
            "version": gateway_version(),
            "description": "Stores WhatsApp media durably and serves it to bots. The API under "
                           "`/api/v1` takes `Authorization: Bearer <API key>`; keys have scopes "
                           "(`read`, `write`, `admin`, which implies the others) and may be bound to a "
                           "tenant, which then sees only its own files (anything else answers 404). "
                           "Errors are JSON `{\"error\": \"...\"}`.",
        },
        "tags": [{"name": n} for n in ("messages", "files", "jobs", "events", "admin", "webhooks",
                                        "media", "operations", "pass-through")],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "an API key from `[[api.keys]]`"}},
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /openapi.json``: :func:`openapi_document` of this app (no key needed)."""
    return web.json_response(openapi_document(request.app))
