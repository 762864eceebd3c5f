"""The HTTP API and dashboard served by uvicorn in a thread of `fleet serve`.

    server = serve_in_thread(settings, ingest=ingest, relay=relay)   # raises ServerError
    server.port                                                        # the bound port
    server.stop()
"""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


class ServerError(OSError):
    """The API could not start (port taken, address not ours...)."""


class ApiServer:
    """uvicorn serving `app` on `host:port` (0: a free port) in a daemon thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        try:
            self.sock = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            raise ServerError(f"cannot serve the API on {host}:{port}: {exc.strerror or exc} "
                              "(choose another with --api-port or IWAKI_API_PORT, 0 for none)") from None
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="fleet-api", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "ApiServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServerError(f"the API did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def serve_in_thread(settings, *, ingest=None, relay=None) -> ApiServer:
    from fleet.api import create_app
    return ApiServer(create_app(settings, ingest=ingest, relay=relay), settings.api_host, settings.api_port).start()
