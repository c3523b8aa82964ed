"""``GET /openapi.json``: the document validates, covers every route, describes what the views
produce, and a schemathesis run against a live gateway finds no 5xx and no answer that breaks it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from typing import Any

import aiohttp
import jsonschema
import pytest
from aiohttp import web
from openapi_spec_validator import OpenAPIV31SpecValidator
from yarl import URL

from gateway.keys import CATALOG, FETCHER
from gateway.web.files import file_view
from gateway.web.jobs import job_view
from gateway.web.models import FORM_FIELDS, UploadFields
from gateway.web.routes import ROUTES, add_routes, openapi_document
from gateway.retention import CleanupReport
from gateway.safefetch import FetchRefused
from tests.conftest import MANIFEST, MEDIA

ADMIN_KEY, READ_KEY = "openapi-admin-key", "openapi-read-key"
API_KEYS = [{"name": "admin", "key": ADMIN_KEY, "scopes": ["admin"]},
            {"name": "reader", "key": READ_KEY, "scopes": ["read"]}]
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@pytest.fixture
async def gw(start_gateway):
    return await start_gateway(api={"keys": API_KEYS})


async def fetch_document(gw) -> dict[str, Any]:
    async with gw.http.get(f"{gw.url}/openapi.json") as r:  # no key needed
        assert r.status == 200 and r.content_type == "application/json"
        return await r.json()


async def upload(gw, name: str, **fields: str) -> dict[str, Any]:
    form = aiohttp.FormData()
    for key, value in fields.items():
        form.add_field(key, value)
    form.add_field("file", (MEDIA / name).read_bytes(), filename=name, content_type=MANIFEST[name]["mime"])
    async with gw.http.post(f"{gw.url}/api/v1/files", data=form, headers=AUTH) as r:
        assert r.status == 201, await r.text()
        return await r.json()


def validator(document: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    """A JSON Schema validator for ``components/schemas/<name>`` with the document's refs resolvable."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def host_routes() -> set[tuple[str, str]]:
    """``(METHOD, path)`` of every route the host itself registers (not providers' or plugins'),
    but the console's HTML pages (``documented=False``)."""
    bare = web.Application()
    add_routes(bare)
    pages = {route.path for route in ROUTES if not route.documented}
    return {(r.method, r.resource.canonical) for r in bare.router.routes()
            if r.resource is not None and r.resource.canonical not in pages}


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items()
            for method in item if method in METHODS}


# -- the document ---------------------------------------------------------------------------------

async def test_document_validates(gw):
    document = await fetch_document(gw)
    OpenAPIV31SpecValidator(document).validate()  # raises with the first error
    assert document["openapi"].startswith("3.1")
    assert document == json.loads(json.dumps(openapi_document(gw.app)))  # served as built
    # every operation answers something documented, and every $ref points somewhere
    for path, item in document["paths"].items():
        for method, op in item.items():
            assert op["responses"], f"{method} {path}"
    refs = {m for m in json.dumps(document).split('"$ref": "')[1:]}
    names = {ref.split('"', 1)[0].removeprefix("#/components/schemas/") for ref in refs}
    assert names <= set(document["components"]["schemas"]), names - set(document["components"]["schemas"])


async def test_every_route_is_documented(gw):
    document = await fetch_document(gw)
    docs = documented(document)
    live = {(r.method, r.resource.canonical) for r in gw.app.router.routes() if r.resource is not None}

    def is_documented(method: str, path: str) -> bool:
        # aiohttp answers HEAD for every GET; a HEAD is covered by its GET unless documented itself
        return (method, path) in docs or (method == "HEAD" and ("GET", path) in docs)

    host = host_routes()
    missing = sorted(r for r in host if not is_documented(*r))
    assert not missing, f"routes missing from the OpenAPI document: {missing}"
    api_routes = {r for r in live if r[1].startswith("/api/")}  # a plugin's /api route too
    missing = sorted(r for r in api_routes if not is_documented(*r))
    assert not missing, f"/api routes missing from the OpenAPI document: {missing}"
    stale = sorted(d for d in docs if d not in live and ("*", d[1]) not in live)  # "*": any method
    assert not stale, f"documented operations the app does not route: {stale}"
    pages = {route.path for route in ROUTES if not route.documented}  # the console's HTML
    provider_routes = {r for r in live if not r[1].startswith("/api/") and r not in host and r[1] not in pages}
    missing = sorted(r for r in provider_routes if r[0] != "*" and not is_documented(*r)
                     or r[0] == "*" and not any(p == r[1] for _, p in docs))
    assert not missing, f"provider routes missing from the OpenAPI document: {missing}"
    assert ("GET", "/openapi.json") in docs and ("GET", "/api/v1/events") in docs


