"""``ddpm serve`` as a user runs it: ``python -m ddpm serve ...`` in a subprocess on a free port, driven over
HTTP by httpx (sync and async). The acceptance lines of the serving issue:

(a) bitwise: 50 concurrent requests, mixed settings, seeds, sample counts and arrival times; every npz's arr_0
    equals the arr_0 ``ddpm run --npz`` writes for the same settings (one ``ddpm run`` per setting and seed).
(b) hostile load: 2,000 requests, 20% malformed (bad JSON, wrong types, num_samples 1e9, 100 MB bodies, unknown
    models, bodies that trickle in, ...): no 5xx, every refusal a one-line JSON 4xx, the server stays up, its RSS
    stays bounded, every valid answer is correct.
(c) --token-file: no or a wrong token -> 401 and nothing computed (the metrics show no loop).
(d) SIGTERM under load: in-flight requests complete, new ones get 503, the process exits 0 within --drain-s.

One server per module (per xdist worker), started with --token-file: starting one costs seconds of a 2-core
machine. (c) comes first in the file, so it sees a server that has computed nothing; (d) comes last, as it stops
the server. Every other request carries the token.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import signal
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from test_serve_helpers import (
    ddpm_run_arr0,
    metric,
    npz_arrays,
    raw_request,
    rss_kb,
    serve_artifacts,
    started_server,
)

# ddpm run flags -> the same settings as a request body
SETTINGS = {
    "unet-default": ("unet", {}),  # the model's recommendation: dpm++2m, 4 steps, clip 1
    "unet-ddpm": ("unet", {"sampler": "ddpm", "steps": 5, "clip": 1.0}),
    "unet-ddim": ("unet", {"sampler": "ddim", "steps": 4, "eta": 0.5}),
    "mlp-sde": ("mlp", {"sampler": "dpm++2m-sde", "steps": 5}),
    "unet-slow": ("unet", {"sampler": "ddpm", "steps": 300, "clip": 1.0}),  # (d): long enough to be in flight
}
MIXED = ["unet-default", "unet-ddpm", "unet-ddim", "mlp-sde"]
MAX_BATCH = 16
# measured ~5 MB over the 2,000 requests (thread pools, allocator arenas); one buffered 100 MB body breaks it
RSS_GROWTH_KB = 64 << 10


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return serve_artifacts(tmp_path_factory)


TOKEN = "s3cret-" + "x" * 30
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AUTH_LINE = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
DRAIN_S = 20.0


@pytest.fixture(scope="module")
def server(art, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_http")
    (folder / "token").write_text(TOKEN + "\n")
    engines = {"unet": art["unet"], "mlp": art["mlp"]}
    args = ["--max-batch", str(MAX_BATCH), "--max-wait-ms", "20", "--body-timeout-s", "1.5"]
    args += ["--max-samples", "64", "--drain-s", str(DRAIN_S), "--token-file", str(folder / "token")]
    with started_server(engines, folder, *args) as srv:
        yield srv


class References:
    """arr_0 of ``ddpm run --npz`` per (setting, seed), run once with the most samples any request asked."""

    def __init__(self, art, folder) -> None:
        self.art, self.folder, self.cache = art, folder, {}

    def prepare(self, wants: list[tuple[str, int, int]]) -> None:
        most: dict[tuple[str, int], int] = {}
        for name, seed, n in wants:
            most[(name, seed)] = max(n, most.get((name, seed), 0))
        for (name, seed), n in most.items():
            model, flags = SETTINGS[name]
            arr = ddpm_run_arr0(self.art[model], self.folder, n, {**flags, "seed": seed})
            self.cache[(name, seed)] = arr

    def arr0(self, name: str, seed: int, n: int) -> np.ndarray:
        return self.cache[(name, seed)][:n]  # sample k does not depend on how many were drawn


def _body(name: str, seed: int, n: int, fmt: str = "npz") -> dict:
    model, flags = SETTINGS[name]
    return {"model": model, "seed": seed, "num_samples": n, "format": fmt, **flags}


# ---- (c) the token: the first test of the module, on a server that has computed nothing yet ----


def test_c_wrong_or_missing_token_is_401_and_computes_nothing(server):
    bad_headers = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                   {"Authorization": f"bearer {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}]  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for h in bad_headers:
            r = client.post("/v1/samples", json={"model": "unet", "num_samples": 2}, headers=h)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
            assert r.json() == {"error": "missing or wrong bearer token"}
        for path in ("/v1/models", "/metrics"):
            assert client.get(path).status_code == 401
        assert client.post("/v1/denoise", files={"image": ("x.png", _png_bytes())}).status_code == 401
        assert client.get("/healthz").status_code == 200  # probes need no token
        port = int(server.url.rsplit(":", 1)[1])
        assert _hundred_mb_declared(port, auth=b"")[0] == 401  # refused before its size is even looked at
        text = client.get("/metrics", headers=AUTH).text
        assert metric(text, "ddpm_serve_samples_total", model="unet") == 0.0
        assert metric(text, "ddpm_serve_batch_rows_count", model="unet") == 0.0
        assert metric(text, "ddpm_serve_requests_total", route="/v1/samples", status="401") == 6
        ok = client.post(
            "/v1/samples", json={"model": "unet", "num_samples": 2, "format": "npz"}, headers=AUTH
        )
        assert ok.status_code == 200
        text = client.get("/metrics", headers=AUTH).text
        assert metric(text, "ddpm_serve_samples_total", model="unet") == 2.0


def _drawn_rng(what: str) -> random.Random:
    """A fresh random draw of the test's load, its seed printed so that a failure can be replayed."""
    seed = random.Random().randrange(2**63)
    print(f"\n{what} drawn with random.Random({seed})")
    return random.Random(seed)


