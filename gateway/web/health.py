"""Operations: ``/healthz``, ``/readyz`` and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.keys import CATALOG, METRICS, QUEUE, SERVING, SETTINGS, STORAGE
from gateway.web.auth import require


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 when the catalog and storage answer, else 503 naming what failed."""
    checks = await readiness(request.app)
    ready = all(v == "ok" for v in checks.values())
    return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)


async def readiness(app: web.Application) -> dict[str, str]:
    """``{"catalog"|"storage"|"backlog"|"serving": "ok" or "<exception type>: <message>"}``: each
    checked, 5 s at most; ``backlog`` fails while the oldest waiting media has used more than
    ``[queue] backlog_ready_fraction`` of its provider's deadline (the gateway cannot keep up);
    ``serving`` (only with ``[serving] workers``) while no serving worker runs."""
    checks: dict[str, str] = {}
    named = [("catalog", app[CATALOG].check), ("storage", app[STORAGE].check), ("backlog", app[QUEUE].check)]
    if SERVING in app:
        named.append(("serving", app[SERVING].check))
    for name, check in named:
        try:
            await asyncio.wait_for(check(), 5)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"{type(exc).__name__}: {exc}"
    return checks


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format (behind an API key with ``api.metrics_key``)."""
    if request.app[SETTINGS].api.metrics_key:
        require(request, "read")
    m = request.app[METRICS]
    await m.refresh(request.app[CATALOG], ["ingest", "deliver"])
    await m.refresh_storage(request.app[STORAGE])
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
