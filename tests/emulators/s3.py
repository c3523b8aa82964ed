"""moto's S3 server on 127.0.0.1, serving one request at a time.

moto's ``ThreadedMotoServer`` handles requests on many threads, and its in-memory S3 is not safe
for concurrent writes to one key (a second PUT closes the buffer the first is still reading:
"I/O operation on closed file"). Real S3 and MinIO are. This wrapper serves moto's own WSGI app
with werkzeug's single-threaded server (HTTP/1.0, one connection at a time): the gateway still
sends concurrent requests; moto answers them in turn. Its state lives in this process, so a
server stopped and started again on the same port still has its buckets.

Run standalone: ``python -m tests.emulators.s3 --port 5000``.
"""

from __future__ import annotations

import argparse
import threading

from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server


class SerialMotoServer:
    """``start()`` / ``stop()`` a moto S3 endpoint; ``url`` once started."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self.url = ""
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a background thread."""
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(self.host, self.port, app, threaded=False,
                                   request_handler=MotoRequestHandler)
        self.port = self._server.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="moto-s3")
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and free the port (state is kept)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def main() -> None:
    """Serve until interrupted."""
    parser = argparse.ArgumentParser(description="moto S3 server, one request at a time")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    server = SerialMotoServer(args.host, args.port)
    server.start()
    print(f"moto S3 on {server.url} (any access key works)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
