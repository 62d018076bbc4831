"""The TensorRT export path: everything around the build is tested here (profile parsing, the sidecar, the
"tensorrt / GPU missing" lines); the real builds are marked ``trt`` and skipped without TensorRT and a GPU —
never faked."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from ddpm.artifacts import check_engine_compat, read_metadata, sidecar_path
from ddpm.cli import main
from ddpm.errors import InvalidArgumentError, MissingDependencyError
from ddpm.export.tensorrt_build import (
    BatchProfile,
    make_sidecar,
    parse_batches,
    parse_hardware_compat,
    parse_precision,
    parse_profile,
    require_tensorrt,
)
from ddpm.metadata import FORMAT
from ddpm.schedule import Schedule

HINT = 'install it on a machine with an NVIDIA GPU and driver: pip install "tensorrt>=10"'


@pytest.mark.parametrize(
    "text, expect",
    [("1,8,64", (1, 8, 64)), (" 2 , 2 , 2 ", (2, 2, 2)), ("16", (16, 16, 16)), ([1, 4, 4], (1, 4, 4))],
)
def test_parse_profile(text, expect):
    p = parse_profile(text)
    assert (p.min, p.opt, p.max) == expect and str(p) == ",".join(map(str, expect))


@pytest.mark.parametrize(
    "text, match",
    [
        ("0,1,2", "batch sizes must be in 1..65536, got 0"),
        ("-1,1,2", "got -1"),
        ("4,2,8", "needs MIN <= OPT <= MAX, got 4,2,8"),
        ("1,8,4", "needs MIN <= OPT <= MAX, got 1,8,4"),
        ("1,2.5,4", "comma-separated integers"),
        ("1,,4", "comma-separated integers"),
        ("a", "comma-separated integers"),
        ("1,2", "takes MIN,OPT,MAX (3 integers)"),
        ("1,2,3,4", "takes MIN,OPT,MAX (3 integers)"),
        ("1,1,100000", "batch sizes must be in 1..65536"),
    ],
)
def test_parse_profile_rejects(text, match):
    with pytest.raises(
        InvalidArgumentError, match=match.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    ):
        parse_profile(text)


def test_profile_parity_batches():
    assert BatchProfile(1, 64, 256).parity_batches() == (1, 7, 64, 256)
    assert BatchProfile(8, 16, 32).parity_batches() == (8, 16, 32)
    assert BatchProfile(4, 4, 4).as_dict() == {"min": 4, "opt": 4, "max": 4}


def test_parse_batches_precision_hardware():
    assert parse_batches("1,7,7,3") == (1, 7, 3)
    with pytest.raises(InvalidArgumentError, match="1 to 8 parity batch sizes"):
        parse_batches(",".join(["1"] * 9))
    assert parse_precision("FP16") == "fp16"
    with pytest.raises(
        InvalidArgumentError, match="unknown --precision 'int8'; allowed: fp32, tf32, fp16, bf16"
    ):
        parse_precision("int8")
    assert parse_hardware_compat(None) is None and parse_hardware_compat("none") is None
    assert parse_hardware_compat("Ampere+") == "ampere+"
    with pytest.raises(InvalidArgumentError, match="allowed: none, ampere"):
        parse_hardware_compat("hopper+")


def _fake_tensorrt(monkeypatch, version):
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version
    monkeypatch.setitem(sys.modules, "tensorrt", mod)


def test_require_tensorrt_names_what_is_missing(monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="needs tensorrt and an NVIDIA GPU; neither") as e:
        require_tensorrt()
    assert HINT in str(e.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(
        MissingDependencyError, match="needs tensorrt: the tensorrt package is not importable"
    ) as e:
        require_tensorrt()
    assert HINT in str(e.value)
    # tensorrt importable but no GPU (checked with a stand-in module: only the error path runs).
    _fake_tensorrt(monkeypatch, "10.9.0.34")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        MissingDependencyError, match=r"needs an NVIDIA GPU, and torch sees no CUDA device \(tensorrt 10\.9"
    ):
        require_tensorrt()
    _fake_tensorrt(monkeypatch, "8.6.1")
    with pytest.raises(MissingDependencyError, match=r"TensorRT 8\.6\.1 is too old"):
        require_tensorrt()


def _meta():
    return {
        "format": FORMAT,
        "model": {"arch": "unet", "in_channels": 1, "image_size": 8},
        "schedule": Schedule.linear(1000).config,
        "prediction": "v",
        "sample_shape": [1, 8, 8],
        "dataset": "digits",
        "step": 100,
        "ema_decay": 0.999,
        "precision": "fp32",
        "weights_sha256": "ab" * 32,
        "onnx_opset": "18",
    }


def test_sidecar_written_and_read_back(tmp_path):
    engine = np.random.default_rng().bytes(1000)
    (tmp_path / "u.engine").write_bytes(engine)
    side = make_sidecar(
        _meta(),
        engine=engine,
        trt_version="10.9.0.34",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        precision="bf16",
        profile=BatchProfile(1, 16, 64),
        version_compatible=True,
        hardware_compat="ampere+",
    )
    sidecar_path(tmp_path / "u.engine").write_text(json.dumps(side))
    meta = read_metadata(tmp_path / "u.engine", verify=True)
    # The DESIGN keys, the export provenance and the TensorRT facts all survive the round trip.
    assert meta["prediction"] == "v" and meta["model"]["image_size"] == 8 and meta["onnx_opset"] == "18"
    assert meta["precision"] == "bf16"  # the engine's precision, not the source ONNX file's
    assert meta["onnx_weights_sha256"] == "ab" * 32 and "weights_sha256" not in meta
    assert meta["profile"] == {"min": 1, "opt": 16, "max": 64} and meta["version_compatible"] is True
    assert meta["tensorrt_version"] == "10.9.0.34" and meta["gpu_name"].startswith("NVIDIA H100")
    check_engine_compat(meta, trt_version="10.11.0", gpu_name="NVIDIA A100", compute_capability=(8, 0))


def test_info_on_engine_and_sidecar(tmp_path, capsys):
    """`ddpm info` reads an engine's sidecar without TensorRT, and checks the engine bytes against it."""
    engine = np.random.default_rng().bytes(2048)  # stand-in bytes: info never deserialises the engine
    path = tmp_path / "u.trt"
    path.write_bytes(engine)
    side = make_sidecar(
        _meta(), engine=engine, trt_version="10.9.0.34", gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0", precision="fp16", profile=BatchProfile(1, 64, 256),
    )  # fmt: skip
    sidecar_path(path).write_text(json.dumps(side, indent=2))
    assert main(["info", str(path)]) == 0
    table = capsys.readouterr().out
    assert (
        "profile.opt" in table
        and "64" in table
        and "tensorrt_version" in table
        and "engine_verified" in table
    )
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["profile"]["max"] == 256
    path.write_bytes(engine[:1000])
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "engine is 1000 bytes but its sidecar records 2048" in err and len(err.strip().splitlines()) == 1


