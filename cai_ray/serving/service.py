"""Start Ray Serve's HTTP proxy where ``serve.host``/``serve.port`` say, run applications on it, stop them.

Serve keeps one proxy per Ray cluster (per node): the first start fixes its address.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cai_ray.config import ServeConfig
from cai_ray.serving.auth import read_token, token_digest


@dataclass(frozen=True)
class Service:
    """A running Serve application."""

    name: str  # Serve application name
    url: str  # base URL, e.g. http://127.0.0.1:8000
    authenticated: bool  # requests need the bearer token


def start_proxy(serve_cfg: ServeConfig) -> None:
    """Start Serve (controller and HTTP proxy) on ``serve.host:serve.port`` in the connected Ray cluster.

    Serve keeps one proxy address per cluster: when Serve already runs there, Serve keeps its address (and logs
    that the new one differs), so several services of one cluster share one ``serve`` section.
    """
    from ray import serve

    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})


def auth_digest(serve_cfg: ServeConfig) -> str | None:
    """The digest of the configured bearer token (None: no token configured, localhost only)."""
    token = read_token(serve_cfg)
    return token_digest(token) if token is not None else None


def run_app(app: Any, *, name: str, route_prefix: str, serve_cfg: ServeConfig, authenticated: bool) -> Service:
    """Deploy ``app`` under ``route_prefix`` and wait until it is ready (Serve raises if a replica cannot start)."""
    from ray import serve

    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    host = "127.0.0.1" if serve_cfg.host in ("0.0.0.0", "::") else serve_cfg.host
    return Service(name, f"http://{host}:{serve_cfg.port}{route_prefix.rstrip('/')}", authenticated)


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (turned into KeyboardInterrupt, so the caller's ``finally`` runs)."""
    import signal

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def stop_serve() -> None:
    """Delete every Serve application and stop Serve's controller and proxies (idempotent)."""
    from ray import serve

    serve.shutdown()
