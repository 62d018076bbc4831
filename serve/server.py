"""Running the app in one process: uvicorn on a socket bound here, and the drain on SIGTERM.

SIGTERM (what a supervisor, Kubernetes or systemd sends) drains instead of stopping at once: the service is
marked draining, so every new request is answered 503 with ``Connection: close`` (a load balancer retries it
elsewhere; the listening socket stays open so nothing sees "connection refused" mid-drain), the requests in
flight finish, and once none is left (or ``drain_s`` has passed) uvicorn shuts down and the process exits 0.
A second SIGTERM, or Ctrl-C, stops at once (uvicorn's own handling).
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from typing import Any

import uvicorn

from ddpm.errors import InvalidArgumentError

from .asgi import Guard

__all__ = ["serve_forever", "bind"]


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, guard: Guard, drain_s: float) -> None:
        super().__init__(config)
        self.guard, self.drain_s = guard, drain_s
        self.deadline: float | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if sig == signal.SIGTERM and self.deadline is None:
            self.deadline = time.monotonic() + self.drain_s
            self.guard.service.draining = True
            n = self.guard.service.in_flight
            print(
                f"ddpm serve: SIGTERM: draining {n} request(s), at most {self.drain_s:g} s", file=sys.stderr
            )
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.deadline is not None and not self.should_exit:
            left = self.deadline - time.monotonic()
            if self.guard.service.in_flight == 0 or left <= 0.5:
                # what is left of the drain bounds uvicorn's own wait for open connections
                self.config.timeout_graceful_shutdown = max(0.1, left - 0.3)
                self.should_exit = True
        return await super().on_tick(counter)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); OSError (port in use, bad address) before any model is served."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InvalidArgumentError(f"--host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve_forever(
    guard: Guard, sock: socket.socket, *, drain_s: float, log_level: str = "warning", access_log: bool = False
) -> None:
    """Serve ``guard`` on ``sock`` until SIGTERM (drain, see the module docstring) or Ctrl-C."""
    config = uvicorn.Config(
        guard,
        interface="asgi3",
        lifespan="on",
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=drain_s,
        timeout_keep_alive=5,
        server_header=False,
    )
    server = _DrainingServer(config, guard, drain_s)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"ddpm serve: listening on http://{shown}:{port} (models: {', '.join(guard.service.models)})",
        file=sys.stderr,
    )
    server.run(sockets=[sock])
