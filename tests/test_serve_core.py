"""The serving core without a socket: the batcher (merging, splitting long requests, max-wait, the queue bound,
cancellation, failures), request parsing, the limits, and the app factory in-process (httpx over ASGI).

The batcher tests inject a fake ``compute`` that records each loop and returns, for every row, (seed, global
sample index): what a request gets back shows which rows of which run it was handed.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import torch
from _hostile import assert_one_line, cli
from test_serve_helpers import UNET_SAMPLING, free_port, npz_arrays, serve_artifacts

from ddpm.errors import InvalidArgumentError, SamplingError
from ddpm.options import SamplingOptions
from ddpm.runtime.backends import open_backend
from ddpm.runtime.sampling import sample_run
from ddpm.serve import Limits, app
from ddpm.serve.batcher import Batcher, Closed, QueueFull
from ddpm.serve.models import ModelHost
from ddpm.serve.request import RequestError, parse_denoise_form, parse_sample_request

WAIT = 10.0  # seconds a future may take in these tests before something is wrong


class FakeCompute:
    """Records (plan, segments, start time) per loop; row r of a segment is (seed, first + r)."""

    def __init__(
        self, delay: float = 0.0, fail: Exception | None = None, nan_seed: int | None = None
    ) -> None:
        self.loops: list[tuple[object, list, float]] = []
        self.delay, self.fail, self.nan_seed = delay, fail, nan_seed

    def __call__(self, backend, plan, segments):
        self.loops.append((plan, list(segments), time.monotonic()))
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        rows = []
        for s in segments:
            value = float("nan") if s.seed == self.nan_seed else float(s.seed)
            rows += [[value, float(s.first + r)] for r in range(s.n)]
        return torch.tensor(rows, dtype=torch.float32)


def _rows(seed: int, n: int) -> torch.Tensor:
    return torch.tensor([[float(seed), float(i)] for i in range(n)])


def test_compatible_requests_merge_into_one_loop_in_arrival_order():
    fake = FakeCompute()
    b = Batcher(None, max_batch=16, max_wait_s=0.05, compute=fake, start=False)
    tickets = [b.submit("k", "plan", seed, n) for seed, n in ((1, 3), (2, 1), (3, 5))]
    other = b.submit("other", "plan2", 4, 2)
    b.start()
    for t, (seed, n) in zip(tickets, ((1, 3), (2, 1), (3, 5)), strict=True):
        assert torch.equal(t.future.result(WAIT), _rows(seed, n))
    assert torch.equal(other.future.result(WAIT), _rows(4, 2))
    b.close()
    assert [(p, [(s.seed, s.first, s.n) for s in segs]) for p, segs, _ in fake.loops] == [
        ("plan", [(1, 0, 3), (2, 0, 1), (3, 0, 5)]),
        ("plan2", [(4, 0, 2)]),
    ]


def test_long_requests_are_split_and_a_short_one_is_not_stuck_behind():
    fake = FakeCompute()
    b = Batcher(None, max_batch=4, max_wait_s=0.0, compute=fake, start=False)
    long, short = b.submit("k", "p", 7, 10), b.submit("k", "p", 8, 1)
    b.start()
    assert torch.equal(long.future.result(WAIT), _rows(7, 10))
    assert torch.equal(short.future.result(WAIT), _rows(8, 1))
    b.close()
    loops = [[(s.seed, s.first, s.n) for s in segs] for _, segs, _ in fake.loops]
    # round robin: the long request gives a loop's worth, goes to the back; the short one runs in loop 2
    assert loops == [[(7, 0, 4)], [(8, 0, 1), (7, 4, 3)], [(7, 7, 3)]]
    assert all(sum(n for _, _, n in loop) <= 4 for loop in loops)


def test_other_keys_are_not_starved_by_a_long_request():
    fake = FakeCompute()
    b = Batcher(None, max_batch=2, max_wait_s=0.0, compute=fake, start=False)
    long, other = b.submit("a", "pa", 1, 8), b.submit("b", "pb", 2, 1)
    b.start()
    other.future.result(WAIT)
    long.future.result(WAIT)
    b.close()
    plans = [p for p, _, _ in fake.loops]
    assert plans.index("pb") == 1  # right after the long request's first loop


def test_max_wait_bounds_the_wait_for_a_fuller_batch():
    fake = FakeCompute()
    b = Batcher(None, max_batch=8, max_wait_s=1.0, compute=fake)
    t0 = time.monotonic()
    lone = b.submit("k", "p", 1, 1)
    lone.future.result(WAIT)
    waited = fake.loops[0][2] - t0
    assert 0.95 <= waited < 5.0, waited  # it waited for company, then ran alone
    t0 = time.monotonic()
    full = b.submit("k", "p", 2, 8)  # fills a batch: no reason to wait
    full.future.result(WAIT)
    assert fake.loops[1][2] - t0 < 0.5
    # a request arriving within the wait joins the waiting one
    first = b.submit("k", "p", 3, 1)
    time.sleep(0.05)
    second = b.submit("k", "p", 4, 1)
    first.future.result(WAIT), second.future.result(WAIT)
    assert [(s.seed, s.n) for s in fake.loops[2][1]] == [(3, 1), (4, 1)]
    b.close()


def test_clients_a_loop_answered_are_not_kept_waiting_once_they_are_back():
    """Closed-loop clients (each sends its next request when answered): after the first loop the batcher starts
    the next as soon as all of them are back, rather than waiting out max_wait, and never with fewer rows."""
    fake = FakeCompute(delay=0.05)
    b = Batcher(None, max_batch=64, max_wait_s=2.0, compute=fake, start=False)
    clients, rounds = 3, 4
    done = threading.Event()
    answers: list[int] = []

    def send(seed: int) -> None:
        ticket = b.submit("k", "p", seed, 1)
        ticket.future.add_done_callback(lambda f: back(seed))

    def back(seed: int) -> None:
        answers.append(seed)
        if len(answers) == clients * rounds:
            done.set()
        elif seed + clients < clients * rounds:
            threading.Timer(0.02 * (seed % clients), send, (seed + clients,)).start()  # staggered returns

    for seed in range(clients):
        send(seed)
    b.start()
    assert done.wait(WAIT)
    b.close()
    assert [sorted(s.seed for s in segs) for _, segs, _ in fake.loops] == [
        [r * clients + c for c in range(clients)] for r in range(rounds)
    ]
    starts = [when for _, _, when in fake.loops]
    gaps = [b - a - fake.delay for a, b in zip(starts, starts[1:], strict=False)]
    assert all(g < 1.0 for g in gaps), gaps  # the last client was back after ~0.04 s; max_wait is 2 s


def test_queue_bound_refuses_with_retry_after_then_admits_again():
    gate = threading.Event()

    def compute(backend, plan, segments):
        gate.wait(WAIT)
        return FakeCompute()(backend, plan, segments)

    b = Batcher(None, max_batch=4, max_wait_s=0.0, max_queue=8, compute=compute, start=False)
    a = b.submit("k", "p", 1, 5)
    b.submit("k", "p", 2, 3)
    assert b.pending == 8
    with pytest.raises(QueueFull, match="holds 8 of 8") as e:
        b.submit("k", "p", 3, 1)
    assert e.value.retry_after >= 1
    b.start()
    gate.set()
    a.future.result(WAIT)
    b.submit("k", "p", 3, 1).future.result(WAIT)
    assert b.pending == 0
    b.close()


def test_a_cancelled_request_gives_its_rows_back():
    fake = FakeCompute()
    b = Batcher(None, max_batch=4, max_wait_s=0.0, compute=fake, start=False)
    gone, kept = b.submit("k", "p", 1, 6), b.submit("k", "p", 2, 2)
    assert gone.future.cancel()
    assert b.pending == 2
    b.start()
    assert torch.equal(kept.future.result(WAIT), _rows(2, 2))
    b.close()
    assert [[s.seed for s in segs] for _, segs, _ in fake.loops] == [[2]]


def test_nan_fails_only_its_own_request_and_a_failed_loop_fails_its_requests():
    b = Batcher(None, max_batch=8, max_wait_s=0.0, compute=FakeCompute(nan_seed=1), start=False)
    bad, good = b.submit("k", "p", 1, 2), b.submit("k", "p", 2, 2)
    b.start()
    assert torch.equal(good.future.result(WAIT), _rows(2, 2))
    with pytest.raises(SamplingError, match="NaN/Inf in samples 0..1 of seed 1"):
        bad.future.result(WAIT)
    b.close()
    b = Batcher(None, max_batch=8, compute=FakeCompute(fail=RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        b.submit("k", "p", 1, 1).future.result(WAIT)
    assert b.pending == 0
    b.close()


def test_close_refuses_waiting_and_new_work_and_jobs_run_on_the_worker():
    b = Batcher("backend", max_batch=4, compute=FakeCompute(), start=False)
    waiting = b.submit("k", "p", 1, 1)
    assert b.close(1.0)
    with pytest.raises(Closed):
        waiting.future.result(WAIT)
    with pytest.raises(Closed):
        b.submit("k", "p", 1, 1)
    b = Batcher("backend", max_batch=4, compute=FakeCompute())
    seen = b.call(lambda backend: (backend, threading.current_thread().name)).result(WAIT)
    assert seen == ("backend", "ddpm-serve-model")
    b.close()


def test_real_backend_merged_requests_are_the_separate_runs_bitwise(tmp_path_factory, one_torch_thread):
    art = serve_artifacts(tmp_path_factory)
    with open_backend(art["unet"], device="cpu", threads=1) as backend:
        host = ModelHost(
            "unet", art["unet"], backend, SamplingOptions(device="cpu", threads=1, recommended=True)
        )
        b = Batcher(backend, max_batch=5, max_wait_s=0.0, start=False)
        reqs = [(3, 4), (9, 7), (3, 2), (0, 1)]
        key, plan = host.plan(host.options)
        tickets = [b.submit(key, plan, seed, n) for seed, n in reqs]
        b.start()
        got = [t.future.result(WAIT) for t in tickets]
        assert b.close()  # the backend is called from one thread at a time: the worker's, then ours
        for x, (seed, n) in zip(got, reqs, strict=True):
            assert torch.equal(x, sample_run(backend, n, host.options.replace(seed=seed)).samples)


# ---- request parsing ----

BASE = SamplingOptions(recommended=True)
LIMITS = Limits(max_samples=64)


def _parse(body: bytes | str, models=("unet", "mlp")):
    body = body.encode() if isinstance(body, str) else body
    return parse_sample_request(body, models=list(models), base=BASE, limits=LIMITS)


def test_a_body_becomes_one_validated_options_value():
    req = _parse(
        '{"model": "mlp", "num_samples": 3, "seed": 5, "sampler": "DDIM", "eta": 0.5, "format": "npz"}'
    )
    assert (req.model, req.num_samples, req.format) == ("mlp", 3, "npz")
    assert req.options == BASE.replace(seed=5, sampler="ddim", eta=0.5)
    assert _parse('{"clip": "inf"}', models=["unet"]).options.clip == float("inf")
    assert _parse("{}", models=["unet"]).options == BASE  # defaults: the model's recommendation
    cond = _parse('{"model": "unet", "classes": ["a", 2], "guidance": 3}').options
    assert (cond.classes, cond.guidance) == (("a", 2), 3.0)


@pytest.mark.parametrize(
    "body, match",
    [
        ("{bad", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"model": "unet", "num_samples": 1e9}', "num_samples must be an integer"),
        ('{"model": "unet", "num_samples": 100000}', "num_samples must be <= 64"),
        ('{"model": "unet", "num_samples": 0}', "num_samples must be >= 1"),
        ('{"model": "unet", "seed": true}', "seed must be an integer"),
        ('{"model": "unet", "seed": -1}', "seed must be an integer in"),
        ('{"model": "unet", "steps": "5"}', "steps must be an integer"),
        ('{"model": "unet", "sampler": "euler"}', "unknown sampler"),
        ('{"model": "unet", "sampler": "dpm++2m", "eta": 1}', "eta applies to the ddim sampler only"),
        ('{"model": "unet", "format": "gif"}', "format must be one of png, npz, json"),
        ('{"model": "sd-xl"}', "unknown model 'sd-xl'; loaded: unet, mlp"),
        ("{}", "give the model: one of unet, mlp"),
        ('{"model": "unet", "guidance": "high"}', "guidance must be a number or null"),
        ('{"model": "unet", "classes": {"a": 1}}', "classes must be an integer or a string or a list"),
        ('{"model": "unet", "cfg": 3}', "unknown field 'cfg'"),
        ('{"model": "unet", "device": "cuda"}', "unknown field 'device'"),
        ("[" * 100 + "]" * 100, "nests deeper"),
        (b'{"model": "\xff"}', "not UTF-8"),
    ],
)
def test_bad_bodies_are_one_line_400s(body, match):
    with pytest.raises(RequestError, match=match) as e:
        _parse(body)
    assert e.value.status == 400 and "\n" not in str(e.value)


def test_form_fields_are_typed_like_json():
    req = parse_denoise_form(
        {"model": "unet", "t": "100", "add_noise": "false", "steps": "3", "clip": "1.5"}, b"img",
        models=["unet"], base=SamplingOptions(),
    )  # fmt: skip
    assert (req.t, req.sigma, req.add_noise, req.options.steps, req.options.clip) == (
        100,
        None,
        False,
        3,
        1.5,
    )
    for fields, match in [
        ({"t": "1", "sigma": "0.5"}, "exactly one of t"),
        ({"t": "abc"}, "t must be an integer"),
        ({"t": "1", "add_noise": "maybe"}, "add_noise must be true or false"),
        ({"t": "1", "path": "/etc/passwd"}, "unknown field 'path'"),
    ]:
        with pytest.raises(RequestError, match=match):
            parse_denoise_form(fields, b"img", models=["unet"], base=SamplingOptions())


def test_limits_are_checked_once():
    with pytest.raises(InvalidArgumentError, match="--max-samples .* must be <= --max-queue"):
        Limits(max_samples=100, max_queue=10)
    with pytest.raises(InvalidArgumentError, match="--timeout-s must be a finite number > 0"):
        Limits(timeout_s=0)
    with pytest.raises(InvalidArgumentError, match="--max-batch must be an integer"):
        Limits(max_batch=0)


# ---- the app factory in-process: what a user mounts in their own ASGI server ----


def test_app_factory_in_process(tmp_path_factory, one_torch_thread):
    art = serve_artifacts(tmp_path_factory)
    guard = app({"unet": art["unet"]}, limits=Limits(timeout_s=0.5), options=SamplingOptions(threads=1))

    async def drive():
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            ok = await client.post("/v1/samples", json={"num_samples": 3, "seed": 11, "format": "npz"})
            info = (await client.get("/v1/models")).json()["models"][0]
            guard.service.batchers["unet"].compute = lambda *a: time.sleep(2.0)  # a stuck model
            late = await client.post("/v1/samples", json={"num_samples": 1})
            return ok, info, late

    try:
        ok, info, late = asyncio.run(drive())
    finally:
        guard.service.close(5.0)
    assert ok.status_code == 200, ok.text
    want = sample_run(art["unet"], 3, SamplingOptions(device="cpu", threads=1, seed=11, recommended=True))
    assert torch.equal(torch.from_numpy(npz_arrays(ok.content)["samples"]), want.samples)
    assert info["recommended"] == UNET_SAMPLING and info["bitwise_merging"] is True
    assert info["defaults"]["sampler"] == "dpm++2m" and info["defaults"]["steps"] == 4
    assert late.status_code == 503 and "not answered within 0.5 s" in late.json()["error"]
    assert late.headers["retry-after"] == "1"


# ---- `ddpm serve`'s refusals: one line, exit 2, before any model is served ----


def test_serve_command_refusals_are_one_line(tmp_path, capsys):
    port = str(free_port())
    (tmp_path / "short").write_text("abc\n")
    cases = [
        (["--engine", str(tmp_path / "none.onnx"), "--port", port], "does not exist"),
        (
            ["--engine", "x.onnx", "--port", port, "--max-samples", "2000", "--max-queue", "10"],
            "--max-samples",
        ),
        (["--engine", "x.onnx", "--port", port, "--token-file", str(tmp_path / "short")], "at least 16"),
        (["--engine", "x.onnx", "--port", port, "--replicas", "3"], "apply to --ray only"),
        (["--engine", "a=x.onnx", "--engine", "a=y.onnx", "--port", port], "two engines are named 'a'"),
    ]
    for args, match in cases:
        code, err = cli(["serve", *args], capsys)
        assert_one_line(code, err, match=match)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        code, err = cli(["serve", "--engine", "x.onnx", "--port", str(busy.getsockname()[1])], capsys)
        assert_one_line(code, err, match="in use")
