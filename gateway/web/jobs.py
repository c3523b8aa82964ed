"""The durable queue under ``/api/v1/jobs`` (an ``admin`` key bound to no tenant): list, get, and
retry a dead job."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.catalog import JOB_STATES
from gateway.catalog.rows import JobRow
from gateway.keys import CATALOG, QUEUE
from gateway.web.auth import require_operator
from gateway.web.errors import ApiError
from gateway.web.models import MAX_LIMIT, iso

JOBS_SPAN = "jobs span every tenant"


def job_view(job: Mapping[str, Any]) -> dict[str, Any]:
    """The API's JSON object for a job row (``Job`` in the OpenAPI document)."""
    return {"id": job["id"], "kind": job["kind"], "key": job["key"], "state": job["state"],
            "attempts": job["attempts"], "run_at": iso(job["run_at"]), "created_at": iso(job["created_at"]),
            "updated_at": iso(job["updated_at"]), "last_error": job.get("last_error"),
            "payload": job["payload"]}


async def list_jobs(request: web.Request) -> web.Response:
    """``GET /jobs?state=&kind=&limit=&cursor=``: the durable queue, newest first (admin), a page
    of at most ``limit`` jobs read as such from the catalog (done jobs are kept for days: millions
    at a high rate); ``next_cursor`` (the last job's id, as text) gives the next page."""
    require_operator(request, JOBS_SPAN)
    state, kind = request.query.get("state"), request.query.get("kind")
    if state is not None and state not in JOB_STATES:
        raise ApiError(422, f"one of {', '.join(JOB_STATES)}", field="state")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise ApiError(422, "expected a whole number", field="limit") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(422, f"between 1 and {MAX_LIMIT}", field="limit")
    cursor = request.query.get("cursor")
    before = int(cursor) if cursor is not None and cursor.isascii() and cursor.isdigit() and len(cursor) <= 19 else None
    if cursor is not None and (before is None or before >= 2 ** 63):  # a job id: SQLite INTEGER
        raise ApiError(422, "not a cursor of this listing (pass next_cursor as it was)", field="cursor")
    jobs = await request.app[CATALOG].list_jobs(state=state, kind=kind, limit=limit + 1, newest_first=True,
                                                before=before)
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return web.json_response({"items": [job_view(j) for j in jobs],
                              "next_cursor": str(jobs[-1]["id"]) if more else None})


async def _job(request: web.Request) -> JobRow:
    try:
        job_id = int(request.match_info["id"])
    except ValueError:
        job_id = -1
    job = await request.app[CATALOG].get_job(job_id) if 0 <= job_id < 2 ** 63 else None  # SQLite INTEGER
    if job is None:
        raise ApiError(404, "no such job")
    return job


async def get_job(request: web.Request) -> web.Response:
    """``GET /jobs/{id}``: state, attempts, last error (admin)."""
    require_operator(request, JOBS_SPAN)
    return web.json_response(job_view(await _job(request)))


async def retry_job(request: web.Request) -> web.Response:
    """``POST /jobs/{id}/retry``: queue a dead job again (admin) and answer it as the retry left
    it (``queued``, attempts 0); 409 unless it is dead."""
    require_operator(request, JOBS_SPAN)
    job = await _job(request)
    queued = await request.app[CATALOG].retry_dead_job(job["id"])  # as queued, before a worker claims it
    if queued is None:
        raise ApiError(409, f"job {job['id']} is {job['state']}, not dead")
    request.app[QUEUE].notify()
    return web.json_response(job_view(queued))
