"""Precision parsing, CPU bf16 detection, torch autocast against fp32, the refusals of open_backend's precision
checks (TensorRT sidecar mismatch, an fp32 ONNX file asked for fp16 on CUDA) and the bench's runtime x precision
comparison on a tiny model.

torch bf16 autocast tolerance: 0.05 relative (norm). Autocast rounds conv / linear inputs and weights to bf16
(unit roundoff 2^-9) and keeps norms and softmax in fp32; measured 0.7% (MLP) and 1.2% (UNet) on the tiny
random models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _runtime_models import shared_artifacts

from ddpm.bench.run import BenchConfig, variants
from ddpm.cli import main
from ddpm.errors import InvalidArgumentError
from ddpm.precision import Precision, artifact_precision, cpu_has_bf16, parse_precision, require_cpu_bf16
from ddpm.runtime.backends import _check_file_precision, open_backend
from ddpm.runtime.sampling import sample

needs_bf16 = pytest.mark.skipif(
    not cpu_has_bf16(), reason="this CPU has no native bf16 (avx512_bf16/amx_bf16)"
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def test_parse_and_artifact_precision():
    assert parse_precision("BF16") is Precision.BF16 and parse_precision(None) is None
    assert not Precision.FP32.reduced and Precision.FP16.reduced and str(Precision.BF16) == "bf16"
    with pytest.raises(InvalidArgumentError, match="unknown precision 'fp8'; allowed: fp32, bf16, fp16"):
        parse_precision("fp8")
    assert artifact_precision({}) is Precision.FP32
    assert artifact_precision({"precision": "tf32"}) is Precision.FP32  # fp32 storage: an fp32 run
    assert artifact_precision({"precision": "fp16"}) is Precision.FP16


def test_cpu_bf16_detection():
    assert cpu_has_bf16(frozenset({"avx512f", "avx512_bf16"})) is True
    assert cpu_has_bf16(frozenset({"amx_tile", "amx_bf16"})) is True
    assert cpu_has_bf16(frozenset({"avx2", "avx512f"})) is False


def test_require_cpu_bf16_asks_the_runtime_only_without_flags(monkeypatch):
    import ddpm.precision

    monkeypatch.setattr(ddpm.precision, "cpu_flags", lambda: None)  # not Linux: no /proc/cpuinfo
    require_cpu_bf16("openvino", runtime_says=True)
    with pytest.raises(InvalidArgumentError, match="needs native bf16"):
        require_cpu_bf16("torch autocast")


@needs_bf16
@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_torch_bf16_autocast_close_to_fp32(artifacts, kind):
    ckpt, _ = artifacts[kind]
    with open_backend(ckpt, device="cpu") as fp32, open_backend(ckpt, device="cpu", precision="bf16") as bf16:
        assert bf16.precision is Precision.BF16 and "bf16 autocast" in bf16.description
        x, t = torch.randn(3, *fp32.sample_shape), torch.randint(0, 1000, (3,))
        want = fp32(x, t).clone()
        got = bf16(x, t)
        # the step kernel reads float32, contiguous NCHW: the backend hands back exactly that
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert float((got - want).norm() / want.norm()) < 0.05


def test_file_precision_refusals():
    onnx, trt = Path("unet.onnx"), Path("unet.trt")
    _check_file_precision(onnx, "onnxruntime", Precision.FP32, None)  # the file's own: always fine
    _check_file_precision(trt, "tensorrt", Precision.FP16, Precision.FP16)
    with pytest.raises(InvalidArgumentError, match="needs an fp16 export: `ddpm export --fp16`"):
        _check_file_precision(onnx, "onnxruntime", Precision.FP32, Precision.FP16)
    with pytest.raises(InvalidArgumentError, match="is a fp16 TensorRT engine .* not bf16; rebuild it"):
        _check_file_precision(trt, "tensorrt", Precision.FP16, Precision.BF16)
    with pytest.raises(InvalidArgumentError, match="give the fp32 ONNX file"):
        _check_file_precision(onnx, "onnxruntime", Precision.FP16, Precision.FP32)


def test_open_backend_that_precision_says_what_it_runs(artifacts):
    ckpt, onnx = artifacts["unet"]
    with open_backend(onnx, device="cpu") as ort, open_backend(ckpt, device="cpu") as torch_backend:
        assert ort.precision is Precision.FP32 and torch_backend.precision is Precision.FP32


def test_bench_variants(artifacts, monkeypatch):
    import ddpm.precision

    ckpt, onnx = artifacts["unet"]
    cpu = torch.device("cpu")
    cfg = BenchConfig(engines=[onnx])
    monkeypatch.setattr(ddpm.precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert [(r, str(p)) for r, p in variants(cfg, onnx, cpu, print)] == [
        ("onnxruntime", "fp32"),
        ("openvino", "fp32"),
        ("openvino", "bf16"),
    ]
    assert [(r, str(p)) for r, p in variants(cfg, ckpt, cpu, print)] == [("torch", "fp32"), ("torch", "bf16")]
    monkeypatch.setattr(ddpm.precision, "cpu_flags", lambda: frozenset({"avx2"}))
    assert [str(p) for _, p in variants(cfg, onnx, cpu, print)] == ["fp32", "fp32"]  # no bf16 row offered
    only = BenchConfig(engines=[onnx], runtimes=["openvino"], precisions=["fp32"])
    assert [(r, str(p)) for r, p in variants(only, onnx, cpu, print)] == [("openvino", "fp32")]


@needs_bf16
def test_bench_compares_runtimes_and_precisions(artifacts, tmp_path, capsys):
    ckpt, onnx = artifacts["unet"]
    js = tmp_path / "b.json"
    rc = main(
        ["bench", "--engine", str(onnx), "--ckpt", str(ckpt), "--batch", "2", "--steps", "6", "--device", "cpu",
         "--repeats", "3", "--loop-budget", "1", "--json", str(js)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "(fastest)" in out
    (res,) = json.loads(js.read_text())["results"]
    pairs = {(r["runtime"], r["precision"]) for r in res["rows"] if r["stage"] == "loop"}
    assert pairs == {
        ("eager torch", "fp32"),
        ("onnxruntime", "fp32"),
        ("openvino", "fp32"),
        ("openvino", "bf16"),
        ("eager torch", "bf16"),
    }
    eager = {r["stage"]: r["median_s"] for r in res["rows"] if r.get("baseline")}
    for stage in ("forward", "loop"):
        rows = [r for r in res["rows"] if r["stage"] == stage]
        assert sum(bool(r.get("fastest")) for r in rows) == 1
        assert min(rows, key=lambda r: r["median_s"]).get("fastest")
        for r in rows:
            assert r["speedup"] == pytest.approx(eager[stage] / r["median_s"], rel=1e-9)


def test_open_backend_keeps_its_precision(artifacts):
    """sample() on an already opened backend cannot change its precision: asked for another, it refuses."""
    _, onnx = artifacts["mlp"]
    with open_backend(onnx, device="cpu") as backend:
        assert sample(backend, 2, steps=3, precision="fp32").shape == (2, 2)
        with pytest.raises(InvalidArgumentError, match="precision 'bf16' asked of an open fp32 backend"):
            sample(backend, 2, steps=3, precision="bf16")


def test_bench_refuses_an_asked_pair_it_cannot_run(artifacts, capsys):
    _, onnx = artifacts["mlp"]
    args = [
        "bench",
        "--engine",
        str(onnx),
        "--device",
        "cpu",
        "--runtime",
        "onnxruntime",
        "--precision",
        "bf16",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "onnxruntime's CPU provider has no bf16 path" in err and "Traceback" not in err


def test_openvino_missing_is_one_line_with_the_hint(artifacts, monkeypatch, capsys):
    monkeypatch.setitem(
        sys.modules, "openvino", None
    )  # what `import openvino` meets where it is not installed
    _, onnx = artifacts["mlp"]
    assert main(["run", "--engine", str(onnx), "--runtime", "openvino", "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the openvino runtime needs the openvino package" in err and "pip install openvino" in err
    assert len(err.splitlines()) == 1