async def test_schemas_describe_what_the_views_produce(gw):
    document = await fetch_document(gw)
    schemas = document["components"]["schemas"]
    stored = await upload(gw, "photo.jpg", metadata='{"order": 7}', is_public="true", expires_at="2999-01-01T00:00:00Z")
    validator(document, "FileInfo").validate(stored)
    # the same view over a row with every optional column empty
    row = dict(await gw.app[CATALOG].get_media(stored["id"]))
    for column in ("declared_mimetype", "provider", "account", "chat", "message_id", "tenant", "expires_at", "extra"):
        row[column] = None
    row["is_public"] = 0
    bare = file_view(gw.app, row)
    validator(document, "FileInfo").validate(bare)
    assert set(bare) == set(schemas["FileInfo"]["properties"]) == set(schemas["FileInfo"]["required"])

    now = time.time()
    job = {"id": 1, "kind": "ingest", "key": "k", "state": "dead", "attempts": 3, "run_at": now,
           "created_at": now, "updated_at": now, "last_error": None, "payload": {"event_id": "ev_1"}}
    validator(document, "Job").validate(job_view(job))
    report = CleanupReport(dry_run=True, trigger="api", backend="local", now=now, started_at=now)
    report.count_deleted("age", 10)
    validator(document, "CleanupReport").validate(report.to_dict())
    assert set(report.to_dict()) == set(schemas["CleanupReport"]["properties"])

    # the multipart forms name exactly the fields the handlers take
    assert set(schemas["MessageForm"]["properties"]) == FORM_FIELDS | {"file"}
    assert set(schemas["UploadForm"]["properties"]) == set(UploadFields.model_fields) | {"file"}
    # MediaSpec: exactly one of id and url, as its model validator says
    media = validator(document, "MediaSpec")
    assert media.is_valid({"id": "m_1"}) and media.is_valid({"url": "https://x/y"})
    assert not media.is_valid({}) and not media.is_valid({"id": "m_1", "url": "https://x/y"})


async def test_document_follows_the_configuration(start_gateway):
    gw = await start_gateway(api={"keys": API_KEYS, "metrics_key": True})
    document = await fetch_document(gw)
    metrics = document["paths"]["/metrics"]["get"]
    assert metrics["security"] == [{"bearerAuth": []}] and {"401", "403"} <= set(metrics["responses"])
    [provider] = document["paths"]["/webhooks/{provider}"]["post"]["parameters"]
    assert provider["schema"]["enum"] == ["waha"]
    async with gw.http.get(f"{gw.url}/metrics") as r:
        assert r.status == 401


async def test_the_relays_and_the_handshake_are_described_as_pass_through(start_gateway):
    gw = await start_gateway(providers={"meta": {"access_token": "t", "verify_token": "v"}})
    document = await fetch_document(gw)
    OpenAPIV31SpecValidator(document).validate()
    paths = document["paths"]
    assert set(paths["/waha/api/{tail}"]) == {"get", "post", "put", "patch", "delete"}
    handshake = paths["/webhooks/meta"]["get"]
    relay = paths["/meta/{version}/{phone_number_id}/messages"]["post"]
    for op in (paths["/waha/api/{tail}"]["post"], handshake, relay):
        assert op["tags"] == ["pass-through"] and set(op["responses"]) == {"default"}, op
    assert "handshake" in handshake["summary"]
    [version] = [p for p in relay["parameters"] if p["name"] == "version"]
    assert version["schema"]["pattern"] == r"^v\d+\.\d+$"


# -- what schemathesis found, pinned down ---------------------------------------------------------

