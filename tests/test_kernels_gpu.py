"""CUDA kernels vs the NumPy/CPU references (marker `gpu`: skipped, never faked, without a CUDA GPU).

Tolerances are those of the CPU tests, for the same reasons: the CUDA build runs the same philox.h / step_math.h
float32 code (nvcc may fuse multiply-adds differently from the host compiler, a rounding or two):
* normals: <= 8 ulp of the float64-evaluated reference;
* one step: <= 1e-6 of the magnitude scale |a x| + |b| (|p x| + |q m|) + |sigma z|;
* K steps through a CUDA graph: per-step rounding differences compound through |a| <= ~1, so <= K * 1e-6 of the
  largest scale met along the way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ddpm
import ddpm.noise as noise
from ddpm.kernels import DeviceStepTable, dynamic_thresholds, fused_step_raw

pytestmark = pytest.mark.gpu

ULP_TOL = 8
TOL = 1e-6
SCHEDULE = ddpm.Schedule.cosine(1000).respace(20)


def _ulp_error(z: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(z.astype(np.float64) - ref) / np.spacing(np.abs(ref.astype(np.float32)))))


def _seed(rng) -> int:
    return int(rng.integers(0, 2**63, dtype=np.int64)) * 2 + 1


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 5, 7, 11), (1, 13), (2, 1, 28, 28)])
def test_cuda_normals_match_reference(shape, rng):
    seed, step, offset = _seed(rng), int(rng.integers(0, 2**31)), int(rng.integers(0, 2**31))
    for stream in (0, 1):
        z = noise.normal(seed, shape, step=step, stream=stream, sample_offset=offset, device="cuda")
        assert z.is_cuda
        ref = noise.normal_reference(seed, shape, step=step, stream=stream, sample_offset=offset)
        assert _ulp_error(z.cpu().numpy(), ref.astype(np.float64)) <= ULP_TOL


def test_cuda_initial_noise_equals_cpu(rng):
    seed = _seed(rng)
    gpu = noise.initial_noise(seed, (5, 3, 16, 16), sample_offset=7, device="cuda").cpu()
    cpu = noise.initial_noise(seed, (5, 3, 16, 16), sample_offset=7)
    assert float((gpu - cpu).abs().max()) <= 2 * ULP_TOL * 2.0**-24 * float(cpu.abs().max())


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 5, 7, 11)])  # float4 path / scalar path
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("prediction, clip", [("eps", None), ("v", 1.0), ("x0", 1.0)])
def test_cuda_fused_step_equals_reference(shape, in_place, prediction, clip, rng):
    seed = _seed(rng)
    for i in (0, 7, len(SCHEDULE) - 1):
        x = torch.from_numpy((2 * rng.standard_normal(shape)).astype(np.float32))
        m = torch.from_numpy((2 * rng.standard_normal(shape)).astype(np.float32))
        z = torch.from_numpy(noise.normal_reference(seed, shape, step=i, sample_offset=3))
        ref = ddpm.step(SCHEDULE, i, x, m, z, prediction=prediction, clip=clip)
        xg, mg = x.cuda(), m.cuda()
        out = ddpm.fused_step(
            SCHEDULE,
            i,
            xg,
            mg,
            seed=seed,
            sample_offset=3,
            prediction=prediction,
            clip=clip,
            out=xg if in_place else None,
        )
        a, b, _c, p, q, sigma = ddpm.diffusion.step_coefficients(SCHEDULE, i, prediction=prediction)
        scale = (a * x).abs() + abs(b) * ((p * x).abs() + (q * m).abs()) + (sigma * z).abs() + 1e-30
        assert float(((out.cpu() - ref).abs() / scale).max()) <= TOL


def test_cuda_unaligned_buffers_take_the_scalar_path(rng):
    """x starting one float into its storage is not 16-byte aligned: the kernel must not use float4 there."""
    shape = (2, 3, 8, 8)
    n = int(np.prod(shape))
    buf = torch.from_numpy(rng.standard_normal(n + 1).astype(np.float32)).cuda()
    x = buf[1:].view(shape)
    m = torch.randn(shape, device="cuda")
    out = torch.empty(shape, device="cuda")
    coeffs = ddpm.diffusion.step_coefficients(SCHEDULE, 9)
    fused_step_raw(x, m, coeffs, float("inf"), 5, 9, 0, out)
    z = torch.from_numpy(noise.normal_reference(5, shape, step=9))
    ref = ddpm.step(SCHEDULE, 9, x.cpu(), m.cpu(), z)
    assert float((out.cpu() - ref).abs().max()) <= 1e-5


def test_device_step_table_in_a_captured_cuda_graph(rng):
    """One captured graph (a stand-in 'model' op + the device-counter step), replayed for every step, equals the
    step-by-step reference loop: the counter, not stale by-value arguments, picks each step's row and noise."""
    shape, seed, offset = (4, 3, 16, 16), _seed(rng), 2
    steps = len(SCHEDULE)
    x0 = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    table = DeviceStepTable.from_schedule(SCHEDULE, seed=seed, sample_offset=offset, clip=1.0, device="cuda")
    x = x0.cuda()
    m = torch.empty_like(x)

    def model(inp: torch.Tensor) -> torch.Tensor:  # any deterministic function of x
        return torch.tanh(0.7 * inp)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture, as torch recommends
        m.copy_(model(x))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        m.copy_(model(x))
        table.step(x, m, out=x)
    x.copy_(x0.cuda())
    table.set_counter(steps - 1)
    ref = x0.clone()
    max_scale = 0.0
    for i in reversed(range(steps)):
        graph.replay()
        mr = model(ref)
        z = torch.from_numpy(noise.normal_reference(seed, shape, step=i, sample_offset=offset))
        a, b, _c, p, q, sigma = ddpm.diffusion.step_coefficients(SCHEDULE, i)
        max_scale = max(
            max_scale,
            float(((a * ref).abs() + abs(b) * ((p * ref).abs() + (q * mr).abs()) + (sigma * z).abs()).max()),
        )
        ref = ddpm.step(SCHEDULE, i, ref, mr, z, clip=1.0)
    torch.cuda.synchronize()
    assert int(table.counter.item()) == -1
    assert float((x.cpu() - ref).abs().max()) <= steps * TOL * max_scale
    # One replay too many: the counter is outside the table, and the kernel writes NaN rather than read past it.
    graph.replay()
    assert bool(torch.isnan(x).all())


