"""``ddpm.reverse``, the one reverse loop: any model callable, starting and stopping at any step, fused vs
reference executors, the history buffer of multistep tables, observers, and argument errors.

Models are tiny and random (fresh weights on every run): what is checked must hold for any weights.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from _runtime_models import make_checkpoint

import ddpm
from ddpm.errors import InvalidArgumentError, SamplingError
from ddpm.kernels import fused_step_raw
from ddpm.loop import FiniteWatch, ReversePlan, run_reverse
from ddpm.metadata import schedule_from_meta
from ddpm.noise import initial_noise, normal
from ddpm.options import SamplingOptions
from ddpm.runtime.backends import open_backend
from ddpm.runtime.sampling import sample
from ddpm.schedule import COEF_B, COEF_C, Schedule
from ddpm.trainer.preview import reference_sample

# Fused kernel vs ddpm.step on the same float32 rows and the same Philox noise: the kernel may contract
# a*x + b*x0_hat into FMAs and evaluates its own float32 Box-Muller, a few ulps per step carried by the model.
# tests/test_sampling.py measured <= 4.7e-6 (max |fused - ref| / max(|ref|, 1)) over 1000 steps; these runs
# are <= 200 steps, so 5e-5 (its tolerance) is ample and still far below a wrong coefficient or noise (>1e-2).
FUSED_VS_REF_RTOL = 5e-5
# The hand-written loop below and ddpm.step compute the same float32 expressions in the same order; only
# torch's choice of vectorised kernels may differ, so agreement is to float32 rounding of a short run.
HAND_LOOP_RTOL = 1e-6

KERNEL_HAS_HISTORY = "history" in inspect.signature(fused_step_raw).parameters


def _rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the larger of max |b| and 1 (the data scale)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


class TinyEps(torch.nn.Module):
    """A random eps-network on [N, 2] points: x and a timestep embedding through one hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(3, 16)
        self.out = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = (t.float() / 1000.0)[:, None]
        return self.out(torch.tanh(self.inp(torch.cat([x, tt], dim=1))))


@pytest.fixture
def net() -> TinyEps:
    return TinyEps().eval()


@pytest.fixture
def sched() -> Schedule:
    return Schedule.linear(1000).respace(60)


def _xt(n: int = 5, seed: int = 3, offset: int = 0) -> torch.Tensor:
    return initial_noise(seed, (n, 2), sample_offset=offset)


@torch.no_grad()
def _hand_loop(model, x, schedule, table, *, seed, clip=None, start=None, stop=0, offset=0):
    """The step contract written out (docs/design.md, "The step"), with h = x0_hat before the first step."""
    rows = table.astype(np.float32)
    x, h = x.clone(), None
    start = len(schedule) - 1 if start is None else start
    for i in range(start, stop - 1, -1):
        a, b, c, p, q, sigma = (float(v) for v in rows[i])
        t = torch.full((x.shape[0],), int(schedule.timesteps[i]), dtype=torch.int64)
        x0 = p * x + q * model(x, t)
        x0 = x0.clamp(-clip, clip) if clip is not None else x0
        h = x0 if h is None else h
        x_prev = a * x + b * x0
        if c != 0.0:
            x_prev = x_prev + c * h
        if sigma != 0.0:
            x_prev = x_prev + sigma * normal(seed, tuple(x.shape), step=i, sample_offset=offset)
        x, h = x_prev, x0
    return x


# ---- any model callable ----


def test_nn_module_is_deterministic_and_leaves_x_alone(net, sched):
    x = _xt()
    x_copy = x.clone()
    a = ddpm.reverse(net, x, sched, seed=7, clip=1.0)
    b = ddpm.reverse(net, x, sched, seed=7, clip=1.0)
    assert a.shape == x.shape and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and torch.equal(x, x_copy)
    assert not torch.equal(a, ddpm.reverse(net, x, sched, seed=8, clip=1.0))  # the step noise follows seed


def test_plain_function_feeds_original_timesteps_and_matches_the_step_contract(sched):
    seen = []

    def f(x, t):
        seen.append(t.clone())
        return 0.3 * torch.sin(x) + 1e-4 * t[:, None].float()

    x = _xt(4)
    got = ddpm.reverse(f, x, sched, seed=2, kernel="reference")
    assert [int(t[0]) for t in seen] == sched.timesteps[::-1].tolist()
    assert all(t.dtype == torch.int64 and t.shape == (4,) for t in seen)
    want = _hand_loop(f, x, sched, sched.coefficients(), seed=2)
    assert _rel_max(got, want) <= HAND_LOOP_RTOL