async def test_bugs_the_fuzzer_found(gw):
    http, url = gw.http, gw.url

    async def status(method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with http.request(method, f"{url}{path}", headers={**AUTH, **kw.pop("headers", {})}, **kw) as r:
            return r.status, await r.json()

    # a non-ASCII signature was a TypeError in hmac.compare_digest
    assert (await status("GET", "/media/m_x/a.jpg?exp=99999999999&sig=%C3%A9"))[0] == 403
    # multipart without a boundary, or ending inside a field, was a ValueError
    for path, field in (("/api/v1/files", b"category"), ("/api/v1/messages", b"account")):
        assert (await status("POST", path, headers={"Content-Type": "multipart/form-data"}))[0] == 400
        truncated = b'--b\r\nContent-Disposition: form-data; name="' + field + b'"\r\n\r\nabc'
        assert (await status("POST", path, data=truncated,
                             headers={"Content-Type": "multipart/form-data; boundary=b"}))[0] == 400
    # an unknown charset was a LookupError
    stored = await upload(gw, "photo.jpg")
    for method, path in (("POST", "/api/v1/files/from-url"), ("POST", "/api/v1/messages"),
                         ("PATCH", f"/api/v1/files/{stored['id']}")):
        code, answer = await status(method, path, data=b"{}", headers={"Content-Type": "application/json; charset=x-nope"})
        assert code == 400 and "JSON" in answer["error"]
    # a job id beyond SQLite's INTEGER was an OverflowError
    assert (await status("GET", f"/api/v1/jobs/{10 ** 30}"))[0] == 404
    assert (await status("POST", f"/api/v1/jobs/{10 ** 30}/retry"))[0] == 404
    # an expiry no date can show was stored, and every later listing failed
    code, answer = await status("PATCH", f"/api/v1/files/{stored['id']}", json={"expires_at": 1e20})
    assert code == 422 and "expires_at" in answer["error"]
    form = aiohttp.FormData()
    form.add_field("expires_at", "-1e17")
    form.add_field("file", b"hello", filename="a.txt")
    assert (await status("POST", "/api/v1/files", data=form))[0] == 422
    assert (await status("GET", "/api/v1/files?created_after=1e300"))[0] == 422
    assert (await status("GET", "/api/v1/files"))[0] == 200
    # a cursor made up with a value beyond SQLite's INTEGER was an OverflowError (found by hand)
    raw = json.dumps({"s": "created_at", "o": "desc", "v": 10 ** 30, "i": "m_x"}).encode()
    cursor = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    assert (await status("GET", f"/api/v1/files?cursor={cursor}"))[0] == 422
    # a stored name with a brace got links that did not route
    code, braced = await status("PATCH", f"/api/v1/files/{stored['id']}", json={"filename": "a{1}.jpg"})
    assert code == 200 and braced["filename"] == "a{1}.jpg"
    async with http.get(braced["links"]["content"]) as r:
        assert r.status == 200 and await r.read() == (MEDIA / "photo.jpg").read_bytes()


# -- schemathesis against a live gateway ----------------------------------------------------------

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance")
# per operation and phase; about 20 s on 2 cores. OPENAPI_FUZZ_EXAMPLES=500 (and another
# OPENAPI_FUZZ_SEED) for a longer hunt by hand
MAX_EXAMPLES = int(os.environ.get("OPENAPI_FUZZ_EXAMPLES", "100"))
SEED = int(os.environ.get("OPENAPI_FUZZ_SEED", "20261121"))


def fetch_nothing(fetcher) -> None:
    """Keep upload-from-URL and sends by ``media.url`` off the network: the fuzzer makes up URLs,
    some with public addresses, and every one is refused before any name is resolved."""
    def check_url(url: URL) -> None:
        raise FetchRefused(f"tests: the gateway fetches nothing here ({url.host!r})")
    fetcher.check_url = check_url


def run_schemathesis(url: str, file_ids: list[str]) -> tuple[list[str], dict[str, int]]:
    """A schemathesis run (its examples, coverage, fuzzing and stateful phases, positive and
    negative data) over every documented operation, as the admin key. Answers the failures, one
    per operation, check and kind, with a curl to reproduce, and how many cases each operation got.

    Nothing is left out: ``GET /api/v1/events`` gets no ``Upgrade`` header from the fuzzer, so
    it answers 400 or 401/403 like any route; ``POST /api/v1/admin/cleanup`` runs the retention
    cleanup over this test's own storage, which is what it is for."""
    import schemathesis
    from schemathesis.engine import events, from_schema

    config = schemathesis.Config.from_dict({
        "headers": AUTH,
        "workers": 1,
        "seed": SEED,  # reproducible cases; a failure prints its curl
        "request-timeout": 15,
        "generation": {"max-examples": MAX_EXAMPLES, "database": "none", "no-shrink": True},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "dictionaries": {"files": {"values": file_ids}},
        "operations": [{
            # half of the ids are of stored files, so the handlers get past "no such file"
            "include-path-regex": r"^/(api/v1/files/\{id\}|public/\{id\}/)",
            "parameters": {"path.id": {"dictionary": "files", "probability": 0.5}},
        }],
    })
    # the providers' own APIs, passed through: what they answer is the provider's business
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config).exclude(tag="pass-through")
    failures: dict[tuple[str, ...], str] = {}
    exercised: dict[str, int] = {}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for node in event.recorder.cases.values():
                label = node.value.operation.label
                exercised[label] = exercised.get(label, 0) + 1
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    if check.failure_info is None:
                        continue
                    failure = check.failure_info.failure
                    case = event.recorder.cases[case_id].value
                    key = (case.operation.label, check.name, failure.title, failure.message.split("\n", 1)[0])
                    failures.setdefault(key, f"{key[0]} [{check.name}] {failure.title}: {failure.message[:500]}\n"
                                             f"  {check.failure_info.code_sample[:700]}")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            value = getattr(event, "value", None) or getattr(event, "exception", None)
            failures[("error", str(value))] = f"schemathesis error: {type(value).__name__}: {value}"
    return list(failures.values()), exercised


async def test_schemathesis_finds_nothing(gw):
    fetch_nothing(gw.app[FETCHER])
    ids = [(await upload(gw, "photo.jpg", is_public="true"))["id"], (await upload(gw, "invoice.pdf"))["id"]]
    failures, exercised = await asyncio.to_thread(run_schemathesis, gw.url, ids)
    assert not failures, f"{len(failures)} schemathesis failure(s):\n\n" + "\n\n".join(failures)
    document = openapi_document(gw.app)
    every = {f"{m.upper()} {p}" for p, item in document["paths"].items() for m in item if m in METHODS}
    every.discard("GET /openapi.json")  # schemathesis leaves out the operation that serves the schema
    every -= {f"{m.upper()} {p}" for p, item in document["paths"].items() for m, op in item.items()
              if m in METHODS and "pass-through" in op["tags"]}
    assert set(exercised) == every, f"not exercised: {sorted(every - set(exercised))}"
