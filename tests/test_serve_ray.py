"""(f) ``ddpm serve --ray``: two Ray Serve replicas on a local Ray instance answer bitwise as ``ddpm serve``.

The server is started as a user starts it (``python -m ddpm serve --ray --replicas 2``: it starts a local Ray
instance, deploys, and stops it again on SIGTERM). The reference answers come from the same app factory that
``ddpm serve`` runs (``ddpm.serve.app``), driven in-process over ASGI; tests/test_serve_http.py shows that
those are the ``ddpm run`` answers. Each answer names the process that computed it (``x-ddpm-pid``), so the
test also sees that both replicas answered. Marked slow (Ray's start and stop take ~15 s); ``make test`` runs it.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from test_serve_helpers import npz_arrays, serve_artifacts, started_server

from ddpm.options import SamplingOptions

pytest.importorskip("ray.serve")
# slow, and serial: a local Ray instance is a dozen processes whose health checks time out when xdist workers and the
# reference models' training share the cores (`make test` runs the serial tests alone, after the rest)
pytestmark = [pytest.mark.slow, pytest.mark.serial]

from ddpm.serve import Limits, app  # noqa: E402 - after the skip: the app needs starlette too


def _bodies(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(24):
        body = {
            "model": "unet",
            "seed": rng.randrange(2**64),
            "num_samples": rng.randint(1, 6),
            "format": "npz",
        }
        if rng.random() < 0.5:
            body.update(sampler="ddim", steps=4, eta=0.5)
        out.append(body)
    return out


async def _post_all(client: httpx.AsyncClient, bodies: list[dict]) -> list[httpx.Response]:
    return await asyncio.gather(*(client.post("/v1/samples", json=b) for b in bodies))


def test_f_two_ray_replicas_answer_bitwise_as_ddpm_serve(tmp_path_factory, tmp_path):
    art = serve_artifacts(tmp_path_factory)
    rng = random.Random()
    seed0 = rng.randrange(2**63)
    print(f"\nrequests drawn with random.Random({seed0})")
    bodies = _bodies(random.Random(seed0))
    local = app({"unet": art["unet"]}, limits=Limits(), options=SamplingOptions(device="cpu", threads=1))

    async def reference():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=local), base_url="http://t") as client:
            return await _post_all(client, bodies)

    try:
        want = asyncio.run(reference())
    finally:
        local.service.close()
    engines = {"unet": art["unet"]}
    with started_server(
        engines, tmp_path, "--ray", "--replicas", "2", "--replica-cpus", "1", wait_s=150
    ) as srv:

        async def on_ray():
            got: list[httpx.Response] = []
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                # rounds until both replicas have answered (Ray's router picks by queue length)
                for _ in range(8):
                    got += await _post_all(client, bodies)
                    if len({r.headers.get("x-ddpm-pid") for r in got}) >= 2:
                        break
            return got

        got = asyncio.run(on_ray())
    assert all(r.status_code == 200 for r in want + got), [r.text for r in want + got if r.status_code != 200]
    for i, r in enumerate(got):
        a, b = npz_arrays(r.content), npz_arrays(want[i % len(bodies)].content)
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes(), bodies[i % len(bodies)]
        assert a["samples"].tobytes() == b["samples"].tobytes()
    pids = {r.headers["x-ddpm-pid"] for r in got}
    assert len(pids) == 2, pids
    assert srv.proc.returncode == 0, srv.stderr()
