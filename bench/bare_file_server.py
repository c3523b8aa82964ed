"""Second baselines of ``bench/serve.py``: a bare aiohttp server answering ``GET /file/{path}``
with aiohttp's own ``web.FileResponse`` (sendfile) of that file under ``--root``, and
``GET /memory/{path}`` with its bytes from memory (read once) in a ``web.Response``; no link
check, no catalog, no middleware, no access log. The second is about the most one aiohttp event
loop serves, which bounds what the gateway (an aiohttp app) can reach. Prints ``port <n>`` once
listening.

    .venv/bin/python -m bench.bare_file_server --root var/media
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web

from bench.bare_sqlite_server import run_on_a_free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    root = args.root.resolve()

    memory: dict[str, bytes] = {}

    def resolve(request: web.Request) -> Path:
        path = (root / request.match_info["path"]).resolve()
        if not path.is_relative_to(root):
            raise web.HTTPNotFound()
        return path

    async def serve_file(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(resolve(request))

    async def serve_memory(request: web.Request) -> web.StreamResponse:
        key = request.match_info["path"]
        if key not in memory:
            memory[key] = resolve(request).read_bytes()
        return web.Response(body=memory[key], content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/file/{path:.+}", serve_file)
    app.router.add_get("/memory/{path:.+}", serve_memory)
    run_on_a_free_port(app)


if __name__ == "__main__":
    main()
