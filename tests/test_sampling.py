"""The reverse loop: reproducibility (bitwise), batch-size invariance, fused vs reference kernel, torch vs
onnxruntime after 1000 steps, original timesteps fed to the model, NaN/Inf detection, argument checks.

Tiny random-weight models (tests/_runtime_models.py). Random eps-networks drive x far from the data range, so
the long runs clip x0_hat to [-1, 1] (improved-diffusion's default for images) to keep the numbers meaningful.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _runtime_models import shared_artifacts

from ddpm.errors import InvalidArgumentError, SamplingError
from ddpm.options import SamplingOptions
from ddpm.runtime.backends import open_backend
from ddpm.runtime.sampling import CHECK_EVERY, SamplingPlan, sample, sample_batch, sample_run
from ddpm.schedule import Schedule

# Fused kernel vs the torch reference step, same float32 coefficients and the same Philox noise: the kernel may
# contract a*x + b*x0_hat into FMAs and evaluates its own float32 Box-Muller where torch rounds each product and
# reads the reference generator's noise, a few ulps per step that the network carries forward. Measured worst
# max|fused - ref| / max(|ref|, 1) over 1000 steps (3 fresh models each, DDPM small/large variance, DDIM eta 0.5,
# with and without clipping): 1.9e-6 (MLP), 4.7e-6 (UNet); DDIM eta = 0 (no noise): 2.7e-7. 5e-5 is ~10x that,
# still far below what a wrong coefficient or a noise mix-up (O(1e-2) or more) produces.
FUSED_VS_REF_RTOL = 5e-5
# torch (oneDNN) vs onnxruntime (MLAS): ~1e-6 relative per network call (tests/test_backends.py), carried through
# 1000 steps. Measured worst relative L2 difference of the final samples (3 fresh models, with and without
# clipping): 2.6e-7 (MLP and UNet). 1e-5 leaves ~40x room for other CPUs' SIMD paths.
TORCH_VS_ORT_RTOL = 1e-5


def _rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the larger of max |b| and 1 (the data scale)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


# Tiny models: one thread each is fastest and keeps the timings sane on a busy 2-core machine.
CPU = {"device": "cpu", "threads": 1}


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- reproducibility ----


@pytest.mark.parametrize("which", [0, 1], ids=["torch", "onnxruntime"])
def test_same_seed_is_bitwise_identical(art, which):
    engine = art["mlp"][which]
    a = sample(engine, 16, batch=16, seed=7, **CPU)
    b = sample(engine, 16, batch=16, seed=7, **CPU)
    assert a.shape == (16, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    c = sample(engine, 16, batch=16, seed=8, **CPU)
    assert (a - c).abs().min() > 0  # a different seed changes every sample


@pytest.mark.parametrize("kind, steps", [("mlp", 1000), ("unet", 50)])
def test_sample_k_identical_for_any_batch_size(art, kind, steps):
    """Noise is keyed by the global sample index: batch 1, 3 (ragged last batch) and 8 give the same samples.
    Bitwise on onnxruntime's CPU provider, whose kernels compute each sample independently of its batch."""
    engine = art[kind][1]
    ref = sample(engine, 8, batch=8, steps=steps, seed=3, **CPU, clip=1.0)
    for batch in (1, 3):
        got = sample(engine, 8, batch=batch, steps=steps, seed=3, **CPU, clip=1.0)
        assert torch.equal(got, ref), (batch, float((got - ref).abs().max()))


def test_torch_backend_batch_size_changes_only_the_gemm_rounding(art):
    """PyTorch's CPU GEMMs block by batch size, so eager torch is batch-invariant only to rounding (which is why
    the bitwise guarantee is stated for onnxruntime); the noise itself is the same, so the drift stays tiny."""
    engine = art["mlp"][0]
    ref = sample(engine, 8, batch=8, steps=300, seed=3, **CPU, clip=1.0)
    got = sample(engine, 8, batch=1, steps=300, seed=3, **CPU, clip=1.0)
    assert _rel(got, ref) < TORCH_VS_ORT_RTOL


def test_batches_cover_global_sample_indices(art):
    """sample_batch at offset k reproduces rows k.. of a run: the batch is only a grouping."""
    with open_backend(art["mlp"][1], **CPU) as backend:
        plan = SamplingPlan.for_artifact(backend.meta, SamplingOptions(steps=100, seed=11))
        full = sample_run(backend, 10, SamplingOptions(steps=100, seed=11, batch=10)).samples
        part = sample_batch(backend, plan, 4, sample_offset=5)
        assert torch.equal(part, full[5:9])


