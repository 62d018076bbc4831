"""The fused step's optional operands (docs/design.md, "Operands of the step") against the references.

    m_g = u + S (m - u)                                  classifier-free guidance (uncond u, scale S)
    x0  = clip(p x + q m_g)  or  clamp(p x + q m_g, -s_n, s_n) / s_n      dynamic thresholds s [N]
    out = a x + b x0 + c h + sigma_e z,  sigma_e = exp(lv0 + lv1 v) where sigma != 0    learned-range variance v

Fresh random inputs every run. Tolerance, as tests/test_fused_step.py: kernel and reference evaluate the same
float32 expression from the same float32 coefficients and the same z, differing only in rounding order (the kernel
may fuse multiply-adds), so the error is a few roundings of <= 2^-24 of the magnitude scale of the terms:
|a x| + |b| (|p x| + |q| |m_g|') + |c h| + |sigma_e z| (1 + |lv0| + |lv1 v|), where |m_g|' = |u| + |S| (|m| + |u|)
bounds the rounding of the guided output, and the factor (1 + |lv0| + |lv1 v|) carries the absolute rounding of
the exponent lv0 + lv1 v, which exp turns into a relative error of sigma_e. Dividing by a threshold s >= 1 only
shrinks the x0 terms. We require 1e-6 of that scale (about 16 roundings).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import ddpm
import ddpm.noise as noise
from ddpm import extension
from ddpm.diffusion import DynamicThreshold, check_clip
from ddpm.errors import InvalidArgumentError
from ddpm.kernels import HostStepTable, dynamic_thresholds, fused_step_raw
from ddpm.schedule import COEF_LV0, COEF_LV1

_C = extension.cpu_extension()
needs_C = pytest.mark.skipif(_C is None, reason="ddpm._C is not built")

TOL = 1e-6
U = 2.0**-24  # float32 unit roundoff
SCHEDULE = ddpm.Schedule.linear(1000).respace(20)
SAMPLERS = [("ddpm", 0.0), ("ddim", 0.5), ("dpm++2m", 0.0), ("dpm++2m-sde", 0.0)]
CLIPS = [None, 1.0, DynamicThreshold(0.9)]
SHAPES = [(3, 5, 7, 11), (4, 3, 8, 8), (2, 13)]  # partial Philox groups (d % 4 != 0), whole ones


def _t(rng, shape, spread=2.0) -> torch.Tensor:
    return torch.from_numpy((spread * rng.standard_normal(shape)).astype(np.float32))


def _v(rng, shape) -> torch.Tensor:
    """A variance output: around [-1, 1], as a learned-range model emits it (and a little beyond)."""
    return torch.from_numpy(rng.uniform(-1.2, 1.2, shape).astype(np.float32))


def _scale(row, x, m, z, *, u=None, guidance=1.0, h=None, v=None) -> torch.Tensor:
    """The elementwise magnitude scale of the module docstring, in float64."""
    a, b, c, p, q, sigma = row[:6]
    xd, md, zd = x.double(), m.double(), z.double()
    mg = md.abs() if u is None else u.double().abs() + abs(guidance) * (md.abs() + u.double().abs())
    scale = (a * xd).abs() + abs(b) * ((p * xd).abs() + abs(q) * mg)
    if h is not None:
        scale = scale + (c * h.double()).abs()
    if sigma != 0.0:
        if len(row) == 8:
            arg = row[6] + row[7] * v.double()
            scale = scale + (arg.exp() * zd).abs() * (1 + abs(row[6]) + (row[7] * v.double()).abs())
        else:
            scale = scale + (sigma * zd).abs()
    return scale + 1e-30


def _assert_close(got, ref, scale, what="x_prev") -> None:
    err = float(((got.double() - ref.double()).abs() / scale).max())
    assert err <= TOL, f"{what}: relative error {err:.3g} > {TOL}"


def _indices(schedule, rng) -> list[int]:
    n = len(schedule)
    return sorted({0, 1, n // 2, n - 1, int(rng.integers(0, n))})


# ------------------------------------------------------------------------------------------ fused vs reference


@needs_C
@pytest.mark.parametrize("sampler, eta", SAMPLERS)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("guidance", [None, 0.0, 1.0, 3.5])
@pytest.mark.parametrize("clip", CLIPS, ids=str)
def test_fused_step_with_guidance_and_clip_equals_reference(sampler, eta, prediction, guidance, clip, rng):
    """Every sampler x prediction x {plain, guided S = 0, 1, 3.5} x {no clip, clip 1, dynamic}: the fused step on
    (m, uncond, S) equals ddpm.step on m_g = u + S (m - u) computed in torch (for S = 1: on m itself, the plain
    step), history included."""
    kw = dict(prediction=prediction, sampler=sampler, eta=eta)
    seed = int(rng.integers(0, 2**63))
    for shape in SHAPES:
        for i in _indices(SCHEDULE, rng):
            offset = int(rng.integers(0, 1000))
            x, m, u, h = (_t(rng, shape) for _ in range(4))
            z = noise.normal(seed, shape, step=i, sample_offset=offset)
            if guidance is None:
                mg, extra = m, {}
            else:
                mg = m if guidance == 1.0 else u + guidance * (m - u)
                extra = dict(uncond=u, guidance=guidance)
            h_ref, h_got = h.clone(), h.clone()
            ref = ddpm.step(SCHEDULE, i, x, mg, z, clip=clip, history=h_ref, **kw)
            got = ddpm.fused_step(
                SCHEDULE, i, x, m, seed=seed, sample_offset=offset, clip=clip, history=h_got, **kw, **extra
            )
            row = ddpm.diffusion.step_coefficients(SCHEDULE, i, **kw)
            g = 1.0 if guidance is None else guidance
            scale = _scale(row, x, m, z, u=None if guidance is None else u, guidance=g, h=h)
            _assert_close(got, ref, scale)
            x0_scale = _scale((0, 1, 0, *row[3:5], 0), x, m, z, u=None if guidance is None else u, guidance=g)
            _assert_close(h_got, h_ref, x0_scale, "history")


@needs_C
@pytest.mark.parametrize(
    "schedule",
    [
        ddpm.Schedule.linear(1000),
        ddpm.Schedule.linear(1000).respace(50),
        ddpm.Schedule.cosine(1000).respace(25),
    ],
    ids=["linear", "linear/50", "cosine/25"],
)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("clip", CLIPS, ids=str)
def test_learned_range_from_strided_model_output(schedule, prediction, clip, rng):
    """A learned-variance model's [N, 2C, H, W] output used in place: m = out[:, :C], v = out[:, C:] (samples
    2d apart); with guidance the batch is 2N (conditional half first) and uncond is a strided view as well. The
    last step (i = 0) adds no noise whatever v says."""
    kw = dict(prediction=prediction, sampler="ddpm", variance="learned_range")
    seed = int(rng.integers(0, 2**63))
    n, c, hw = 3, 3, (7, 5)
    for i in _indices(schedule, rng):
        x = _t(rng, (n, c, *hw))
        net = _t(rng, (2 * n, 2 * c, *hw))
        net[:, c:] = _v(rng, (2 * n, c, *hw))
        m, v, u = net[:n, :c], net[:n, c:], net[n:, :c]
        assert not m.is_contiguous() and m.stride(0) == 2 * m[0].numel()
        z = noise.normal(seed, x.shape, step=i, sample_offset=5)
        row = ddpm.diffusion.step_coefficients(schedule, i, **kw)
        for guidance in (None, 2.0):
            extra = {} if guidance is None else dict(uncond=u, guidance=guidance)
            mg = m if guidance is None else u + guidance * (m - u)
            ref = ddpm.step(
                schedule, i, x, mg.contiguous(), z, clip=clip, variance_output=v.contiguous(), **kw
            )
            got = ddpm.fused_step(
                schedule, i, x, m, seed=seed, sample_offset=5, clip=clip, variance_output=v, **kw, **extra
            )
            scale = _scale(row, x, m, z, u=extra.get("uncond"), guidance=guidance or 1.0, v=v)
            _assert_close(got, ref, scale)
        if i == 0:
            other = ddpm.fused_step(
                schedule, 0, x, m, seed=seed + 1, clip=clip, variance_output=torch.zeros_like(x), **kw
            )
            assert torch.equal(
                other, ddpm.fused_step(schedule, 0, x, m, seed=seed, clip=clip, variance_output=v, **kw)
            )


@needs_C
def test_strided_operands_read_the_same_numbers_as_contiguous_ones(rng):
    """m, uncond and variance as strided views give bit-for-bit the result of their contiguous copies."""
    shape, seed = (4, 3, 6, 5), int(rng.integers(0, 2**63))
    big = _t(rng, (4, 9, 6, 5))
    big[:, 6:] = _v(rng, (4, 3, 6, 5))
    m, u, v = big[:, :3], big[:, 3:6], big[:, 6:]
    x, h = _t(rng, shape), _t(rng, shape)
    row = ddpm.diffusion.step_coefficients(SCHEDULE, 7, sampler="ddpm", variance="learned_range")
    row = (*row[:2], 0.3, *row[3:])  # with a history term too
    h1, h2 = h.clone(), h.clone()
    thr = torch.from_numpy(rng.uniform(1.0, 3.0, 4).astype(np.float32))
    kw = dict(guidance=1.7, thresholds=thr)
    a = fused_step_raw(x, m, row, math.inf, seed, 7, 0, torch.empty(shape), h1, uncond=u, variance=v, **kw)
    b = fused_step_raw(
        x, m.contiguous(), row, math.inf, seed, 7, 0, torch.empty(shape), h2, uncond=u.contiguous(),
        variance=v.contiguous(), **kw,
    )  # fmt: skip
    assert torch.equal(a, b) and torch.equal(h1, h2)


@needs_C
@pytest.mark.parametrize("threads", ["single", "split"])
@pytest.mark.parametrize("shape", [(6, 3, 11, 7), (40, 3, 17, 15)])  # d = 231; n d = 30600 > the threshold
def test_every_simd_variant_with_every_operand(threads, shape, rng):
    """All operands at once (8-wide row, history, guidance, dynamic thresholds) in every SIMD variant, on one
    thread and split across threads: each equals the plain torch formula."""
    seed, i, offset = int(rng.integers(0, 2**63)), 13, 9
    x, m, u, h = (_t(rng, shape) for _ in range(4))
    v = _v(rng, shape)
    base = ddpm.diffusion.step_coefficients(SCHEDULE, i, sampler="ddpm", variance="learned_range")
    row = (*base[:2], -0.4, *base[3:])
    dyn = DynamicThreshold(0.95, 2.5)
    z = noise.normal(seed, shape, step=i, sample_offset=offset)
    mg = u + 2.5 * (m - u)
    x0 = dyn.apply(base[3] * x + base[4] * mg)
    ref = base[0] * x + base[1] * x0 + row[2] * h + torch.exp(row[6] + row[7] * v) * z
    scale = _scale(row, x, m, z, u=u, guidance=2.5, h=h, v=v)
    old = _C.parallel_threshold()
    if threads == "split":
        _C.set_parallel_threshold(1)
    try:
        for target in _C.simd_targets():
            _C.set_simd_target(target)
            hk = h.clone()
            thr = dynamic_thresholds(x, m, base[3], base[4], dyn, uncond=u, guidance=2.5)
            out = fused_step_raw(
                x, m, row, math.inf, seed, i, offset, torch.empty(shape), hk, variance=v, uncond=u, guidance=2.5,
                thresholds=thr,
            )  # fmt: skip
            _assert_close(out, ref, scale, f"x_prev ({target})")
            _assert_close(
                hk, x0, _scale((0, 1, 0, *row[3:5], 0), x, m, z, u=u, guidance=2.5), f"h ({target})"
            )
    finally:
        _C.set_simd_target("")
        _C.set_parallel_threshold(old)


# ------------------------------------------------------------------------------------------ against diffusers


@needs_C
@pytest.mark.parametrize("steps", [1000, 50, 13])
def test_learned_range_sigma_equals_diffusers_get_variance(steps, rng):
    """sigma_e of the kernel (x = m = 0, so out = sigma_e z with the kernel's own z) against diffusers'
    DDPMScheduler(variance_type="learned_range")._get_variance on our timesteps, fed our float64 alphas_cumprod
    (diffusers' own are float32, 1e-7-ish off). Tolerance 4 u (1 + |lv0| + |lv1 v|): the float32 casts of lv0 and
    lv1 and the rounding of the exponent are absolute errors of the exponent, i.e. relative errors of sigma_e; exp
    and the product with z add a few u."""
    base = ddpm.Schedule.linear(1000)
    schedule = base.respace(steps)
    sched = DDPMScheduler(num_train_timesteps=1000, trained_betas=base.betas, variance_type="learned_range")
    sched.set_timesteps(timesteps=[int(t) for t in schedule.timesteps[::-1]])
    sched.alphas_cumprod = torch.from_numpy(base.alphas_cumprod.copy())
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    shape, seed = (2, 3, 9, 9), int(rng.integers(0, 2**63))
    table = schedule.coefficients("eps", "ddpm", "learned_range")
    for i in _indices(schedule, rng):
        v = _v(rng, shape)
        z = noise.normal(seed, shape, step=i)
        zero = torch.zeros(shape)
        out = ddpm.fused_step(schedule, i, zero, zero, seed=seed, variance="learned_range", variance_output=v)
        if i == 0:  # diffusers adds no noise at t = 0, nor do we
            assert int(schedule.timesteps[0]) == 0 and torch.equal(out, zero)
            continue
        log_var = sched._get_variance(int(schedule.timesteps[i]), predicted_variance=v.double())
        want = torch.exp(0.5 * log_var)
        got = out.double() / z.double()
        lv0, lv1 = table[i, COEF_LV0], table[i, COEF_LV1]
        tol = 4 * U * (1 + abs(lv0) + (lv1 * v.double()).abs())
        ok = z.abs() > 1e-6  # dividing out z
        err = ((got - want).abs() / want / tol)[ok]
        assert float(err.max()) <= 1.0, f"step {i}: sigma off by {float(err.max()):.3g} x the tolerance"


@needs_C
@pytest.mark.parametrize("ratio", [0.995, 0.9, 0.5, 1.0])
@pytest.mark.parametrize("max_value", [math.inf, 1.5, 4.0])
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (4, 3, 16, 16), (3, 5, 7, 11), (5, 1, 1)])
def test_dynamic_threshold_equals_diffusers_threshold_sample(ratio, max_value, shape, rng):
    """x0 thresholded by the kernel (a row with p = 0, q = 1, b = 1: out = the thresholded m) against
    DDPMScheduler(thresholding=True, ...)._threshold_sample on the same x0: <= 1e-6 relative elementwise (the same
    order statistics and lerp; a threshold differing by rounding moves out by that relative amount)."""
    sched = DDPMScheduler(
        thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value, clip_sample=False
    )
    dyn = DynamicThreshold(ratio, max_value)
    x0 = _t(rng, shape, spread=float(rng.uniform(0.3, 3.0)))
    x0[0] *= 0.2  # one sample inside [-1, 1]: its threshold clamps to 1
    want = sched._threshold_sample(x0.clone())
    row = (0.0, 1.0, 0.0, 0.0, 1.0, 0.0)
    thr = dynamic_thresholds(torch.zeros(shape), x0, 0.0, 1.0, dyn)
    got = fused_step_raw(torch.zeros(shape), x0, row, math.inf, 1, 0, 0, torch.empty(shape), thresholds=thr)
    err = float(((got.double() - want.double()).abs() / (want.double().abs() + 1e-30)).max())
    assert err <= TOL, f"relative error {err:.3g}"
    s_ref = dyn.thresholds(x0)  # torch.quantile: the reference step's thresholds
    assert float(((thr.double() - s_ref.double()).abs() / s_ref.double()).max()) <= TOL
    assert float(thr[0]) == 1.0 or float(x0[0].abs().max()) > 1.0


@needs_C
def test_threshold_selection_paths_are_exact(rng):
    """The C++ pass selects the top order statistics among candidates above a subsample's cut when the quantile is
    high, falling back to the full nth_element when fewer than k values pass the cut: both equal torch.quantile,
    with random values, heavy ties, and data built to defeat the subsample (every 8th value large)."""
    d = 4096
    random = _t(rng, (3, d))
    ties = torch.from_numpy(rng.integers(-3, 4, (3, d)).astype(np.float32))
    spiky = torch.from_numpy(rng.uniform(0, 1, (3, d)).astype(np.float32))
    spiky[:, ::8] = torch.from_numpy(rng.uniform(100, 200, (3, d // 8)).astype(np.float32))
    for data in (random, ties, spiky):
        for ratio in (0.999, 0.995, 0.95, 0.5):
            dyn = DynamicThreshold(ratio)
            got = dynamic_thresholds(torch.zeros_like(data), data, 0.0, 1.0, dyn)
            assert torch.equal(got, dyn.thresholds(data)), (ratio, got, dyn.thresholds(data))


def test_dynamic_thresholds_torch_path_equals_quantile(monkeypatch, rng):
    """The torch-ops thresholds (CUDA, and without ddpm._C: top-k and torch.lerp) equal torch.quantile's, NaN
    included (a sample holding a NaN gets a NaN threshold, as torch.quantile gives)."""
    monkeypatch.setattr(extension, "cpu_extension", lambda: None)
    for shape in [(4, 3, 8, 8), (3, 7), (2, 1)]:
        x, m, u = (_t(rng, shape) for _ in range(3))
        if shape[1] > 1:
            m[1, 0] = float("nan")
        for ratio in (0.995, 0.5, 1.0):
            dyn = DynamicThreshold(ratio, 3.0)
            got = dynamic_thresholds(x, m, 0.7, -1.3, dyn, uncond=u, guidance=2.0)
            want = dyn.thresholds(0.7 * x + -1.3 * (u + 2.0 * (m - u)))
            assert torch.equal(got.isnan(), want.isnan())
            assert torch.equal(got.nan_to_num(), want.nan_to_num())


@needs_C
def test_nan_sample_gets_nan_threshold_and_propagates(rng):
    x, m = _t(rng, (3, 10)), _t(rng, (3, 10))
    m[2, 4] = float("nan")
    thr = dynamic_thresholds(x, m, 1.0, 0.5, DynamicThreshold(0.99))
    assert torch.isnan(thr[2]) and not torch.isnan(thr[:2]).any()
    out = ddpm.fused_step(SCHEDULE, 5, x, m, seed=1, clip=DynamicThreshold(0.99))
    assert torch.isnan(out[2]).all() and not torch.isnan(out[:2]).any()


# ------------------------------------------------------------------------------------------ tables and loops


@needs_C
@pytest.mark.parametrize("clip", [1.0, DynamicThreshold(0.97, 3.0)], ids=str)
def test_host_step_table_runs_the_learned_guided_loop(clip, rng):
    """HostStepTable over an 8-wide table with variance, uncond and guidance (and, for a DynamicThreshold, the
    thresholds computed from the counter's row at each call): bind() and step() equal the public fused step."""
    schedule = ddpm.Schedule.cosine(200).respace(8)
    kw = dict(prediction="v", sampler="ddpm", variance="learned_range")
    shape, seed = (3, 2, 5, 5), int(rng.integers(0, 2**63))
    x, m, u = (_t(rng, shape) for _ in range(3))
    v = _v(rng, shape)
    table = HostStepTable.from_schedule(schedule, seed=seed, sample_offset=4, clip=clip, **kw)
    run = table.bind(x, m, x, variance=v, uncond=u, guidance=3.0)
    ref = x.clone()
    ops = dict(variance_output=v, uncond=u, guidance=3.0)
    for i in reversed(range(len(schedule))):
        assert table.counter == i
        ref = ddpm.fused_step(schedule, i, ref, m, seed=seed, sample_offset=4, clip=clip, **kw, **ops)
        assert run() is x
        assert torch.equal(x, ref)
    table.set_counter(3)
    out = table.step(x, m, torch.empty_like(x), variance=v, uncond=u, guidance=3.0)
    assert torch.equal(
        out, ddpm.fused_step(schedule, 3, x, m, seed=seed, sample_offset=4, clip=clip, **kw, **ops)
    )
    with pytest.raises(InvalidArgumentError, match=r"needs the variance operand"):
        table.step(x, m, torch.empty_like(x))


def test_pure_torch_fallback_has_every_operand(monkeypatch, rng):
    """Without ddpm._C the torch path takes every operand and gives ddpm.step's numbers (same ops, same noise)."""
    monkeypatch.setattr(extension, "cpu_extension", lambda: None)
    monkeypatch.setattr(extension, "_warned", {"fused_step:cpu"})
    kw = dict(prediction="eps", sampler="ddpm", variance="learned_range")
    shape = (3, 4, 5)
    x, u = _t(rng, shape), _t(rng, shape)
    net = _t(rng, (3, 8, 5))
    m, v = net[:, :4], net[:, 4:].clamp(-1, 1)
    for i in (0, 9):
        z = torch.from_numpy(noise.normal_reference(8, shape, step=i, sample_offset=2))
        for clip in CLIPS:
            ref = ddpm.step(SCHEDULE, i, x, u + 2.0 * (m - u), z, clip=clip, variance_output=v, **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = ddpm.fused_step(
                    SCHEDULE, i, x, m, seed=8, sample_offset=2, clip=clip, variance_output=v, uncond=u,
                    guidance=2.0, **kw,
                )  # fmt: skip
            assert torch.equal(got, ref)
    with pytest.raises(InvalidArgumentError, match=r"guidance = 2\.0 != 1 needs uncond"):
        fused_step_raw(x, m, (1, 0, 0, 1, 0, 0), math.inf, 1, 1, 0, torch.empty(shape), guidance=2.0)
    with pytest.raises(
        InvalidArgumentError, match=r"8-wide coefficient row .* and the variance operand go together"
    ):
        fused_step_raw(x, m, (1, 0, 0, 1, 0, 0, 0, 0), math.inf, 1, 1, 0, torch.empty(shape))


# ------------------------------------------------------------------------------------------ the table


def test_learned_range_table_columns():
    """Columns 0..5 are fixed_small's; lv0, lv1 give exp(lv0 + lv1 v) = exp((frac max_log + (1 - frac) min_log)
    / 2), frac = (v + 1) / 2, with beta of the respaced schedule (improved-diffusion / diffusers respacing)."""
    for schedule in (ddpm.Schedule.linear(1000), ddpm.Schedule.cosine(1000).respace(30)):
        for prediction in ("eps", "x0", "v"):
            t = schedule.coefficients(prediction, "ddpm", "learned_range")
            assert t.shape == (len(schedule), 8)
            assert np.array_equal(t[:, :6], schedule.coefficients(prediction, "ddpm", "fixed_small"))
        min_log = np.log(np.maximum(schedule.posterior_variance, 1e-20))
        max_log = np.log(schedule.betas)
        for v in (-1.0, -0.3, 0.0, 0.8, 1.0):
            frac = (v + 1) / 2
            want = 0.5 * (frac * max_log + (1 - frac) * min_log)
            np.testing.assert_allclose(t[:, COEF_LV0] + t[:, COEF_LV1] * v, want, rtol=1e-12, atol=1e-12)
        for sampler in ("ddim", "dpm++2m", "dpm++2m-sde"):  # the mean only: fixed_small's 6 columns
            got = schedule.coefficients("eps", sampler, "learned_range")
            assert np.array_equal(got, schedule.coefficients("eps", sampler, "fixed_small"))


def test_learned_range_is_ignored_by_mean_only_samplers(rng):
    x, m, v = _t(rng, (2, 9)), _t(rng, (2, 9)), _v(rng, (2, 9))
    plain = ddpm.fused_step(SCHEDULE, 6, x, m, seed=2, sampler="ddim")
    got = ddpm.fused_step(
        SCHEDULE, 6, x, m, seed=2, sampler="ddim", variance="learned_range", variance_output=v
    )
    assert torch.equal(got, plain)
    z = torch.zeros(2, 9)
    ref = ddpm.step(SCHEDULE, 6, x, m, z, sampler="ddim", variance="learned_range", variance_output=v)
    assert torch.equal(ref, ddpm.step(SCHEDULE, 6, x, m, z, sampler="ddim"))


# ------------------------------------------------------------------------------------------ DynamicThreshold


def test_dynamic_threshold_parse_and_text():
    assert DynamicThreshold.parse("dynamic:0.995") == DynamicThreshold(0.995)
    assert DynamicThreshold.parse("dynamic:0.9:2") == DynamicThreshold(0.9, 2.0)
    assert DynamicThreshold.parse("DYNAMIC:1:inf").max_value == math.inf
    for text in ("dynamic:0.995", "dynamic:0.9:2"):
        assert str(DynamicThreshold.parse(text)) == text
    assert ddpm.diffusion.check_clip_or_threshold(DynamicThreshold(0.5)) == DynamicThreshold(0.5)
    assert ddpm.diffusion.check_clip_or_threshold(None) == math.inf


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DynamicThreshold(0.0), r"ratio must be in \(0, 1\], got 0\.0"),
        (lambda: DynamicThreshold(1.5), r"ratio must be in \(0, 1\], got 1\.5"),
        (lambda: DynamicThreshold(math.nan), r"ratio must be in \(0, 1\], got nan"),
        (lambda: DynamicThreshold(True), r"ratio must be a number, got bool"),
        (lambda: DynamicThreshold(0.9, 0.5), r"max_value must be >= 1 \(inf for no bound\), got 0\.5"),
        (lambda: DynamicThreshold(0.9, math.nan), r"max_value must be >= 1"),
        (lambda: DynamicThreshold.parse("0.995"), r"must read dynamic:RATIO or dynamic:RATIO:MAX"),
        (lambda: DynamicThreshold.parse("dynamic:"), r"RATIO and MAX must be numbers"),
        (lambda: DynamicThreshold.parse("dynamic:x:2"), r"RATIO and MAX must be numbers"),
        (lambda: DynamicThreshold.parse("dynamic:0.9:2:3"), r"must read dynamic:RATIO or dynamic:RATIO:MAX"),
        (lambda: check_clip(DynamicThreshold(0.9)), r"clip must be a positive number .* got dynamic:0\.9"),
    ],
)
def test_bad_dynamic_threshold(make, match):
    with pytest.raises(InvalidArgumentError, match=match):
        make()


# ------------------------------------------------------------------------------------------ argument errors

_ROW6 = (0.9, 0.1, 0.0, 1.0, -0.5, 0.1)
_ROW8 = (*_ROW6, -3.0, 0.5)


def _raw(**over):
    x = torch.zeros(2, 3, 4)
    args = dict(
        x=x, m=torch.zeros(2, 3, 4), coeffs=_ROW6, clip=math.inf, seed=1, step_index=3, sample_offset=0
    )
    args["out"] = torch.empty(2, 3, 4)
    args.update(over)
    return args


_BUF = torch.zeros(2 * 24 + 4)
_WIDE = torch.zeros(2, 6, 4)


@needs_C
@pytest.mark.parametrize(
    "over, match",
    [
        (
            dict(coeffs=_ROW8, variance=torch.zeros(2, 3, 4, dtype=torch.float64)),
            r"variance must be float32, got",
        ),
        (dict(uncond=torch.zeros(2, 12)), r"uncond has shape \(2, 12\) but x has shape \(2, 3, 4\)"),
        (
            dict(coeffs=_ROW8, variance=torch.zeros(2, 3, 4, device="meta")),
            r"variance is on meta but x is on cpu",
        ),
        (dict(m=torch.zeros(2, 4, 3).transpose(1, 2)), r"m must have contiguous samples"),
        (dict(uncond=torch.zeros(3, 2, 4).transpose(0, 1)), r"uncond must have contiguous samples"),
        (dict(coeffs=_ROW8), r"8-wide coefficient row \(learned-range variance\) needs the variance operand"),
        (dict(variance=torch.zeros(2, 3, 4)), r"a variance operand needs an 8-wide coefficient row"),
        (dict(coeffs=(*_ROW6, 1.0)), r"coeffs must be 6 floats .* or 8"),
        (dict(coeffs=(*_ROW6, math.nan, 0.5)), r"coefficient lv0 is not finite"),
        (
            dict(uncond=torch.zeros(2, 3, 4), guidance=math.nan),
            r"guidance must be a finite float32 number, got nan",
        ),
        (dict(uncond=torch.zeros(2, 3, 4), guidance=1e39), r"guidance must be a finite float32 number"),
        (dict(guidance=2.0), r"guidance = 2\.0+ != 1 needs uncond"),
        (dict(thresholds=torch.ones(2), clip=1.0), r"thresholds replace the clip bound: pass clip = \+inf"),
        (dict(thresholds=torch.ones(3)), r"thresholds must be a contiguous float32 \[N\] = \[2\] tensor"),
        (dict(thresholds=torch.ones(2, dtype=torch.float64)), r"thresholds must be a contiguous float32"),
        (dict(uncond=_BUF[2:26].view(2, 3, 4), out=_BUF[:24].view(2, 3, 4)), r"uncond must not overlap out"),
        (
            dict(coeffs=_ROW8, variance=_BUF[:24].view(2, 3, 4), history=_BUF[20:44].view(2, 3, 4)),
            r"variance must not overlap history",
        ),
        (dict(thresholds=_BUF[:2], out=_BUF[:24].view(2, 3, 4)), r"thresholds must not overlap out"),
        (dict(m=_WIDE[:, :3], out=_WIDE[:, :3]), r"out must be contiguous"),
        (dict(m=_WIDE[:, :3], out=_WIDE[:, 2:5].contiguous()), None),  # a copy: no overlap, runs
    ],
)
def test_operand_argument_errors(over, match):
    if match is None:
        fused_step_raw(**_raw(**over))
        return
    with pytest.raises(InvalidArgumentError, match=match) as e:
        fused_step_raw(**_raw(**over))
    assert "\n" not in str(e.value)


@needs_C
def test_binding_checks_strides_and_in_place_into_strided_m():
    """What only a direct binding call (or a hand-made view) reaches: a stride below d, and out in m's span."""
    x, out = torch.zeros(2, 8), torch.zeros(2, 8)
    wide = torch.zeros(2, 16)
    args = (x.data_ptr(), wide.data_ptr(), out.data_ptr(), 2, 8, _ROW6, math.inf, 1, 3, 0)
    with pytest.raises(ValueError, match=r"m_stride must be >= d = 8 \(the elements of one sample\), got 3"):
        _C.fused_step(*args, m_stride=3)
    with pytest.raises(ValueError, match=r"unexpected keyword argument 'colour'"):
        _C.fused_step(*args, colour=1)
    args = (x.data_ptr(), wide.data_ptr(), wide.data_ptr(), 2, 8, _ROW6, math.inf, 1, 3, 0)
    with pytest.raises(ValueError, match=r"out must not overlap m: m's samples are strided"):
        _C.fused_step(*args, m_stride=16)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        _C.dynamic_thresholds(x.data_ptr(), x.data_ptr(), out.data_ptr(), 2, 8, 1.0, 0.0, 0.0, 2.0)


def test_public_front_errors(rng):
    x = _t(rng, (2, 3, 4))
    with pytest.raises(InvalidArgumentError, match=r"learned_range' with sampler ddpm needs variance_output"):
        ddpm.fused_step(SCHEDULE, 3, x, x, seed=0, variance="learned_range")
    with pytest.raises(InvalidArgumentError, match=r"learned_range' with sampler ddpm needs variance_output"):
        ddpm.fused_step(SCHEDULE, 3, x, x, seed=0, variance="learned_range", out=torch.empty_like(x))
    with pytest.raises(
        InvalidArgumentError, match=r"variance_output is read only with variance='learned_range'"
    ):
        ddpm.fused_step(SCHEDULE, 3, x, x, seed=0, variance_output=x)
    with pytest.raises(InvalidArgumentError, match=r"variance_output must be float32"):
        ddpm.fused_step(SCHEDULE, 3, x, x, seed=0, variance="learned_range", variance_output=x.double())
    with pytest.raises(InvalidArgumentError, match=r"learned_range' with sampler ddpm needs variance_output"):
        ddpm.step(SCHEDULE, 3, x, x, x, variance="learned_range")
    with pytest.raises(
        InvalidArgumentError, match=r"variance_output is read only with variance='learned_range'"
    ):
        ddpm.step(SCHEDULE, 3, x, x, x, variance_output=x)
    with pytest.raises(InvalidArgumentError, match=r"variance_output must be a float32 tensor"):
        ddpm.step(SCHEDULE, 3, x, x, x, variance="learned_range", variance_output=x.double())


@needs_C
def test_exp_is_float32_accurate_in_the_kernel(rng):
    """sigma_e = exp(v) (lv0 = 0, lv1 = 1) through the kernel, with the kernel's own z (ddpm.noise.normal): within
    2 ulp of float64 exp (about 1 for exp, 1/2 for the product with z) over exponents -40..5, in every variant."""
    n, d = 2, 4099
    v = torch.from_numpy(rng.uniform(-40, 5, (n, d)).astype(np.float32))
    want = torch.exp(v.double())
    row = (0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0)
    try:
        for target in _C.simd_targets():
            _C.set_simd_target(target)
            z = noise.normal(3, (n, d), step=7).double()  # this variant's z (FMA changes its last bits)
            out = fused_step_raw(
                torch.zeros(n, d), torch.zeros(n, d), row, math.inf, 3, 7, 0, torch.empty(n, d), variance=v
            )
            got = out.double() / z
            ulp = torch.from_numpy(np.spacing(want.float().numpy()).astype(np.float64))
            assert float(((got - want).abs() / ulp)[z.abs() > 1e-3].max()) <= 2.0, target
    finally:
        _C.set_simd_target("")
