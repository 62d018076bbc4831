"""Backends: device resolution, the torch and onnxruntime backends against each other, clear errors.

The models are tiny (an MLP on 2-D points, an 8x8 UNet) with random weights: every check here must hold for any
weights. The ONNX files come from the project's exporter (``ddpm.export``), as users get them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _runtime_models import shared_artifacts

from ddpm.errors import ArtifactError, InvalidArgumentError, MissingDependencyError
from ddpm.runtime.backends import default_cpu_threads, open_backend, resolve_device
from ddpm.runtime.backends.onnx_backend import OnnxRuntimeBackend
from ddpm.runtime.backends.tensorrt_backend import TensorRTBackend, import_tensorrt
from ddpm.runtime.backends.torch_backend import TorchBackend

# torch (oneDNN/MKL) and onnxruntime (MLAS) sum the same products in different orders; the measured worst relative
# error (L2 over the batch, 5 fresh models x batch 1/5/64) was 4e-7 (MLP) and 1.2e-6 (UNet): 1e-5 leaves room for
# other CPUs' SIMD widths, while a wrong graph (a missing bias, a mis-fed timestep) is off by > 1e-2.
CALL_RTOL = 1e-5


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- device resolution ----


def test_resolve_device_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA"])
def test_resolve_device_cuda_without_gpu(spec):
    with pytest.raises(InvalidArgumentError, match=r"torch sees no CUDA GPU.*--device cpu"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["tpu", "npu", "", "cuda0"])
def test_resolve_device_unknown(spec):
    with pytest.raises(InvalidArgumentError, match="allowed: auto, cpu, cuda"):
        resolve_device(spec)


def test_default_cpu_threads_is_the_affinity_mask():
    import os

    assert default_cpu_threads() == len(os.sched_getaffinity(0))


# ---- torch vs onnxruntime on the same weights ----


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_onnxruntime_matches_torch(art, kind, rng):
    ckpt, onnx_path = art[kind]
    with open_backend(ckpt, device="cpu") as tb, open_backend(onnx_path, device="cpu") as ob:
        assert isinstance(tb, TorchBackend) and isinstance(ob, OnnxRuntimeBackend)
        assert tb.meta["sample_shape"] == ob.meta["sample_shape"]
        for n in (1, 5):
            x = torch.from_numpy(rng.standard_normal((n, *tb.sample_shape), dtype=np.float32))
            t = torch.from_numpy(rng.integers(0, 1000, size=n).astype(np.int64))
            want = tb(x, t).clone()
            got = ob(x, t).clone()
            assert got.shape == x.shape and got.dtype == torch.float32
            assert _rel(got, want) < CALL_RTOL, (kind, n, _rel(got, want))
            # the timestep reaches the graph: a different t changes the output
            other = ob(x, (t + 500) % 1000).clone()
            assert _rel(other, want) > 1e-3


def test_onnxruntime_session_is_cpu_only_and_threaded(art):
    with open_backend(art["mlp"][1], device="cpu", threads=1) as ob:
        assert ob.session.get_providers() == ["CPUExecutionProvider"]
        assert ob.name == "onnxruntime" and ob.device == torch.device("cpu")
        assert "1 intra-op threads" in ob.description and ob.stream is None and not ob.capturable
        assert ob.t_dtype == torch.int64  # the exporter keeps int64 timesteps


def test_onnxruntime_output_buffer_is_reused_between_calls(art, rng):
    """The documented contract: a backend may hand back its own buffer, valid until the next call."""
    with open_backend(art["mlp"][1], device="cpu") as ob:
        x = torch.from_numpy(rng.standard_normal((3, 2), dtype=np.float32))
        t = torch.tensor([1, 2, 3])
        a = ob(x, t)
        a_copy = a.clone()
        b = ob(x, t + 100)
        assert a.data_ptr() == b.data_ptr() and not torch.equal(a_copy, b)


def test_backend_call_checks_inputs(art):
    with open_backend(art["unet"][1], device="cpu") as ob:
        with pytest.raises(InvalidArgumentError, match=r"x must have shape \[N, 1, 8, 8\]"):
            ob(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
        with pytest.raises(InvalidArgumentError, match="x must be float32"):
            ob(torch.zeros(2, 1, 8, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
        with pytest.raises(InvalidArgumentError, match=r"t must be int64 of shape \[2\]"):
            ob(torch.zeros(2, 1, 8, 8), torch.zeros(3, dtype=torch.int64))


# ---- bad artifacts ----


def test_missing_engine(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        open_backend(tmp_path / "unet.onnx", device="cpu")


def test_unknown_extension(tmp_path):
    p = tmp_path / "model.txt"
    p.write_text("hello")
    with pytest.raises(InvalidArgumentError, match="unknown extension '.txt'"):
        open_backend(p, device="cpu")


def test_garbage_onnx(tmp_path):
    p = tmp_path / "unet.onnx"
    p.write_bytes(b"\x00\x01not a protobuf" * 50)
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        open_backend(p, device="cpu")


def test_compile_is_for_checkpoints_only(art):
    with pytest.raises(InvalidArgumentError, match="--compile applies to the torch backend"):
        open_backend(art["mlp"][1], device="cpu", compile=True)


@pytest.mark.parametrize("threads", [0, -2, 1.5])
def test_bad_thread_count(art, threads):
    with pytest.raises(InvalidArgumentError, match="threads must be an integer >= 1"):
        open_backend(art["mlp"][1], device="cpu", threads=threads)


# ---- tensorrt: everything around the engine that can be checked without TensorRT ----


def _fake_engine(tmp_path, art, **overrides):
    """An engine file plus a sidecar with valid ddpm metadata (as `ddpm export` writes for a real engine)."""
    from ddpm.artifacts import read_metadata, sidecar_path

    meta = read_metadata(art["unet"][1])
    engine = tmp_path / "unet.trt"
    engine.write_bytes(b"not really an engine")
    side = {
        **meta,
        "tensorrt_version": "10.9.0",
        "gpu_name": "NVIDIA H100",
        "compute_capability": "9.0",
        "precision": "fp32",
        "profile": {"min": 1, "opt": 8, "max": 64},
        **overrides,
    }
    sidecar_path(engine).write_text(json.dumps(side))
    return engine


def test_tensorrt_engine_without_sidecar(tmp_path):
    engine = tmp_path / "unet.trt"
    engine.write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"sidecar unet\.trt\.json is missing"):
        TensorRTBackend(engine, torch.device("cpu"))


def test_tensorrt_engine_on_cpu_is_refused(tmp_path, art):
    engine = _fake_engine(tmp_path, art)
    with pytest.raises(InvalidArgumentError, match="runs only on a CUDA GPU.*use the ONNX file"):
        open_backend(engine, device="cpu")


def test_tensorrt_sidecar_with_inconsistent_metadata(tmp_path, art):
    engine = _fake_engine(tmp_path, art, sample_shape=[3, 8, 8])
    with pytest.raises(ArtifactError, match="sample_shape"):
        open_backend(engine, device="cpu")


def test_tensorrt_missing_package_has_install_hint():
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(
        MissingDependencyError,
        match=r'needs the tensorrt package.*pip install "tensorrt>=10" \(or, in this source checkout .*: pip install -e "\.\[trt\]"\)',
    ):
        import_tensorrt()
