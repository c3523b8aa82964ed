"""The OpenAPI 3.1 document of the gateway's HTTP API, built from the route table.

Every :class:`Route` of :data:`gateway.web.routes.ROUTES` is one operation: its path, method and
handler, and what the document says of it (summary, tag, scope, answers, body, query). Bodies,
query parameters and response objects are pydantic models of :mod:`gateway.web.models`
(``model_json_schema()``, JSON Schema 2020-12 as OpenAPI 3.1 uses it; their ``$defs`` collected into
``components/schemas``), so a field added to a model shows up here by itself;
``tests/test_openapi.py`` checks the views against them and runs schemathesis against a live gateway.

What the app itself decides is taken from it: the configured provider names (a ``{provider}`` path
parameter and a message's ``provider``), and whether ``/metrics`` needs a key. Routes that providers
add (:meth:`gateway.sdk.provider.Provider.routes`: the WAHA and Meta drop-in relays, Meta's
verification handshake) speak their provider's own API: they are described as pass-through
operations (tag ``pass-through``, any answer, bodies as the provider documents them).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from gateway.keys import PROVIDERS, SETTINGS
from gateway.version import gateway_version
from gateway.web import models

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# an answer: a model (200-like, "OK"), a (model, description) pair, an error's description
# (the route's error schema), or a response object written out
Answer = type[BaseModel] | tuple[type[BaseModel], str] | str | dict[str, Any]

SCHEMAS = "#/components/schemas/"
STR = {"type": "string"}
BYTES = {"type": "string", "contentMediaType": "application/octet-stream", "format": "binary"}
_TEMPLATE_PART = re.compile(r"\{(\w+)(?::((?:[^{}]|\{[^{}]*\})*))?\}")
PASS_THROUGH_METHODS = ("get", "post", "put", "patch", "delete")
URL_TOO_LONG = ("the request line is over 8190 bytes: the HTTP server refuses it before any handler, "
                "in text/plain")


@dataclass(frozen=True)
class Route:
    """One operation of the route table: how aiohttp routes it (``method``, ``path`` template,
    ``handler``; a GET also answers HEAD) and what the OpenAPI document says of it.

    ``scope``: the API key scope it needs (None: no key; ``key_optional``: only with
    ``api.metrics_key``); ``answers``: status -> :data:`Answer` (401/403 follow from ``scope``);
    ``body``: content type -> model (or the name of a form's component); ``query``: the model of the query string;
    ``params``: path parameter -> schema (default a string); ``serves_bytes``: the object-serving
    answers, ``Range`` headers and a ``HEAD`` twin; ``errors``: the component of error answers;
    ``documented`` False: an HTML page of the console, left out of the document."""

    method: str
    path: str
    handler: Handler
    op: str
    summary: str
    tag: str
    scope: str | None = None
    answers: Mapping[int | str, Answer] = field(default_factory=dict)
    body: Mapping[str, str | type[BaseModel]] = field(default_factory=dict)
    query: type[BaseModel] | None = None
    params: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    serves_bytes: bool = False
    key_optional: bool = False
    errors: str = "Error"
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    documented: bool = True


def _ref(name: str) -> dict[str, str]:
    return {"$ref": SCHEMAS + name}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


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
        options = [o for o in out.pop("anyOf") if o != {"type": "null"}]
        out = {**options[0], **out} if len(options) == 1 else {**out, "anyOf": options}
    return out


def _path_parameters(path: str, overrides: Mapping[str, dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """An aiohttp path template as an OpenAPI path, and its parameters (a regex is a ``pattern``)."""
    params = [{"name": m.group(1), "in": "path", "required": True,
               "schema": {**STR, **({"pattern": f"^{m.group(2)}$"} if m.group(2) else {})},
               **overrides.get(m.group(1), {})} for m in _TEMPLATE_PART.finditer(path)]
    return _TEMPLATE_PART.sub(lambda m: "{" + m.group(1) + "}", path), params


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """One query parameter per field of ``model``."""
    schema = model.model_json_schema()
    return [{"name": name, "in": "query", "required": name in schema.get("required", []),
             "schema": _without_null({k: v for k, v in prop.items() if k not in ("title", "description")}),
             **({"description": prop["description"]} if "description" in prop else {})}
            for name, prop in schema["properties"].items()]


def _content_responses() -> dict[str, Any]:
    """What serving a stored object answers (:func:`gateway.web.media.serve_object`)."""
    headers = {"ETag": {"schema": STR}, "Accept-Ranges": {"schema": STR}, "Content-Disposition": {"schema": STR}}
    body = {"*/*": {"schema": BYTES}}
    content_range = {"Content-Range": {"required": True, "schema": STR}}
    return {
        "200": {"description": "the bytes, with the stored type", "headers": headers, "content": body},
        "206": {"description": "the requested range", "headers": {**headers, **content_range}, "content": body},
        "302": {"description": "with `storage.serving = \"redirect\"`: to a presigned storage URL",
                "headers": {"Location": {"required": True, "schema": STR}}},
        "304": {"description": "`If-None-Match` matched", "headers": {"ETag": {"schema": STR}}},
        "404": "no such file, or its object is missing from storage",
        "416": {"description": "the range is not satisfiable", "headers": content_range},
    }


RANGE_HEADERS = [
    {"name": "Range", "in": "header", "required": False, "schema": STR,
     "description": "one byte range (RFC 9110 §14); several or a malformed one: the whole object"},
    {"name": "If-None-Match", "in": "header", "required": False, "schema": STR},
]


class _Builder:
    """Collects the components while the operations are written."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.providers = sorted(app[PROVIDERS].keys())
        self.components: dict[str, Any] = {"Error": _model_schema(models.Error, {}), "SendFailure": {
            "description": "The gateway's own `Error`, or the provider's answer passed through as it came "
                           "(any JSON, with the provider's status).",
            "anyOf": [_ref("Error"), {"description": "the provider's answer"}]}}
        self.components.update(self._request_schemas())

    def model(self, model: type[BaseModel]) -> dict[str, str]:
        """A ``$ref`` to ``model``, whose schema joins the components."""
        if model.__name__ not in self.components:
            self.components[model.__name__] = _model_schema(model, self.components)
        return _ref(model.__name__)

    def answer(self, answer: Answer, errors: str) -> dict[str, Any]:
        if isinstance(answer, dict):
            return answer
        if isinstance(answer, str):
            return {"description": answer, "content": _json(_ref(errors))}
        model, description = answer if isinstance(answer, tuple) else (answer, "OK")
        return {"description": description, "content": _json(self.model(model))}

    def operations(self, route: Route) -> tuple[str, dict[str, Any]]:
        """``route``'s OpenAPI path and its operations by method (a HEAD twin for bytes)."""
        scope = route.scope if not route.key_optional or self.app[SETTINGS].api.metrics_key else None
        path, params = _path_parameters(route.path, route.params)
        for param in params:
            if param["name"] == "provider" and self.providers:
                param["schema"] = {"type": "string", "enum": self.providers}
        answers: dict[str, Any] = {str(k): v for k, v in (_content_responses() if route.serves_bytes else {}).items()}
        if scope:
            answers["401"] = {"description": "no API key, or a key that is not valid",
                              "headers": {"WWW-Authenticate": {"schema": STR}}}
            answers["403"] = "the key lacks the `admin` scope, or is bound to a tenant" if scope == "admin" \
                else f"the key lacks the `{scope}` scope"
        answers.update({str(k): v for k, v in route.answers.items()})
        responses = {status: self.answer(a, route.errors) for status, a in answers.items()}
        if scope:
            responses["401"]["content"] = _json(_ref(route.errors))
        op: dict[str, Any] = {"operationId": route.op, "summary": route.summary, "tags": [route.tag],
                              "security": [{"bearerAuth": []}] if scope else [], "responses": responses}
        if scope or route.description:
            op["description"] = (route.description + (f"\n\nScope: `{scope}`." if scope else "")).strip()
        if scope:
            op["x-scope"] = scope
        params += _query_parameters(route.query) if route.query else []
        params += RANGE_HEADERS if route.serves_bytes else []
        if params:
            op["parameters"] = params
        if route.body:
            op["requestBody"] = {"required": True, "content": {
                kind: {"schema": _ref(name) if isinstance(name, str) else self.model(name),
                       **self._encoding(kind, name)}
                for kind, name in route.body.items()}}
        op.update({k: self.model(v) if isinstance(v, type) else v for k, v in route.extra.items()})
        ops = {route.method.lower(): op}
        if route.serves_bytes:  # the HEAD twin: the same answers without a body
            head = ops["head"] = copy.deepcopy(op)
            head["operationId"] += "Head"
            head["summary"] += " (headers only)"
            for response in head["responses"].values():
                response.pop("content", None)
        return path, ops

    def _encoding(self, kind: str, name: str | type[BaseModel]) -> dict[str, Any]:
        if kind != "multipart/form-data" or not isinstance(name, str):
            return {}
        parts = self.components[name]["properties"]
        return {"encoding": {n: {"contentType": "application/json" if n == "metadata" else "application/octet-stream"}
                             for n in ("metadata", "file") if n in parts}}

    def _request_schemas(self) -> dict[str, Any]:
        """The bodies a model does not give as it is: the forms (their fields, then the ``file``),
        the configured providers, and ``PatchBody.filename``, which refuses null."""
        schemas = {name: _model_schema(model, self.components) for name, model in (
            ("MessageRequest", models.MessageRequest), ("MessageForm", models.MessageBody),
            ("UploadForm", models.UploadFields), ("PatchBody", models.PatchBody))}
        for name, fields in (("MessageForm", models.FORM_FIELDS), ("UploadForm", models.UploadFields.model_fields)):
            schema = schemas[name]
            schema |= {"title": name, "required": [*schema.get("required", []), "file"], "description":
                       "The fields, then the file (the part `file`), last: it is streamed to storage as it "
                       "arrives, and a part after it is a 422 that stores nothing.",
                       "properties": {**{n: _without_null(p) for n, p in schema["properties"].items() if n in fields},
                                      "file": dict(BYTES)}}
        for name in ("MessageRequest", "MessageForm") if self.providers else ():
            schemas[name]["properties"]["provider"] |= {"enum": self.providers,
                                                        "description": "a configured provider"}
        patch = schemas["PatchBody"]["properties"]
        patch["filename"] = _without_null(patch["filename"])
        return schemas


def _url_limit(paths: dict[str, Any]) -> None:
    """Add the HTTP server's own 400 to every operation whose URL carries parameters (long ones
    can push the request line over aiohttp's limit)."""
    for item in paths.values():
        for op in item.values():
            if not any(p["in"] in ("path", "query") for p in op.get("parameters", [])):
                continue
            response = op["responses"].setdefault("400", {"description": URL_TOO_LONG})
            if response["description"] != URL_TOO_LONG:
                response["description"] += "; or " + URL_TOO_LONG
            if not op["operationId"].endswith("Head"):  # a HEAD answer has no body
                response["content"] = {**response.get("content", {}), "text/plain": {"schema": STR}}


def _pass_through(app: web.Application) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """The providers' own routes as pass-through operations: their path parameters, any answer."""
    for name, provider in sorted(app[PROVIDERS].items()):
        for route in provider.routes():
            path, params = _path_parameters(route.path, {})
            slug = re.sub(r"\W+", "_", path).strip("_")
            for method in PASS_THROUGH_METHODS if route.method == "*" else (route.method.lower(),):
                yield path, method, {
                    "operationId": f"{method}_{slug}",
                    "summary": route.summary or f"{name}: the provider's own API, passed through",
                    "tags": ["pass-through"], "security": [],
                    "responses": {"default": {"description": "the provider's answer (or the gateway's JSON error)"}},
                    "description": f"Provider `{name}`. Request and answer as the provider's API documents "
                                   "them; authentication is the provider's.",
                    **({"parameters": params} if params else {})}


def build_document(app: web.Application, routes: Sequence[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` as ``app`` configures them (a fresh dict each call)."""
    builder = _Builder(app)
    paths: dict[str, Any] = {}
    for route in routes:
        if not route.documented:
            continue
        path, ops = builder.operations(route)
        paths.setdefault(path, {}).update(copy.deepcopy(ops))
    _url_limit(paths)  # the host's operations; a provider's own API answers what it answers
    for path, method, op in _pass_through(app):
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chat-media gateway",
            "version": gateway_version(),
            "description": "Stores WhatsApp media durably and serves it to bots. The API under `/api/v1` takes "
                           "`Authorization: Bearer <API key>`; keys have scopes (`read`, `write`, `admin`, which "
                           "implies the others) and may be bound to a tenant, which then sees only its own files "
                           "(anything else answers 404). Errors are JSON `{\"error\": \"...\"}`.",
        },
        "tags": [{"name": n} for n in dict.fromkeys([*(r.tag for r in routes if r.documented), "pass-through"])],
        "paths": paths,
        "components": {
            "schemas": builder.components,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "an API key from `[[api.keys]]`"}},
        },
    }
