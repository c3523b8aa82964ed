"""``POST /api/v1/admin/cleanup``: the retention cleanup, run now."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.keys import RETENTION
from gateway.retention import CleanupBusy
from gateway.web.auth import require_operator
from gateway.web.errors import ApiError

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "")


async def admin_cleanup(request: web.Request) -> web.Response:
    """``POST /api/v1/admin/cleanup[?dry_run=true]``: run the retention cleanup now and answer its
    report (:meth:`gateway.retention.CleanupReport.to_dict`). Needs an API key with the ``admin``
    scope and no tenant (a run covers every tenant's objects).

    200 with the report; 409 if a run is in progress (here or in another process); 503 with the
    report when storage or the catalog failed during the run (its ``error`` says why); 400 for a
    ``dry_run`` that is not a boolean; 401/403 for a missing, wrong or tenant-limited key. The run
    goes on if the client hangs up.
    """
    require_operator(request, "a cleanup covers every tenant")
    flag = request.query.get("dry_run", "false").lower()
    if flag not in _TRUE + _FALSE:
        raise ApiError(400, "dry_run must be true or false")
    try:
        task = request.app[RETENTION].spawn(dry_run=flag in _TRUE, trigger="api")
        report = await asyncio.shield(task)
    except CleanupBusy as exc:
        raise ApiError(409, str(exc))
    return web.json_response(report.to_dict(), status=503 if report.error else 200)