def test_opened_backend_gives_what_ddpm_sample_gives(tmp_path):
    ckpt = make_checkpoint(tmp_path, "mlp")
    with open_backend(ckpt, device="cpu", threads=1) as backend:
        schedule = schedule_from_meta(backend.meta).respace(30)
        x = initial_noise(4, (6, 2))
        got = ddpm.reverse(backend, x, schedule, prediction=backend.meta["prediction"], seed=4, clip=1.0)
        want = sample(backend, 6, steps=30, batch=6, seed=4, clip=1.0)
    assert torch.equal(got, want)


def test_preview_sampler_is_the_reference_loop(net, sched):
    want = ddpm.reverse(net, _xt(5, 3), sched, seed=3, clip=1.0, kernel="reference")
    got = reference_sample(net, sched, "eps", (2,), n=5, seed=3, clip=1.0, batch_size=5)
    assert torch.equal(got, want)
    # batches of 2 at sample offsets 0, 2, 4 draw the same noise; torch's GEMMs round by batch size only
    split = reference_sample(net, sched, "eps", (2,), n=5, seed=3, clip=1.0, batch_size=2)
    assert _rel_max(split, want) <= HAND_LOOP_RTOL


# ---- start and stop ----


@pytest.mark.parametrize("kernel", ["fused", "reference"])
@pytest.mark.parametrize("k", [0, 17, 58])
def test_a_run_split_at_any_step_is_the_same_run(net, sched, kernel, k):
    """stop = k + 1 returns the state at index k; reverse(start=k) from it finishes the run bitwise."""
    x = _xt()
    full = ddpm.reverse(net, x, sched, seed=5, clip=1.0, kernel=kernel)
    steps_seen = []
    head = ddpm.reverse(
        net, x, sched, seed=5, clip=1.0, kernel=kernel, stop=k + 1, on_step=lambda i, _x: steps_seen.append(i)
    )
    assert steps_seen == list(range(len(sched) - 1, k, -1))
    tail = ddpm.reverse(net, head, sched, seed=5, clip=1.0, kernel=kernel, start=k)
    assert torch.equal(tail, full)


def test_batches_are_sample_offsets(net, sched):
    x = _xt(7, seed=1)
    full = ddpm.reverse(net, x, sched, seed=1)
    part = ddpm.reverse(net, x[3:], sched, seed=1, sample_offset=3)
    assert torch.equal(part, full[3:])


# ---- fused vs reference ----


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"clip": 1.0},
        {"variance": "fixed_large"},
        {"sampler": "ddim", "eta": 0.5, "clip": 1.0},
        {"sampler": "ddim"},
        {"prediction": "v"},
        {"prediction": "x0", "clip": 1.0},
    ],
)
def test_fused_matches_reference(net, options, torch_gen):
    sched = Schedule.linear(1000).respace(200)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch_gen))
    x = torch.randn(8, 2, generator=torch_gen)
    fused = ddpm.reverse(net, x, sched, seed=seed, **options)
    ref = ddpm.reverse(net, x, sched, seed=seed, kernel="reference", **options)
    assert torch.isfinite(fused).all()
    assert _rel_max(fused, ref) <= FUSED_VS_REF_RTOL, (options, _rel_max(fused, ref))


# ---- history ----


def _with_history(monkeypatch) -> None:
    """Schedule.coefficients returns DDIM's table with a history column: b_i h split as in a two-step solver,
    (b, c) -> (1.4 b, -0.4 b), for every row but the last step (i = 0), as DPM-Solver++(2M) does."""
    plain = Schedule.coefficients

    def coefficients(self, prediction="eps", sampler="ddpm", variance="fixed_small", eta=0.0):
        table = plain(self, prediction, "ddim", variance, eta).copy()
        table[1:, COEF_C] = -0.4 * table[1:, COEF_B]
        table[1:, COEF_B] *= 1.4
        table.setflags(write=False)
        return table

    monkeypatch.setattr(Schedule, "coefficients", coefficients)


class _Spy:
    """An executor object: records what the loop hands it, then runs the reference executor."""

    def __init__(self) -> None:
        self.jobs = []

    def bind(self, model, job):
        self.jobs.append(job)
        return ddpm.loop.KERNELS["reference"].bind(model, job)


def test_history_is_carried_between_steps(net, sched, monkeypatch):
    plain_spy = _Spy()
    plain = ddpm.reverse(net, _xt(), sched, sampler="ddim", seed=6, kernel=plain_spy)
    assert plain_spy.jobs[0].history is None  # c = 0 everywhere: no h
    _with_history(monkeypatch)
    spy = _Spy()
    got = ddpm.reverse(net, _xt(), sched, sampler="ddim", seed=6, kernel=spy)
    job = spy.jobs[0]
    assert job.history is not None and job.history.shape == job.x.shape
    assert job.table[len(sched) - 1, COEF_C] == 0.0  # the first step has no history: made first order
    want = _hand_loop(net, _xt(), sched, sched.coefficients(sampler="ddim"), seed=6)
    assert _rel_max(got, want) <= HAND_LOOP_RTOL
    assert _rel_max(got, plain) > 1e-3  # and h really entered the steps