# ---------------------------------------------------------------- optional operands (docs/design.md, "Operands of the step")
# Same tolerance as tests/test_kernel_operands.py: 1e-6 of the term scale, where the guided output contributes
# |u| + |S| (|m| + |u|) and the learned sigma_e z term carries the factor (1 + |lv0| + |lv1 v|) (the exponent's
# absolute rounding). z is the CUDA kernel's own (ddpm.noise.normal on the device), so both sides draw the same.


def _operand_scale(row, x, m, u, guidance, v, z, h=None):
    a, b, c, p, q, sigma = row[:6]
    mg = m.abs() if u is None else u.abs() + abs(guidance) * (m.abs() + u.abs())
    scale = (a * x).abs() + abs(b) * ((p * x).abs() + abs(q) * mg)
    if h is not None:
        scale = scale + (c * h).abs()
    if sigma != 0.0:
        if len(row) == 8:
            scale = scale + (torch.exp(row[6] + row[7] * v) * z).abs() * (
                1 + abs(row[6]) + (row[7] * v).abs()
            )
        else:
            scale = scale + (sigma * z).abs()
    return scale.double() + 1e-30


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 5, 7, 11)])  # float4 path / scalar path
@pytest.mark.parametrize("clip", [None, 1.0, ddpm.diffusion.DynamicThreshold(0.95, 3.0)], ids=str)
@pytest.mark.parametrize("guidance", [None, 1.0, 3.5])
def test_cuda_learned_guided_thresholded_step_equals_reference(shape, clip, guidance, rng):
    """m, v (and uncond) as strided views of [N, 2C, ...] model outputs on the device; the fused CUDA step equals
    ddpm.step (plain torch on the same device) fed u + S (m - u)."""
    n, c = shape[0], shape[1]
    kw = dict(prediction="eps", sampler="ddpm", variance="learned_range")
    seed = _seed(rng)
    for i in (0, 7, len(SCHEDULE) - 1):
        x = torch.from_numpy((2 * rng.standard_normal(shape)).astype(np.float32)).cuda()
        net = torch.from_numpy(
            (2 * rng.standard_normal((2 * n, 2 * c, *shape[2:]))).astype(np.float32)
        ).cuda()
        net[:, c:] = net[:, c:].clamp(-1.2, 1.2)
        m, v, u = net[:n, :c], net[:n, c:], net[n:, :c]
        z = noise.normal(seed, shape, step=i, sample_offset=3, device="cuda")
        extra = {} if guidance is None else dict(uncond=u, guidance=guidance)
        mg = m if guidance is None else u + guidance * (m - u)
        ref = ddpm.step(SCHEDULE, i, x, mg.contiguous(), z, clip=clip, variance_output=v.contiguous(), **kw)
        got = ddpm.fused_step(
            SCHEDULE, i, x, m, seed=seed, sample_offset=3, clip=clip, variance_output=v, **kw, **extra
        )
        row = ddpm.diffusion.step_coefficients(SCHEDULE, i, **kw)
        scale = _operand_scale(row, x, m, extra.get("uncond"), guidance or 1.0, v, z)
        assert float(((got - ref).double().abs() / scale).max()) <= TOL


