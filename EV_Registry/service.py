"""Serving the API: uvicorn on a socket of our own, stopped by the service's Shutdown.

The socket is bound here, so a port in use is one clear error (uvicorn would exit the
process itself), and port 0 tells the port chosen. uvicorn's own signal handling is left out:
signals only ask the service to shut down (shared/lifecycle.py), which then tells uvicorn to
stop accepting, finish what is in flight and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from EV_Registry.api import create_app
from EV_Registry.central import CentralClient
from EV_Registry.config import RegistrySettings
from EV_Registry.limits import BodyLimit
from shared.errors import ConfigError
from shared.lifecycle import Shutdown
from shared.tls import client_context

log = logging.getLogger(__name__)

GRACEFUL_SECONDS = 5  # what a request in flight has to finish at shutdown


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the service's Shutdown decides when to stop


def bind(host: str, port: int) -> socket.socket:
    """The listening socket; ConfigError (one line) when the address cannot be had."""
    try:
        return socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


async def serve(settings: RegistrySettings, shutdown: Shutdown) -> None:
    """Serve the API until shutdown is requested."""
    host, port = settings.central
    tls = client_context(settings.central_ca) if settings.central_tls else None
    central = CentralClient(host, port, tls=tls, timeout=settings.timeout)
    app = BodyLimit(create_app(central), settings.max_body)
    config = uvicorn.Config(
        app,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        log_config=None,  # our logging (shared/logs.py)
        access_log=False,  # Central's audit log records every call
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )
    sock = bind(settings.listen_host, settings.http_port)
    server = _Server(config)
    bound = sock.getsockname()[1]
    log.info(
        "EV_Registry on %s://%s:%d/ (Central at %s)",
        settings.scheme,
        settings.listen_host,
        bound,
        central.address,
    )
    try:
        async with asyncio.TaskGroup() as tasks:
            serving = tasks.create_task(server.serve(sockets=[sock]), name="registry-api")
            stop = tasks.create_task(shutdown.wait(), name="registry-shutdown")
            await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
            server.should_exit = True
            stop.cancel()
    finally:
        sock.close()