def test_history_starting_mid_schedule_is_first_order_then_carried(net, sched, monkeypatch):
    _with_history(monkeypatch)
    x = _xt()
    got = ddpm.reverse(net, x, sched, sampler="ddim", seed=6, start=30, kernel="reference")
    want = _hand_loop(net, x, sched, sched.coefficients(sampler="ddim"), seed=6, start=30)
    assert _rel_max(got, want) <= HAND_LOOP_RTOL


@pytest.mark.skipif(not KERNEL_HAS_HISTORY, reason="the fused kernel front has no history operand yet")
@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m-sde"])
@pytest.mark.parametrize("start", [None, 25])
def test_multistep_fused_matches_reference(net, sched, sampler, start):
    x = _xt(8)
    fused = ddpm.reverse(net, x, sched, sampler=sampler, seed=9, clip=1.0, start=start)
    ref = ddpm.reverse(net, x, sched, sampler=sampler, seed=9, clip=1.0, start=start, kernel="reference")
    assert _rel_max(fused, ref) <= FUSED_VS_REF_RTOL


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m-sde"])
def test_multistep_reference_follows_the_contract(net, sched, sampler):
    x = _xt(8)
    got = ddpm.reverse(net, x, sched, sampler=sampler, seed=9, clip=1.0, kernel="reference")
    want = _hand_loop(net, x, sched, sched.coefficients(sampler=sampler), seed=9, clip=1.0)
    assert _rel_max(got, want) <= HAND_LOOP_RTOL


# ---- observers ----


def test_finite_watch_names_the_steps(sched):
    bad_t = int(sched.timesteps[40])

    def poisoned(x, t):
        return torch.where(t[:, None] == bad_t, torch.full_like(x, math.nan), 0.1 * x)

    watch = FiniteWatch(sched, 3, device=torch.device("cpu"), sample_offset=10, every=10)
    match = (
        rf"between steps 49 and 40 \(detected after step 40, timestep {bad_t}, of 60\) in samples 10\.\.12"
    )
    with pytest.raises(SamplingError, match=match):
        ddpm.reverse(poisoned, _xt(3, offset=10), sched, sample_offset=10, on_step=[watch])


# ---- arguments ----


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"start": 60}, r"start must be a schedule index in 0\.\.59, got 60"),
        ({"start": -1}, r"start must be a schedule index in 0\.\.59, got -1"),
        ({"start": 10, "stop": 11}, r"stop must be an integer in 0\.\.10 \(start\), got 11"),
        ({"stop": 1.5}, r"stop must be an integer in 0\.\.59"),
        ({"kernel": "cuda"}, "unknown kernel 'cuda'; allowed: fused, reference"),
        ({"kernel": 3}, "kernel must be one of fused, reference or an executor"),
        ({"on_step": 3}, r"on_step must be callable as f\(i, x\)"),
        ({"sample_offset": -1}, "sample_offset"),
        ({"seed": 2**64}, r"seed must be an integer in \[0, 2\^64\)"),
        ({"eta": -0.5}, "eta must be a finite number >= 0, got -0.5"),
        ({"clip": 0}, "clip must be a positive number"),
        ({"sampler": "euler"}, "unknown sampler 'euler'; allowed: ddpm, ddim"),
        ({"prediction": "score"}, "unknown prediction 'score'"),
    ],
)
def test_bad_arguments(net, sched, kw, match):
    with pytest.raises(InvalidArgumentError, match=match):
        ddpm.reverse(net, _xt(), sched, **kw)


@pytest.mark.parametrize(
    "model, x, schedule, match",
    [
        (3, "x", "sched", "model must be callable"),
        ("net", torch.zeros(2, 2, dtype=torch.float64), "sched", r"x must be a float32 tensor \[N, \.\.\.\]"),
        ("net", torch.zeros(0, 2), "sched", "with N >= 1"),
        ("net", [[0.0, 0.0]], "sched", "x must be a float32 tensor"),
        ("net", "x", np.ones(3), "schedule must be a ddpm.Schedule"),
    ],
)
def test_bad_model_x_schedule(net, sched, model, x, schedule, match):
    model = net if model == "net" else model
    x = _xt() if isinstance(x, str) else x
    schedule = sched if isinstance(schedule, str) else schedule
    with pytest.raises(InvalidArgumentError, match=match):
        ddpm.reverse(model, x, schedule)


def test_run_reverse_takes_a_parsed_plan(net, sched):
    plan = ReversePlan.create(sched, SamplingOptions(sampler="ddim", eta=0.2, clip=1.0, seed=4))
    assert plan.rows32[5] == tuple(float(v) for v in plan.table[5].astype(np.float32))
    got = run_reverse(net, _xt(), plan)
    assert torch.equal(got, ddpm.reverse(net, _xt(), sched, sampler="ddim", eta=0.2, clip=1.0, seed=4))