# ---- fused kernel vs reference step; torch vs onnxruntime ----


@pytest.mark.parametrize(
    "kind, which, options",
    [
        ("mlp", 1, {}),
        ("mlp", 1, {"clip": None}),
        ("mlp", 1, {"variance": "fixed_large"}),
        ("mlp", 1, {"sampler": "ddim", "eta": 0.5, "steps": 200}),
        ("mlp", 0, {"steps": 300}),  # the torch backend: its outputs are inference-mode tensors
        ("unet", 1, {}),
    ],
)
def test_fused_matches_reference_over_full_run(art, kind, which, options):
    engine = art[kind][which]
    kw = {"seed": 5, "clip": 1.0, **CPU, **options}
    fused = sample(engine, 4, batch=4, kernel="fused", **kw)
    ref = sample(engine, 4, batch=4, kernel="reference", **kw)
    assert torch.isfinite(fused).all()
    assert _rel_max(fused, ref) <= FUSED_VS_REF_RTOL, (kind, options, _rel_max(fused, ref))


# The UNet runs 300 steps to keep the file fast (eager torch pays ~1 ms per call); the trained model of
# tests/test_run_quality.py repeats the comparison over 1000 steps.
@pytest.mark.parametrize("kind, steps", [("mlp", 1000), ("unet", 300)])
def test_torch_and_onnxruntime_agree(art, kind, steps):
    ckpt, onnx_path = art[kind]
    n = 8 if kind == "mlp" else 2
    a = sample(ckpt, n, batch=n, steps=steps, seed=2, **CPU, clip=1.0)
    b = sample(onnx_path, n, batch=n, steps=steps, seed=2, **CPU, clip=1.0)
    assert _rel(b, a) < TORCH_VS_ORT_RTOL, (kind, _rel(b, a))


def test_sampler_options_change_the_result(art):
    engine = art["mlp"][1]
    base = sample(engine, 8, steps=50, seed=1, **CPU)
    for kw in ({"sampler": "ddim"}, {"variance": "fixed_large"}, {"clip": 0.5}, {"steps": 49}):
        other = sample(engine, 8, seed=1, **CPU, **{"steps": 50, **kw})
        assert not torch.equal(other, base), kw


def test_ddim_eta_zero_draws_no_step_noise(art):
    """DDIM with eta = 0 has sigma = 0 at every step: the kernel's per-step noise must not leak in, so fused and
    reference agree, and the result depends on the seed only through x_T."""
    engine = art["mlp"][1]
    a = sample(engine, 8, sampler="ddim", eta=0.0, steps=20, seed=4, **CPU)
    b = sample(engine, 8, sampler="ddim", eta=0.0, steps=20, seed=4, **CPU, kernel="reference")
    assert _rel_max(a, b) <= FUSED_VS_REF_RTOL


# ---- the loop feeds the model the ORIGINAL timesteps ----


class _Recorder:
    """Wraps a real backend and records the timesteps it is asked for."""

    def __init__(self, inner, nan_at: int | None = None, value: float = math.nan, only_n: int | None = None):
        self.inner, self.nan_at, self.value, self.only_n, self.seen = inner, nan_at, value, only_n, []
        self.name, self.device, self.meta, self.description = inner.name, inner.device, inner.meta, "recorder"
        self.stream, self.capturable = None, False

    def __call__(self, x, t):
        self.seen.append(t.clone())
        m = self.inner(x, t)
        if self.nan_at is not None and int(t[0]) == self.nan_at and self.only_n in (None, len(t)):
            m = m.clone()
            m[-1, 0] = self.value
        return m


def test_respaced_run_feeds_original_timesteps(art):
    with open_backend(art["mlp"][1], **CPU) as backend:
        rec = _Recorder(backend)
        sample(rec, 3, steps=10, batch=3, **CPU)
    want = Schedule.linear(1000).respace(10).timesteps[::-1]
    assert [int(t[0]) for t in rec.seen] == want.tolist()
    assert want[0] == 999 and want[-1] == 0
    assert all(t.dtype == torch.int64 and t.shape == (3,) and (t == t[0]).all() for t in rec.seen)


