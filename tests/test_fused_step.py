"""The fused CPU step equals ddpm.step fed ddpm.noise.normal(...) (fresh random inputs every run).

Tolerance: both evaluate a x + b clip(p x + q m) + sigma z in float32 from the same float32 coefficients and the
same z; they differ only in rounding order (the kernel may fuse a multiply-add, ~6 roundings of <= 2^-24 each).
So the error is bounded by ~4e-7 times the magnitude scale |a x| + |b| (|p x| + |q m|) + |sigma z| of the terms
(the quantity that bounds rounding error when terms cancel); we require <= 1e-6 of that scale, as test_step.py.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import ddpm
import ddpm.noise as noise
from ddpm import extension
from ddpm.errors import InvalidArgumentError
from ddpm.kernels import HostStepTable, fused_step_raw

_C = extension.cpu_extension()
needs_C = pytest.mark.skipif(_C is None, reason="ddpm._C is not built")

TOL = 1e-6
SCHEDULE = ddpm.Schedule.linear(1000).respace(50)
# Per-sample sizes that are not multiples of 4 (partial Philox groups) or of the thread count.
ODD_SHAPES = [(3, 5, 7, 11), (2, 1, 9, 9), (5, 3), (1, 13)]


def _inputs(rng, shape, spread=2.0):
    # Wide inputs so that a clip at 1 really clips most x0_hat.
    x = torch.from_numpy((spread * rng.standard_normal(shape)).astype(np.float32))
    m = torch.from_numpy((spread * rng.standard_normal(shape)).astype(np.float32))
    return x, m


def _assert_close(out, ref, x, m, z, coeffs):
    a, b, _c, p, q, sigma = coeffs
    xd, md, zd = (t.double() for t in (x, m, z))
    scale = (a * xd).abs() + abs(b) * ((p * xd).abs() + (q * md).abs()) + (sigma * zd).abs() + 1e-30
    err = float(((out.double() - ref.double()).abs() / scale).max())
    assert err <= TOL, f"relative error {err:.3g} > {TOL}"


def _indices(rng):
    return sorted({0, 1, len(SCHEDULE) // 2, len(SCHEDULE) - 1, int(rng.integers(0, len(SCHEDULE)))})


@needs_C
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize(
    "sampler, variance, eta",
    [
        ("ddpm", "fixed_small", 0.0),
        ("ddpm", "fixed_large", 0.0),
        ("ddim", "fixed_small", 0.0),
        ("ddim", "fixed_small", 0.7),
    ],
)
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("in_place", [False, True])
def test_fused_step_equals_reference_step(prediction, sampler, variance, eta, clip, in_place, rng):
    kw = dict(prediction=prediction, sampler=sampler, variance=variance, eta=eta)
    seed = int(rng.integers(0, 2**63))
    for shape in ODD_SHAPES:
        for i in _indices(rng):
            offset = int(rng.integers(0, 1000))
            x, m = _inputs(rng, shape)
            z = noise.normal(seed, shape, step=i, sample_offset=offset)
            ref = ddpm.step(SCHEDULE, i, x, m, z, clip=clip, **kw)
            x_in = x.clone()
            out = ddpm.fused_step(
                SCHEDULE,
                i,
                x_in,
                m,
                seed=seed,
                sample_offset=offset,
                clip=clip,
                out=x_in if in_place else None,
                **kw,
            )
            assert (out is x_in) == in_place
            coeffs = ddpm.diffusion.step_coefficients(SCHEDULE, i, **kw)
            _assert_close(out, ref, x, m, z, coeffs)


@needs_C
@pytest.mark.parametrize("threads", ["single", "split"])
def test_every_simd_variant_and_thread_split(threads, rng):
    shape = (6, 3, 11, 7)  # 231 elements per sample
    x, m = _inputs(rng, shape)
    seed, i = int(rng.integers(0, 2**63)), 37
    z = noise.normal_reference(seed, shape, step=i, sample_offset=9)
    ref = ddpm.step(SCHEDULE, i, x, m, torch.from_numpy(z), clip=1.5)
    coeffs = ddpm.diffusion.step_coefficients(SCHEDULE, i)
    old = _C.parallel_threshold()
    if threads == "split":
        _C.set_parallel_threshold(1)
    try:
        for target in _C.simd_targets():
            _C.set_simd_target(target)
            out = ddpm.fused_step(SCHEDULE, i, x, m, seed=seed, sample_offset=9, clip=1.5)
            _assert_close(out, ref, x, m, torch.from_numpy(z), coeffs)
    finally:
        _C.set_simd_target("")
        _C.set_parallel_threshold(old)


@needs_C
def test_in_place_into_model_output(rng):
    x, m = _inputs(rng, (3, 5, 7, 11))
    expected = ddpm.fused_step(SCHEDULE, 20, x, m, seed=3)
    out = ddpm.fused_step(SCHEDULE, 20, x, m, seed=3, out=m)
    assert out is m and torch.equal(m, expected)


@needs_C
def test_batch_of_16_equals_16_batches_of_1(rng):
    shape = (16, 3, 5, 5)
    x, m = _inputs(rng, shape)
    batch = ddpm.fused_step(SCHEDULE, 30, x, m, seed=11, sample_offset=40)
    for k in range(16):
        one = ddpm.fused_step(SCHEDULE, 30, x[k : k + 1], m[k : k + 1], seed=11, sample_offset=40 + k)
        assert torch.equal(one[0], batch[k])


@needs_C
def test_nan_propagates_like_torch(rng):
    x, m = _inputs(rng, (2, 9))
    x[1, 4] = float("nan")
    out = ddpm.fused_step(SCHEDULE, 10, x, m, seed=1, clip=1.0)
    assert torch.isnan(out[1, 4]) and int(torch.isnan(out).sum()) == 1


@needs_C
def test_host_step_table_runs_the_loop_like_fused_step(rng):
    shape = (3, 2, 5, 5)
    x, m = _inputs(rng, shape)
    table = HostStepTable.from_schedule(SCHEDULE, seed=21, sample_offset=4, prediction="v", clip=1.0)
    run = table.bind(x, m, x)  # in place, like the sampling loop
    ref = x.clone()
    for i in reversed(range(len(SCHEDULE))):
        assert table.counter == i
        ref = ddpm.fused_step(SCHEDULE, i, ref, m, seed=21, sample_offset=4, prediction="v", clip=1.0)
        assert run() is x
        assert torch.equal(x, ref)
    with pytest.raises(IndexError, match=r"step counter -1 is outside the table 0\.\.49"):
        run()
    table.set_counter(5)
    out = table.step(x, m, torch.empty_like(x))
    assert torch.equal(
        out, ddpm.fused_step(SCHEDULE, 5, x, m, seed=21, sample_offset=4, prediction="v", clip=1.0)
    )
    with pytest.raises(InvalidArgumentError, match=r"step counter must be an integer in 0\.\.49, got 50"):
        table.set_counter(50)


def test_pure_torch_fallback_warns_once_and_matches(monkeypatch, rng):
    monkeypatch.setattr(extension, "cpu_extension", lambda: None)
    monkeypatch.setattr(extension, "_warned", set())
    shape = (3, 5, 7)
    x, m = _inputs(rng, shape)
    z = torch.from_numpy(noise.normal_reference(8, shape, step=12, sample_offset=2))
    ref = ddpm.step(SCHEDULE, 12, x, m, z, prediction="eps", clip=1.0)
    with pytest.warns(extension.FallbackWarning, match="pure torch path"):
        out = ddpm.fused_step(SCHEDULE, 12, x, m, seed=8, sample_offset=2, clip=1.0)
    assert torch.equal(out, ref)  # same ops, same order, same noise: identical
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddpm.fused_step(SCHEDULE, 11, x, m, seed=8, sample_offset=2, out=x)


def _bad(**overrides):
    x, m = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    args = dict(
        x=x,
        m=m,
        coeffs=(0.9, 0.1, 0.0, 1.0, -0.5, 0.1),
        clip=math.inf,
        seed=1,
        step_index=3,
        sample_offset=0,
        out=torch.empty(2, 3, 4),
    )
    args.update(overrides)
    return args


@needs_C
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(x=torch.zeros(2, 3, 4, dtype=torch.float64)), r"x must be float32, got torch.float64"),
        (dict(m=torch.zeros(2, 3, 4, dtype=torch.float16)), r"m must be float32, got torch.float16"),
        (dict(out=torch.zeros(2, 4, 3).transpose(1, 2)), r"out must be contiguous"),
        (dict(m=torch.zeros(2, 12)), r"m has shape \(2, 12\) but x has shape \(2, 3, 4\)"),
        (dict(out=torch.empty(2, 3, 4, device="meta")), r"out is on meta but x is on cpu"),
        (dict(x=np.zeros((2, 3, 4), np.float32)), r"x must be a torch.Tensor, got ndarray"),
        (dict(x=torch.tensor(1.0), m=torch.tensor(1.0), out=torch.tensor(1.0)), r"x must be \[N, \.\.\.\]"),
        (dict(seed=-5), r"seed must be an integer in \[0, 2\^64\), got -5"),
        (dict(step_index=2**32), r"step must be an integer in \[0, 4294967296\)"),
        (dict(sample_offset=2**32 - 1), r"sample_offset \+ N must be <= 2\^32"),
        (dict(clip=0.0), r"clip must be > 0"),
        (dict(clip=float("nan")), r"clip must be > 0"),
        (dict(coeffs=(0.9, 0.1, 1.0)), r"coeffs must be 6 floats"),
        (dict(coeffs=(0.9, 0.1, 0.0, 1.0, float("inf"), 0.1)), r"coefficient q is not finite"),
    ],
)
def test_raw_argument_errors(overrides, match):
    with pytest.raises(InvalidArgumentError, match=match):
        fused_step_raw(**_bad(**overrides))


@needs_C
def test_partial_overlap_is_refused():
    buf = torch.zeros(2 * 24 + 1)
    x = buf[:24].view(2, 3, 4)
    out = buf[1:25].view(2, 3, 4)  # shifted by one element: an in-place update would read what it wrote
    with pytest.raises(InvalidArgumentError, match=r"out and x overlap without being the same buffer"):
        fused_step_raw(**_bad(x=x, out=out))


def test_high_level_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(InvalidArgumentError, match=r"step index i must be an integer in 0\.\.49, got 50"):
        ddpm.fused_step(SCHEDULE, 50, x, x, seed=0)
    with pytest.raises(InvalidArgumentError, match=r"unknown prediction 'noise'; allowed: eps, x0, v"):
        ddpm.fused_step(SCHEDULE, 3, x, x, seed=0, prediction="noise")
    with pytest.raises(InvalidArgumentError, match=r"clip must be a positive number"):
        ddpm.fused_step(SCHEDULE, 3, x, x, seed=0, clip=-1.0)
