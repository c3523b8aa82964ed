"""The one way an HTTP request fails: raise :class:`ApiError`; :func:`error_middleware` turns it
(and aiohttp's own ``HTTPException``) into a JSON ``{"error": message, ...}`` answer, counts and
times every request by route template, and answers 500 for anything unexpected."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.keys import HTTP_METRICS
from gateway.metrics import http_method

log = logging.getLogger("gateway.http")


class ApiError(Exception):
    """An HTTP error answer: ``status``, a ``message`` for people and, optionally, the ``field``
    of the request it is about (then the message reads ``"<field>: <message>"``), extra JSON
    members (``extra``) and response ``headers``."""

    def __init__(self, status: int, message: str, *, field: str | None = None,
                 headers: Mapping[str, str] | None = None, **extra: object) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status = status
        self.message = str(self)
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self) -> web.Response:
        """The JSON answer ``{"error": message, **extra}``."""
        return web.json_response({"error": self.message, **self.extra}, status=self.status,
                                 headers=self.headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request by route template; turn errors into JSON answers."""
    started = time.monotonic()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as exc:
        status = exc.status
        return exc.response()
    except web.HTTPException as exc:
        status = exc.status
        if exc.status >= 400 and exc.content_type != "application/json":
            return ApiError(exc.status, exc.reason).response()
        raise
    except HttpProcessingError as exc:  # malformed input the HTTP parser found late (multipart headers)
        status = 400
        return ApiError(400, f"malformed request: {exc.message}").response()
    except ConnectionError:  # ConnectionResetError, BrokenPipeError, aiohttp's "Connection lost"
        # the client hung up (players and Range probes do it all the time): an expected condition,
        # not an error of ours. Answering a fresh response lets aiohttp notice the closed
        # connection quietly and log the request as 499 in the access log, without a traceback.
        status = 499
        return web.Response(status=499)
    except asyncio.CancelledError:
        status = 499
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, route)
        return ApiError(500, "internal error").response()
    finally:
        request.app[HTTP_METRICS].observe_http(route, http_method(request.method), status, time.monotonic() - started)