def test_a_concurrent_requests_are_bitwise_the_ddpm_run_answers(server, art, tmp_path):
    rng = _drawn_rng("requests")
    seeds = [rng.randrange(2**64) for _ in range(3)]
    reqs = [
        (rng.choice(MIXED), rng.choice(seeds), rng.randint(1, 40), rng.uniform(0, 0.1)) for _ in range(50)
    ]
    refs = References(art, tmp_path)
    refs.prepare([(name, seed, n) for name, seed, n, _ in reqs])
    before = httpx.get(server.url + "/metrics", headers=AUTH).text

    async def one(client, name, seed, n, delay):
        await asyncio.sleep(delay)
        return await client.post("/v1/samples", json=_body(name, seed, n), timeout=60)

    async def run_all():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, headers=AUTH) as client:
            return await asyncio.gather(*(one(client, *r) for r in reqs))

    answers = asyncio.run(run_all())
    for (name, seed, n, _), resp in zip(reqs, answers, strict=True):
        assert resp.status_code == 200, resp.text
        arrays = npz_arrays(resp.content)
        want = refs.arr0(name, seed, n)
        assert arrays["arr_0"].dtype == want.dtype and arrays["arr_0"].shape == want.shape
        assert arrays["arr_0"].tobytes() == want.tobytes(), (name, seed, n)
        assert arrays["samples"].shape[0] == n and arrays["samples"].dtype == np.float32
        assert json.loads(resp.headers["x-ddpm-settings"])["seed"] == seed
    # the requests were merged: fewer loops than if each piece had run alone
    after = httpx.get(server.url + "/metrics", headers=AUTH).text
    loops = sum(metric(after, "ddpm_serve_batch_rows_count", model=m) for m in ("unet", "mlp"))
    loops -= sum(metric(before, "ddpm_serve_batch_rows_count", model=m) for m in ("unet", "mlp"))
    alone = sum(-(-n // MAX_BATCH) for _, _, n, _ in reqs)
    print(f"{len(reqs)} requests, {alone} loops if each ran alone, {loops:g} merged loops")
    assert 0 < loops < alone


def test_formats_and_the_other_endpoints(server, art, tmp_path):
    refs = References(art, tmp_path)
    refs.prepare([("unet-default", 7, 5)])
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client:
        js = client.post("/v1/samples", json={"model": "unet", "seed": 7, "num_samples": 5, "format": "json"})
        npz = client.post("/v1/samples", json={"model": "unet", "seed": 7, "num_samples": 5, "format": "npz"})
        png = client.post("/v1/samples", json={"model": "unet", "seed": 7, "num_samples": 5})
        models = client.get("/v1/models").json()
        img = _png_bytes()
        den = client.post(
            "/v1/denoise",
            files={"image": ("x.png", img, "image/png")},
            data={"model": "unet", "t": "50", "format": "npz"},
        )
        big = client.post(
            "/v1/samples", json={"model": "unet", "num_samples": 5, "steps": 1000, "sampler": "ddpm"}
        )
        dyn = client.post("/v1/samples", json={"model": "unet", "clip": "dynamic:0.9", "format": "json"})
        uncond = client.post("/v1/samples", json={"model": "unet", "classes": [1]})
    assert js.status_code == npz.status_code == png.status_code == 200
    samples = np.asarray(js.json()["samples"], dtype=np.float32)
    assert samples.tobytes() == npz_arrays(npz.content)["samples"].tobytes()
    assert npz_arrays(npz.content)["arr_0"].tobytes() == refs.arr0("unet-default", 7, 5).tobytes()
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert [m["name"] for m in models["models"]] == ["unet", "mlp"]
    assert models["models"][0]["defaults"] == {
        "sampler": "dpm++2m", "steps": 4, "spacing": "trailing", "clip": 1.0, "eta": 0.0, "variance": "fixed_small"
    }  # fmt: skip
    assert den.status_code == 200, den.text
    arrays = npz_arrays(den.content)
    assert arrays["arr_0"].shape == (1, 8, 8, 1) and int(arrays["t"]) == 50
    assert big.status_code == 200  # 1000 steps is within --max-steps
    assert dyn.status_code == 200 and dyn.json()["clip"] == "dynamic:0.9"
    assert uncond.status_code == 400 and "needs a class-conditional model" in uncond.json()["error"]


def _png_bytes(size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), 100).save(buf, format="PNG")
    return buf.getvalue()


# ---- (b) hostile load ----


def _hundred_mb_declared(port: int, auth: bytes = AUTH_LINE) -> tuple[int, bytes]:
    head = b"POST /v1/samples HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 104857600\r\n\r\n"
    return raw_request(port, head)  # answered from the header: the body is never sent


def _hundred_mb_chunked(port: int) -> tuple[int, bytes]:
    head = b"POST /v1/samples HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"Transfer-Encoding: chunked\r\n\r\n"
    block = b"100000\r\n" + b"[" * (1 << 20) + b"\r\n"

    def send(sock):
        try:
            for _ in range(100):
                sock.sendall(block)
        except OSError:
            pass  # the server refused the body and closed

    return raw_request(port, head, send)


def _trickle(port: int) -> tuple[int, bytes]:
    body = b'{"model": "unet", "num_samples": 1}'
    head = b"POST /v1/samples HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"Content-Length: %d\r\n\r\n" % len(body)

    def send(sock):
        try:
            for i in range(len(body)):
                sock.sendall(body[i : i + 1])
                time.sleep(0.25)
        except OSError:
            pass

    return raw_request(port, head, send)


MALFORMED = [
    ("POST", "/v1/samples", b'{"model": "unet", '),
    ("POST", "/v1/samples", b'{"model": "unet", "steps": "four"}'),
    ("POST", "/v1/samples", b'{"model": "unet", "seed": "x"}'),
    ("POST", "/v1/samples", b'{"model": "unet", "num_samples": [1]}'),
    ("POST", "/v1/samples", b'{"model": "unet", "num_samples": 1e9}'),
    ("POST", "/v1/samples", b'{"model": "unet", "num_samples": 1000000000}'),
    ("POST", "/v1/samples", b'{"model": "../../etc/passwd"}'),
    ("POST", "/v1/samples", b'{"model": "unet", "engine": "/tmp/x.onnx"}'),
    ("POST", "/v1/samples", b"[1, 2, 3]"),
    ("POST", "/v1/samples", b"[" * 5000),
    ("POST", "/v1/samples", b'{"model": "\xff\xfe"}'),
    ("POST", "/v1/samples", b'{"model": "unet", "steps": 100000}'),
    ("POST", "/v1/samples", b'{"model": "unet", "sampler": "dpm++2m", "eta": 1}'),
    ("POST", "/v1/samples", b'{"model": "unet", "clip": -1}'),
    ("POST", "/v1/samples", b""),
    ("GET", "/v1/samples", b""),
    ("POST", "/v1/nothing", b"{}"),
    ("POST", "/v1/denoise", b"not a form"),
]


def test_b_hostile_load_no_5xx_bounded_memory_correct_answers(server, art, tmp_path):
    rng = _drawn_rng("load")
    seeds = [rng.randrange(2**64) for _ in range(4)]
    valid = [
        (rng.choice(["unet-default", "mlp-sde"]), rng.choice(seeds), rng.randint(1, 4)) for _ in range(1600)
    ]
    refs = References(art, tmp_path)
    refs.prepare(valid)
    port = int(server.url.rsplit(":", 1)[1])
    specials = [_hundred_mb_declared] * 4 + [_hundred_mb_chunked] * 2 + [_trickle] * 2
    bad = [rng.choice(MALFORMED) for _ in range(400 - len(specials))]
    bad.append(("POST", "/v1/denoise", None))  # a multipart form whose file is no image (replaces one above)
    bad.pop(0)
    jobs = [("ok", v) for v in valid] + [("bad", b) for b in bad]
    rng.shuffle(jobs)
    rss_before = rss_kb(server.pid)

    async def one(client, kind, what):
        if kind == "ok":
            return kind, what, await client.post("/v1/samples", json=_body(*what))
        method, path, content = what
        if content is None:
            files = {"image": ("x.png", b"GIF89a not really", "image/png")}
            return kind, what, await client.post(path, files=files, data={"model": "unet", "t": "10"})
        return kind, what, await client.request(method, path, content=content)

    async def load():
        # 32 clients, each with its own connection, taking the next job when its answer is in (one shared
        # client's pool costs O(waiting requests) per request, which would measure httpx, not the server)
        todo = iter(jobs)

        async def client_loop():
            async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=AUTH) as client:
                return [await one(client, k, w) for k, w in todo]

        raw = [asyncio.to_thread(f, port) for f in specials]
        done = await asyncio.gather(*(client_loop() for _ in range(32)), *raw)
        return [a for part in done[:32] for a in part], done[32:]

    t0 = time.perf_counter()
    answers, raw = asyncio.run(load())
    seconds = time.perf_counter() - t0
    assert len(answers) == len(jobs)
    rss_after = rss_kb(server.pid)
    print(f"{len(jobs) + len(raw)} requests in {seconds:.1f} s; server RSS {rss_before} -> {rss_after} kB")
    statuses: dict[int, int] = {}
    for kind, what, resp in answers:
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        if kind == "ok":
            assert resp.status_code == 200, (what, resp.text)
            name, seed, n = what
            assert npz_arrays(resp.content)["arr_0"].tobytes() == refs.arr0(name, seed, n).tobytes(), what
        else:
            assert 400 <= resp.status_code < 500, (what, resp.status_code, resp.text)
            err = resp.json()["error"]
            assert err and "\n" not in err
    print("statuses:", dict(sorted(statuses.items())))
    raw_status = [s for s, _ in raw]
    assert raw_status[:4] == [413] * 4, raw
    assert raw_status[4:6] == [413] * 2, raw
    assert raw_status[6:] == [408] * 2, raw
    assert all(b'"error"' in body for _, body in raw)
    assert server.proc.poll() is None
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert rss_after - rss_before < RSS_GROWTH_KB
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert not any(metric(text, "ddpm_serve_requests_total", route=r, status=str(s)) for r in
                   ("/v1/samples", "/v1/denoise", "other") for s in range(500, 505))  # fmt: skip