def test_cli_trt_without_tensorrt_one_line(tmp_path, monkeypatch, capsys):
    import torch

    from ddpm.models import build_model, preset_config
    from ddpm.schedule import Schedule as S
    from ddpm.trainer.checkpoint import save_checkpoint

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ckpt = save_checkpoint(
        tmp_path / "m.safetensors",
        build_model(preset_config("mlp")),
        {"schedule": S.linear(100).config, "prediction": "eps", "dataset": "toy", "step": 1},
    )
    before = set(tmp_path.iterdir())
    for ext in ("trt", "engine", "plan"):
        assert (
            main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / f"u.{ext}"), "--batch", "1,8,32"])
            == 2
        )
        err = capsys.readouterr().err
        assert err.startswith("ddpm: error: building a TensorRT engine needs tensorrt") and HINT in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        if not torch.cuda.is_available():
            assert "torch sees no CUDA GPU" in err
    assert set(tmp_path.iterdir()) == before


# ---- real builds: need TensorRT and an NVIDIA GPU ----


@pytest.fixture
def tiny_ckpt(tmp_path):
    import torch

    from ddpm.models import build_model, preset_config
    from ddpm.trainer.checkpoint import save_checkpoint

    model = build_model(preset_config("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = {"schedule": Schedule.linear(1000).config, "prediction": "eps", "dataset": "test", "step": 1}
    return save_checkpoint(tmp_path / "tiny.safetensors", model, meta)


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16", "bf16"])
def test_trt_build_parity_and_sidecar(tiny_ckpt, tmp_path, precision, capsys):
    import tensorrt as trt
    import torch

    out = tmp_path / "tiny.trt"
    cache = tmp_path / "timing.cache"
    args = [
        "export",
        "--ckpt",
        str(tiny_ckpt),
        "--out",
        str(out),
        "--batch",
        "1,8,16",
        "--precision",
        precision,
    ]
    assert main([*args, "--timing-cache", str(cache)]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    for b in (1, 7, 8, 16):
        assert f"parity tensorrt batch {b}:" in text
    meta = read_metadata(out, verify=True)
    assert meta["precision"] == precision and meta["tensorrt_version"] == trt.__version__
    assert meta["profile"] == {"min": 1, "opt": 8, "max": 16}
    assert meta["compute_capability"] == "{}.{}".format(*torch.cuda.get_device_capability())
    assert cache.stat().st_size > 0
    # A second build reuses the timing cache file.
    assert main([*args, "--timing-cache", str(cache)]) == 0
    assert "timing cache: reusing" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.trt
def test_trt_build_from_onnx_and_runtime_backend(tiny_ckpt, tmp_path, capsys):
    import torch

    from ddpm.runtime.backends.tensorrt_backend import TensorRTBackend

    onnx_path = tmp_path / "tiny.onnx"
    assert main(["export", "--ckpt", str(tiny_ckpt), "--out", str(onnx_path)]) == 0
    out = tmp_path / "tiny.plan"
    assert main(["export", "--onnx", str(onnx_path), "--out", str(out), "--batch", "1,4,8"]) == 0
    assert "against onnxruntime[cpu]" in capsys.readouterr().out
    with TensorRTBackend(out, torch.device("cuda")) as backend:
        y = backend(torch.randn(3, 1, 8, 8, device="cuda"), torch.randint(0, 1000, (3,), device="cuda"))
        assert y.shape == (3, 1, 8, 8) and torch.isfinite(y).all()