@pytest.mark.parametrize("ratio", [0.995, 0.5, 1.0])
def test_cuda_dynamic_thresholds_equal_quantile(ratio, rng):
    dyn = ddpm.diffusion.DynamicThreshold(ratio, 4.0)
    for shape in [(8, 3, 32, 32), (3, 5, 7, 11)]:
        x, m = (
            torch.from_numpy((2 * rng.standard_normal(shape)).astype(np.float32)).cuda() for _ in range(2)
        )
        got = dynamic_thresholds(x, m, 0.8, -1.1, dyn)
        want = dyn.thresholds(0.8 * x + -1.1 * m)
        assert got.is_cuda and float(((got - want).abs() / want).max()) <= TOL


def test_device_step_table_with_operands_in_a_captured_cuda_graph(rng):
    """An 8-wide table, variance, uncond and guidance, and a DynamicThreshold whose thresholds are computed inside
    the captured graph from the device counter's row: replaying one graph equals the reference loop."""
    shape, seed, offset = (4, 3, 16, 16), _seed(rng), 2
    n, c = shape[0], shape[1]
    steps = len(SCHEDULE)
    kw = dict(prediction="v", sampler="ddpm", variance="learned_range")
    dyn = ddpm.diffusion.DynamicThreshold(0.97, 3.0)
    x0 = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    table = DeviceStepTable.from_schedule(
        SCHEDULE, seed=seed, sample_offset=offset, clip=dyn, device="cuda", **kw
    )
    x = x0.cuda()
    net = torch.empty((2 * n, 2 * c, *shape[2:]), device="cuda")

    def model(
        inp: torch.Tensor,
    ) -> torch.Tensor:  # a deterministic stand-in: [2N, 2C, ...], variance in (-1, 1)
        both = torch.cat([torch.tanh(0.7 * inp), torch.tanh(0.3 * inp - 0.1)])
        return torch.cat([both, torch.tanh(both)], dim=1)

    m, v, u = net[:n, :c], net[:n, c:], net[n:, :c]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        net.copy_(model(x))
        table.set_counter(steps - 1)
        table.step(
            x.clone(), m, torch.empty_like(x), variance=v, uncond=u, guidance=2.0
        )  # warm-up, not captured
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        net.copy_(model(x))
        table.step(x, m, x, variance=v, uncond=u, guidance=2.0)
    x.copy_(x0.cuda())
    table.set_counter(steps - 1)
    ref = x0.cuda()
    max_scale = 0.0
    for i in reversed(range(steps)):
        graph.replay()
        out = model(ref)
        mr, vr, ur = out[:n, :c], out[:n, c:], out[n:, :c]
        z = noise.normal(seed, shape, step=i, sample_offset=offset, device="cuda")
        row = ddpm.diffusion.step_coefficients(SCHEDULE, i, **kw)
        max_scale = max(max_scale, float(_operand_scale(row, ref, mr, ur, 2.0, vr, z).max()))
        mg = (ur + 2.0 * (mr - ur)).contiguous()
        ref = ddpm.step(SCHEDULE, i, ref, mg, z, clip=dyn, variance_output=vr.contiguous(), **kw)
    torch.cuda.synchronize()
    assert int(table.counter.item()) == -1
    assert float((x - ref).abs().max()) <= steps * TOL * max_scale
