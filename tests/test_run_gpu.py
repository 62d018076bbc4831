"""GPU paths of ``ddpm run``: onnxruntime's CUDA EP (IO binding, its CUDA graph), the torch backend with
``--cuda-graph`` (one captured step replayed), the fused CUDA kernel's noise, and TensorRT engines.

Marked ``gpu`` / ``trt``: skipped (never faked) where torch sees no GPU or tensorrt is missing. The tolerances
below are set from how the arithmetic differs, not measured on a GPU yet: cuDNN convolutions may run in TF32
(10-bit mantissa, ~5e-4 relative per layer) in torch and in onnxruntime (use_tf32 on by default), so GPU-vs-CPU
comparisons allow 1e-2 relative after a run; the same kernels replayed from a CUDA graph must match eager to
float32 rounding of a possibly different cuDNN algorithm choice (1e-4).
"""

from __future__ import annotations

import math

import pytest
import torch
from _runtime_models import shared_artifacts

from ddpm.errors import SamplingError
from ddpm.runtime.backends import open_backend
from ddpm.runtime.sampling import sample

GPU_VS_CPU_RTOL = 1e-2
GRAPH_VS_EAGER_RTOL = 1e-4


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_cuda_ep_matches_cpu_ep_per_call(art, kind):
    with open_backend(art[kind][1], device="cuda") as gb, open_backend(art[kind][1], device="cpu") as cb:
        assert gb.session.get_providers()[0] == "CUDAExecutionProvider" and gb.stream is not None
        x = torch.randn(5, *cb.sample_shape)
        t = torch.randint(0, 1000, (5,))
        want = cb(x, t).clone()
        with torch.cuda.stream(gb.stream):
            got = gb(x.cuda(), t.cuda()).cpu()
        assert _rel(got, want) < GPU_VS_CPU_RTOL


@pytest.mark.gpu
@pytest.mark.parametrize("which", [0, 1], ids=["torch", "onnxruntime"])
def test_gpu_run_is_reproducible_and_close_to_cpu(art, which):
    engine = art["unet"][which]
    a = sample(engine, 8, batch=8, steps=100, seed=3, device="cuda", clip=1.0)
    b = sample(engine, 8, batch=8, steps=100, seed=3, device="cuda", clip=1.0)
    assert torch.equal(a, b)
    c = sample(engine, 8, batch=8, steps=100, seed=3, device="cpu", clip=1.0)
    assert _rel(a, c) < GPU_VS_CPU_RTOL  # same Philox noise on both devices; only model rounding differs
    d = sample(engine, 8, batch=1, steps=100, seed=3, device="cuda", clip=1.0)
    assert _rel(d, a) < GPU_VS_CPU_RTOL  # sample k is sample k at any batch size


@pytest.mark.gpu
@pytest.mark.parametrize("which", [0, 1], ids=["torch", "onnxruntime"])
def test_cuda_graph_matches_eager(art, which):
    engine = art["unet"][which]
    eager = sample(engine, 6, batch=4, steps=1000, seed=1, device="cuda", clip=1.0)
    graph = sample(engine, 6, batch=4, steps=1000, seed=1, device="cuda", clip=1.0, cuda_graph=True)
    assert _rel(graph, eager) < GRAPH_VS_EAGER_RTOL


@pytest.mark.gpu
def test_fused_matches_reference_on_gpu(art):
    engine = art["unet"][1]
    fused = sample(engine, 4, steps=1000, seed=5, device="cuda", clip=1.0)
    ref = sample(engine, 4, steps=1000, seed=5, device="cuda", clip=1.0, kernel="reference")
    assert float((fused - ref).abs().max()) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_nan_on_gpu_is_reported_at_the_end_of_the_batch(art, cuda_graph):
    with open_backend(art["mlp"][0], device="cuda") as backend:
        inner = backend.model

        class Poisoned(torch.nn.Module):
            def forward(self, x, t):
                m = inner(x, t)
                return torch.where(t[:, None] == 500, torch.full_like(m, math.nan), m)

        backend._fn = Poisoned()
        with pytest.raises(SamplingError, match="detected after step 500, timestep 500"):
            sample(backend, 4, batch=4, device="cuda", cuda_graph=cuda_graph)


@pytest.mark.trt
def test_tensorrt_engine_samples_like_onnxruntime(art, tmp_path):
    from ddpm.export.pipeline import export

    engine = tmp_path / "unet.trt"
    export(art["unet"][0], engine, batch="1,4,8", precision="fp32")
    ort = sample(art["unet"][1], 6, batch=4, steps=200, seed=2, device="cuda", clip=1.0)
    trt = sample(engine, 6, batch=4, steps=200, seed=2, device="cuda", clip=1.0)
    assert _rel(trt, ort) < GPU_VS_CPU_RTOL
    graph = sample(engine, 6, batch=4, steps=200, seed=2, device="cuda", clip=1.0, cuda_graph=True)
    assert _rel(graph, trt) < GRAPH_VS_EAGER_RTOL
    with open_backend(engine, device="cuda") as backend:
        assert backend.name == "tensorrt" and (backend.min_batch, backend.max_batch) == (1, 8)