# ---- (d) SIGTERM under load: the last test of the module, it stops the server ----


def test_d_sigterm_drains_in_flight_refuses_new_and_exits_0(server, art, tmp_path):
    refs = References(art, tmp_path)
    refs.prepare([("unet-slow", s, 8) for s in range(6)])

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=AUTH) as client:
            flying = [asyncio.create_task(client.post("/v1/samples", json=_body("unet-slow", s, 8)))
                      for s in range(6)]  # fmt: skip
            for _ in range(400):  # until the server holds all six (plus this metrics request)
                if metric((await client.get("/metrics")).text, "ddpm_serve_in_flight") >= 7:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the six requests never were in flight together")
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            unfinished = sum(not t.done() for t in flying)
            late = None
            for _ in range(100):
                async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=AUTH) as fresh:
                    if (await fresh.get("/healthz")).status_code == 503:
                        late = await fresh.post("/v1/samples", json={"model": "unet"})
                        break
                await asyncio.sleep(0.05)
            return t0, late, unfinished, await asyncio.gather(*flying)

    t0, late, unfinished, done = asyncio.run(scenario())
    code = server.proc.wait(DRAIN_S + 5)
    elapsed = time.monotonic() - t0
    assert unfinished > 0  # the signal came while requests were computing
    assert late is not None and late.status_code == 503 and late.json()["error"] == "the server is stopping"
    for seed, resp in enumerate(done):
        assert resp.status_code == 200, resp.text
        assert npz_arrays(resp.content)["arr_0"].tobytes() == refs.arr0("unet-slow", seed, 8).tobytes()
    assert code == 0, server.stderr()
    assert elapsed <= DRAIN_S, elapsed
    assert "SIGTERM: draining" in server.stderr()
