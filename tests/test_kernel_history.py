"""The history operand of the fused step (multistep solvers such as DPM-Solver++(2M)) against plain torch.

    x0_hat = clip(p x + q m, -clip, clip);  x_prev = a x + b x0_hat + c h + sigma z;  then h <- x0_hat

Fresh random inputs and rows every run. Tolerance: kernel and reference evaluate the same float32 expression from
the same float32 coefficients and the same z, and differ only in rounding order (the compiler may fuse
multiply-adds): about eight roundings of <= 2^-24 each, so <= ~5e-7 of the magnitude scale
|a x| + |b| (|p x| + |q m|) + |c h| + |sigma z| (what bounds rounding error when terms cancel). We require 1e-6 of
it, as tests/test_fused_step.py does; x0_hat (written to h) is held to 1e-6 of |p x| + |q m|.
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
import torch

import ddpm
import ddpm.noise as noise
from ddpm import extension, kernels
from ddpm.errors import InvalidArgumentError
from ddpm.kernels import HostStepTable, fused_step_raw

_C = extension.cpu_extension()
needs_C = pytest.mark.skipif(_C is None, reason="ddpm._C is not built")

TOL = 1e-6
SHAPES = [(3, 5, 7, 11), (2, 1, 9, 9), (5, 3), (1, 13), (4, 3, 8, 8)]  # partial Philox groups, and whole ones
SCHEDULE = ddpm.Schedule.linear(1000).respace(40)


def _row(rng, c: float | None = None, sigma: float | None = None) -> tuple[float, ...]:
    """A random float32-representable row (a, b, c, p, q, sigma), c != 0 unless given."""
    a, b, c_, p, q, s = rng.uniform(-1.5, 1.5, 6)
    row = (a, b, c_ if c is None else c, p, q, abs(s) if sigma is None else sigma)
    return tuple(float(np.float32(v)) for v in row)


def _tensors(rng, shape, k=3, spread=2.0):
    return [torch.from_numpy((spread * rng.standard_normal(shape)).astype(np.float32)) for _ in range(k)]


def _reference(x, m, h, row, clip, seed, step, offset):
    """(x_prev, x0_hat) in plain torch, from the formula in the module docstring."""
    a, b, c, p, q, sigma = row
    x0 = p * x + q * m
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    z = torch.from_numpy(noise.normal_reference(seed, tuple(x.shape), step=step, sample_offset=offset))
    return a * x + b * x0 + c * h + sigma * z, x0, z


def _assert_close(out, h_out, ref, x0_ref, x, m, h, z, row):
    a, b, c, p, q, sigma = row
    xd, md, hd, zd = (t.double() for t in (x, m, h, z))
    x0_scale = (p * xd).abs() + (q * md).abs() + 1e-30
    scale = (a * xd).abs() + abs(b) * x0_scale + (c * hd).abs() + (sigma * zd).abs() + 1e-30
    err = float(((out.double() - ref.double()).abs() / scale).max())
    assert err <= TOL, f"x_prev: relative error {err:.3g} > {TOL}"
    err = float(((h_out.double() - x0_ref.double()).abs() / x0_scale).max())
    assert err <= TOL, f"h: relative error {err:.3g} > {TOL}"


@needs_C
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("in_place", [False, True])
def test_history_step_equals_reference(clip, in_place, rng):
    seed = int(rng.integers(0, 2**63))
    for shape in SHAPES:
        x, m, h = _tensors(rng, shape)
        row, step, offset = _row(rng), int(rng.integers(0, 2**31)), int(rng.integers(0, 1000))
        ref, x0_ref, z = _reference(x, m, h, row, clip, seed, step, offset)
        xk, hk = x.clone(), h.clone()
        out = xk if in_place else torch.empty_like(x)
        res = fused_step_raw(
            xk, m, row, math.inf if clip is None else clip, seed, step, offset, out, history=hk
        )
        assert res is out
        _assert_close(out, hk, ref, x0_ref, x, m, h, z, row)


@needs_C
@pytest.mark.parametrize("sigma", [None, 0.0])  # noisy and deterministic steps take different loops
def test_c_zero_never_reads_history_but_writes_x0_hat(sigma, rng):
    shape = (3, 5, 7, 11)
    x, m = _tensors(rng, shape, k=2)
    row = _row(rng, c=0.0, sigma=sigma)
    h = torch.full(shape, float("nan"))  # "uninitialised": any read of it would make the output NaN
    with_h = fused_step_raw(x, m, row, 1.0, 7, 12, 3, torch.empty_like(x), history=h)
    without = fused_step_raw(x, m, row, 1.0, 7, 12, 3, torch.empty_like(x))
    assert torch.equal(with_h, without)
    _, x0_ref, _ = _reference(x, m, torch.zeros(shape), row, 1.0, 7, 12, 3)
    a, b, c, p, q, _s = row
    err = float(
        ((h.double() - x0_ref.double()).abs() / ((p * x).abs() + (q * m).abs() + 1e-30).double()).max()
    )
    assert err <= TOL


@needs_C
@pytest.mark.parametrize("threads", ["single", "split"])
def test_every_simd_variant(threads, rng):
    shape = (6, 3, 11, 7)  # 231 elements per sample: a partial group per sample, and several threads' chunks
    x, m, h = _tensors(rng, shape)
    row, seed = _row(rng), int(rng.integers(0, 2**63))
    ref, x0_ref, z = _reference(x, m, h, row, 1.5, seed, 21, 9)
    old = _C.parallel_threshold()
    if threads == "split":
        _C.set_parallel_threshold(1)
    try:
        for target in _C.simd_targets():
            _C.set_simd_target(target)
            hk = h.clone()
            out = fused_step_raw(x, m, row, 1.5, seed, 21, 9, torch.empty_like(x), history=hk)
            _assert_close(out, hk, ref, x0_ref, x, m, h, z, row)
    finally:
        _C.set_simd_target("")
        _C.set_parallel_threshold(old)


def _history_table(rng, steps: int) -> np.ndarray:
    """A [steps, 6] table with c != 0 in every row but the first (a multistep solver's shape)."""
    table = np.array([_row(rng) for _ in range(steps)], dtype=np.float64)
    table[0, 2] = 0.0
    return table


@needs_C
def test_host_step_table_with_history_runs_the_loop(rng):
    steps, shape, seed = 6, (3, 2, 5, 5), int(rng.integers(0, 2**63))
    table = _history_table(rng, steps)
    rows = [tuple(float(v) for v in r.astype(np.float32)) for r in table]
    x, m = _tensors(rng, shape, k=2)
    h = torch.zeros(shape)
    host = HostStepTable(table, 1.0, seed, sample_offset=4)
    run = host.bind(x, m, x, history=h)
    ref_x, ref_h = x.clone(), h.clone()
    for i in reversed(range(steps)):
        assert host.counter == i
        fused_step_raw(ref_x, m, rows[i], 1.0, seed, i, 4, ref_x, history=ref_h)
        assert run() is x
        assert torch.equal(x, ref_x) and torch.equal(h, ref_h)
    host.set_counter(2)
    out = host.step(x, m, torch.empty_like(x), history=h)
    fused_step_raw(ref_x, m, rows[2], 1.0, seed, 2, 4, ref_x, history=ref_h)
    assert torch.equal(out, ref_x) and torch.equal(h, ref_h)


@needs_C
def test_argument_errors():
    x, m, h = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    row = (0.9, 0.1, 0.5, 1.0, -0.5, 0.1)
    args = (row, math.inf, 1, 3, 0)
    with pytest.raises(InvalidArgumentError, match=r"history must not overlap x"):
        fused_step_raw(x, m, *args, torch.empty_like(x), history=x)
    out = torch.empty_like(x)
    with pytest.raises(InvalidArgumentError, match=r"history must not overlap out"):
        fused_step_raw(x, m, *args, out, history=out)
    buf = torch.zeros(2 * 12 + 1)
    with pytest.raises(InvalidArgumentError, match=r"history must not overlap m"):  # partly overlapping
        fused_step_raw(x, buf[:24].view(2, 3, 4), *args, torch.empty_like(x), history=buf[1:25].view(2, 3, 4))
    with pytest.raises(
        InvalidArgumentError, match=r"history has shape \(2, 12\) but x has shape \(2, 3, 4\)"
    ):
        fused_step_raw(x, m, *args, torch.empty_like(x), history=torch.zeros(2, 12))
    with pytest.raises(InvalidArgumentError, match=r"history must be float32, got torch.float64"):
        fused_step_raw(x, m, *args, torch.empty_like(x), history=h.double())
    with pytest.raises(InvalidArgumentError, match=r"coefficient c = 0\.5.* != 0 needs a history buffer"):
        fused_step_raw(x, m, *args, torch.empty_like(x))
    with pytest.raises(InvalidArgumentError, match=r"coefficient c of table row 3 is not finite"):
        table = np.zeros((5, 6))
        table[3, 2] = np.nan
        HostStepTable(table, 1.0, 0)


def test_public_fused_step_caches_one_table_per_schedule_and_config(rng):
    schedule = ddpm.Schedule.cosine(100).respace(10)
    x, m = _tensors(rng, (2, 3, 4, 4), k=2)
    first = kernels.kernel_table(schedule, "eps", "ddim", "fixed_small", 0.0)
    assert kernels.kernel_table(schedule, "eps", "ddim", "fixed_small", 0.0) is first
    other = kernels.kernel_table(schedule, "eps", "ddim", "fixed_small", 0.5)
    assert other is not first and not np.array_equal(other.table32, first.table32)
    before = len(kernels._TABLES)
    for i in (9, 5, 0):  # the public call reads the cached table: no new entry, same numbers as the row form
        out = ddpm.fused_step(schedule, i, x, m, seed=5, sampler="ddim", eta=0.5)
        ref = fused_step_raw(x, m, other.rows[i], math.inf, 5, i, 0, torch.empty_like(x))
        assert torch.equal(out, ref)
    assert len(kernels._TABLES) == before
    expected = schedule.coefficients("eps", "ddim", "fixed_small", 0.5).astype(np.float32)
    assert np.array_equal(other.table32, expected)
    del schedule, first, other
    gc.collect()  # a dead schedule's tables go with it (its id may be reused by a new object)
    assert len(kernels._TABLES) == before - 2


def test_pure_torch_fallback_has_history(monkeypatch, rng):
    monkeypatch.setattr(extension, "cpu_extension", lambda: None)
    monkeypatch.setattr(extension, "_warned", {"fused_step:cpu"})
    shape = (3, 5, 7)
    x, m, h = _tensors(rng, shape)
    row = _row(rng)
    ref, x0_ref, _ = _reference(x, m, h, row, 1.0, 8, 12, 2)
    hk = h.clone()
    out = fused_step_raw(x, m, row, 1.0, 8, 12, 2, torch.empty_like(x), history=hk)
    assert torch.equal(out, ref) and torch.equal(hk, x0_ref)  # same torch ops in the same order
    with pytest.raises(InvalidArgumentError, match=r"history must not overlap"):
        fused_step_raw(x, m, row, 1.0, 8, 12, 2, torch.empty_like(x), history=x)
    with pytest.raises(InvalidArgumentError, match=r"needs a history buffer"):
        fused_step_raw(x, m, row, 1.0, 8, 12, 2, torch.empty_like(x))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 5, 7, 11)])  # float4 path / scalar path
def test_cuda_history_equals_reference(shape, rng):
    seed = int(rng.integers(0, 2**63))
    x, m, h = _tensors(rng, shape)
    row = _row(rng)
    ref, x0_ref, z = _reference(x, m, h, row, 1.0, seed, 17, 3)
    xg, mg, hg = x.cuda(), m.cuda(), h.cuda()
    out = fused_step_raw(xg, mg, row, 1.0, seed, 17, 3, xg, history=hg)
    _assert_close(out.cpu(), hg.cpu(), ref, x0_ref, x, m, h, z, row)
    nan_h = torch.full(shape, float("nan"), device="cuda")
    zero_c = (*row[:2], 0.0, *row[3:])
    a = fused_step_raw(mg, mg, zero_c, 1.0, seed, 17, 3, torch.empty_like(mg), history=nan_h)
    b = fused_step_raw(mg, mg, zero_c, 1.0, seed, 17, 3, torch.empty_like(mg))
    assert torch.equal(a, b) and not bool(torch.isnan(nan_h).any())
