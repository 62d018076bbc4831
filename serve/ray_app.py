"""``ddpm serve --ray``: the same ASGI app as a Ray Serve deployment, N replicas across a cluster.

Ray's part is placement and routing: each replica is an actor that builds the app with ``ddpm.serve.app`` (it
opens and warms up its own models) and Ray's HTTP proxy spreads requests over the replicas. Batching stays
ours, inside each replica, and Ray Serve's ``@serve.batch`` is not used: it hands a method a list of whole
requests, so it cannot merge by plan (a list may mix samplers and step counts, which cannot share a loop),
cannot split a 4096-sample request into loop-sized pieces, and counts requests rather than rows. Our batcher
does all three and keeps each request's seed and sample indices, which is what makes every answer bitwise the
``ddpm run`` answer; a replica therefore answers exactly as ``ddpm serve`` does.

``max_ongoing_requests`` is raised to the queue bound: Ray's default (5 per replica) would starve the batcher of
requests to merge. The replicas' own 429 (queue full) and 503 answers pass through the proxy unchanged.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import ray
from ray import serve

from ddpm.options import SamplingOptions

from .asgi import app
from .limits import Limits

__all__ = ["DDPMDeployment", "deployment", "run_on_ray"]


@serve.ingress()
class DDPMDeployment:
    """One replica: ``ddpm.serve.app`` built in the replica's process (Ray calls __serve_build_asgi_app__)."""

    def __init__(
        self, engines: dict[str, str], limits: Limits, options: SamplingOptions, token: str | None
    ) -> None:
        self.engines, self.limits, self.options, self.token = engines, limits, options, token

    def __serve_build_asgi_app__(self) -> Any:
        return app(self.engines, limits=self.limits, options=self.options, token=self.token)


def deployment(
    engines: dict[str, Path],
    *,
    limits: Limits,
    options: SamplingOptions,
    token: str | None,
    replicas: int,
    replica_cpus: float = 1.0,
) -> Any:
    """The bound Ray Serve application (``serve.run`` it). Each replica computes on ``replica_cpus`` threads
    unless ``options.threads`` says otherwise."""
    threads = options.threads or max(1, int(replica_cpus))
    dep = serve.deployment(
        DDPMDeployment,
        name="ddpm",
        num_replicas=replicas,
        max_ongoing_requests=limits.max_queue,
        ray_actor_options={"num_cpus": replica_cpus},
        graceful_shutdown_timeout_s=limits.drain_s,
    )
    paths = {name: str(path) for name, path in engines.items()}
    return dep.bind(paths, limits, options.replace(threads=threads), token)


def run_on_ray(
    engines: dict[str, Path],
    *,
    limits: Limits,
    options: SamplingOptions,
    token: str | None,
    address: str | None,
    replicas: int,
    replica_cpus: float,
    host: str,
    port: int,
) -> None:
    """Connect to (or start) Ray, deploy, wait for SIGTERM / Ctrl-C, then shut Serve down (Ray drains the
    replicas for up to --drain-s) and disconnect."""
    # Ray reports usage statistics over the network unless told not to; a server's choice, not Ray's default
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Serve gives its HTTP proxy 5 s to report ready and kills it after three misses: on a busy small machine
    # (2 cores shared with sampling, a CI run) that loop never ends. Generous defaults, the user's env wins; the
    # processes Ray starts inherit them.
    for key, value in (
        ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60"),
        ("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60"),
    ):
        os.environ.setdefault(key, value)
    ray.init(address=address, include_dashboard=False)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            deployment(
                engines,
                limits=limits,
                options=options,
                token=token,
                replicas=replicas,
                replica_cpus=replica_cpus,
            ),
            name="ddpm",
            route_prefix="/",
        )
        print(
            f"ddpm serve: Ray Serve deployment 'ddpm' ({replicas} replica(s)) on http://{host}:{port} "
            f"(models: {', '.join(engines)})",
            file=sys.stderr,
        )
        while not stop.wait(0.5):
            pass
        print("ddpm serve: stopping the Ray Serve deployment", file=sys.stderr)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for s, h in previous.items():
                signal.signal(s, h)
