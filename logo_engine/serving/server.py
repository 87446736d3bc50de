"""Run the app with uvicorn: what ``logo serve`` does.

The server starts listening at once and loads the engine in a background thread: ``/healthz``
and every ``/v1`` call answer 503 until the model is loaded. If loading fails the server stops
and :func:`serve` returns 1.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from logo_engine.base import BaseEngine
from logo_engine.serving.app import ServeConfig, create_app

logger = logging.getLogger(__name__)


def serve(
    engine: BaseEngine | Callable[[], BaseEngine],
    config: ServeConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> int:
    """Serve ``engine`` (or the engine a loader returns) until interrupted; the exit status."""
    failed = False
    server: uvicorn.Server | None = None

    def on_load_error(exc: BaseException) -> None:
        nonlocal failed
        failed = True
        logger.error("stopping: the model failed to load (%s)", exc)
        if server is not None:
            server.should_exit = True

    app = create_app(engine, config, on_load_error=on_load_error)
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    )
    server.run()
    return 1 if failed else 0


class BackgroundServer:
    """A server on 127.0.0.1 in a thread of this process, on a free port (tests, benchmarks).

    >>> with BackgroundServer(engine) as server:
    ...     OpenAI(base_url=server.base_url, api_key="-").models.list()
    """

    def __init__(
        self,
        engine: BaseEngine | Callable[[], BaseEngine],
        config: ServeConfig | None = None,
        *,
        startup_timeout: float = 60.0,
        **app_kwargs: Any,
    ) -> None:
        self.app = create_app(engine, config, **app_kwargs)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5)
        )
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name="logo-server",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start within {startup_timeout} s")
            time.sleep(0.01)

    @property
    def state(self) -> Any:
        """The app's :class:`~logo_engine.serving.app.ServerState` (engine, metrics)."""
        return self.app.state.logo

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving and wait for the thread (bounded)."""
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