# ---- NaN / Inf ----


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_values_stop_the_run_and_name_the_step(art, value):
    steps = 250  # checks after steps 150, 50 and 0 (every CHECK_EVERY = 100 steps, and at the end)
    assert CHECK_EVERY == 100
    sched = Schedule.linear(1000).respace(steps)
    bad_i = 180
    with open_backend(art["mlp"][1], **CPU) as backend:
        # only the second batch (samples 4..5, the ragged one) goes bad
        rec = _Recorder(backend, nan_at=int(sched.timesteps[bad_i]), value=value, only_n=2)
        t150 = int(sched.timesteps[150])
        match = rf"NaN/Inf between steps 249 and 150 \(detected after step 150, timestep {t150}, of 250\) in samples 4\.\.5"
        with pytest.raises(SamplingError, match=match):
            sample(rec, 6, steps=steps, batch=4, **CPU)
        assert len(rec.seen) == steps + 100  # batch 0 ran in full; batch 1 stopped at its first check


def test_non_finite_in_the_last_step_is_caught_at_the_end(art):
    with open_backend(art["mlp"][1], **CPU) as backend:
        rec = _Recorder(backend, nan_at=0)
        with pytest.raises(
            SamplingError, match=r"between steps 49 and 0 \(detected after step 0, timestep 0"
        ):
            sample(rec, 2, steps=150, batch=2, **CPU)


# ---- arguments ----


@pytest.fixture(scope="module")
def meta(art):
    from ddpm.artifacts import read_metadata

    return read_metadata(art["mlp"][1])


@pytest.mark.parametrize(
    "kw, match",
    [
        # options refuse 0 before any model is known; the model's T bounds it when the plan is made (1001)
        (
            {"steps": 0},
            r"steps must be an integer >= 1 \(and at most the model's T, <= 100000\), got 0",
        ),
        ({"steps": 1001}, r"steps must be an integer in 1\.\.1000, got 1001"),
        ({"eta": -1}, r"eta must be a finite number >= 0, got -1"),
        ({"eta": float("nan")}, "eta must be a finite number"),
        ({"sampler": "euler"}, "unknown sampler 'euler'; allowed: ddpm, ddim"),
        ({"variance": "learned"}, "unknown variance 'learned'"),
        ({"clip": 0}, "clip must be a positive number"),
        ({"kernel": "cuda"}, "unknown kernel 'cuda'; allowed: fused, reference"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\^64\), got -1"),
        ({"seed": 2**64}, r"seed must be an integer in \[0, 2\^64\)"),
    ],
)
def test_plan_rejects_bad_arguments(meta, kw, match):
    with pytest.raises(InvalidArgumentError, match=match):
        SamplingPlan.for_artifact(meta, SamplingOptions(**kw))


@pytest.mark.parametrize(
    "kw, match", [({"batch": 0}, "batch must be"), ({"num_samples": 0}, "num_samples must be")]
)
def test_sample_rejects_bad_counts(art, kw, match):
    args = {"num_samples": 4, "batch": 2, **kw}
    with pytest.raises(InvalidArgumentError, match=match):
        sample(art["mlp"][1], args.pop("num_samples"), **CPU, **args)


def test_cuda_graph_needs_a_gpu(art):
    with open_backend(art["mlp"][0], **CPU) as backend:
        with pytest.raises(InvalidArgumentError, match="--cuda-graph needs a CUDA device"):
            sample_run(backend, 2, SamplingOptions(steps=10, batch=2, cuda_graph=True))


def test_an_open_backend_stays_open(art):
    with open_backend(art["mlp"][1], **CPU) as backend:
        a = sample(backend, 2, steps=5, **CPU)
        b = sample(backend, 2, steps=5, **CPU)  # still usable: sample() did not close it
        assert torch.equal(a, b) and backend.session is not None


def test_plan_table_is_the_schedule_table(meta):
    plan = SamplingPlan.for_artifact(meta, SamplingOptions(steps=20, sampler="ddim", eta=0.3))
    want = Schedule.linear(1000).respace(20).coefficients("eps", "ddim", "fixed_small", 0.3)
    np.testing.assert_array_equal(plan.table, want)
    assert plan.rows32[3] == tuple(float(v) for v in want[3].astype(np.float32))
