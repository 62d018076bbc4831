"""runtime/artifacts.py: artifact kinds, metadata of checkpoints / ONNX files / engine sidecars, integrity and
engine-compatibility checks. Small hand-made files: no export, no torch model needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddpm.artifacts import (
    MAX_ONNX_IR_VERSION,
    artifact_kind,
    check_engine_compat,
    file_sha256,
    onnx_weights_sha256,
    read_metadata,
    sidecar_path,
)
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.metadata import FORMAT, encode_metadata
from ddpm.schedule import Schedule


def _meta(**over):
    meta = {
        "format": FORMAT,
        "model": {"arch": "mlp", "dim": 2, "hidden": 8},
        "schedule": Schedule.linear(1000).config,
        "prediction": "eps",
        "sample_shape": [2],
        "dataset": "toy",
        "step": 3,
        "ema_decay": None,
    }
    meta.update(over)
    return meta


def _write_checkpoint(path, meta, rng):
    from safetensors.numpy import save_file

    save_file({"w": rng.standard_normal((4, 4), dtype=np.float32)}, str(path), metadata=encode_metadata(meta))


def _onnx_model(meta, rng, *, hash_weights=True):
    """model_output = x * w + 0 * t: a real (tiny) graph onnxruntime can run, with our metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "w")
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["model_output"]),
        helper.make_node("Identity", ["t"], ["t_out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("t", TensorProto.INT64, ["N"]),
        ],
        [
            helper.make_tensor_value_info("model_output", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("t_out", TensorProto.INT64, ["N"]),
        ],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    props = dict(meta)
    if hash_weights:
        props["weights_sha256"] = onnx_weights_sha256(model)
    for k, v in encode_metadata(props).items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(model)
    return model


def _save(model, path):
    import onnx

    onnx.save(model, str(path))
    return path


# ---- kinds ----


@pytest.mark.parametrize(
    "name, kind",
    [
        ("m.safetensors", "checkpoint"),
        ("u.onnx", "onnx"),
        ("u.trt", "tensorrt"),
        ("u.ENGINE", "tensorrt"),
        ("u.plan", "tensorrt"),
    ],
)
def test_artifact_kind_by_extension(tmp_path, name, kind):
    (tmp_path / name).write_bytes(b"x")
    assert artifact_kind(tmp_path / name) == kind
    assert artifact_kind(tmp_path / "absent" / name, must_exist=False) == kind


def test_artifact_kind_errors(tmp_path):
    with pytest.raises(
        InvalidArgumentError, match=r"unknown extension '\.pt'; allowed: \.safetensors, \.onnx, \.trt"
    ):
        artifact_kind(tmp_path / "m.pt", must_exist=False)
    with pytest.raises(ArtifactError, match="no such file"):
        artifact_kind(tmp_path / "missing.onnx")
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(ArtifactError, match="not a regular file"):
        artifact_kind(tmp_path / "d.onnx")


def test_sidecar_path():
    assert str(sidecar_path("runs/unet.trt")) == "runs/unet.trt.json"
    assert sidecar_path("a/b.plan").name == "b.plan.json"


# ---- checkpoints ----


def test_checkpoint_metadata_roundtrip(tmp_path, rng):
    p = tmp_path / "m.safetensors"
    _write_checkpoint(p, _meta(), rng)
    meta = read_metadata(p)
    assert meta["model"]["arch"] == "mlp" and meta["sample_shape"] == [2] and meta["step"] == 3
    assert meta["schedule"] == Schedule.linear(1000).config


def test_checkpoint_truncated_or_garbage_rejected(tmp_path, rng):
    p = tmp_path / "m.safetensors"
    _write_checkpoint(p, _meta(), rng)
    data = p.read_bytes()
    for cut in (len(data) - 7, len(data) // 2, 6):
        p.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match=r"m\.safetensors: not a readable safetensors checkpoint"):
            read_metadata(p)
    p.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        read_metadata(p)


def test_checkpoint_edited_metadata_rejected(tmp_path, rng):
    from safetensors.numpy import save_file

    p = tmp_path / "m.safetensors"
    strings = encode_metadata(_meta())
    strings["sample_shape"] = "[3]"  # disagrees with model.dim = 2
    save_file({"w": np.zeros(2, np.float32)}, str(p), metadata=strings)
    with pytest.raises(ArtifactError, match=r"inconsistent metadata: sample_shape \[3\] does not match"):
        read_metadata(p)
    strings["sample_shape"] = "[2]"
    strings["prediction"] = "noise"
    save_file({"w": np.zeros(2, np.float32)}, str(p), metadata=strings)
    with pytest.raises(ArtifactError, match="unknown prediction 'noise'"):
        read_metadata(p)


# ---- ONNX ----


def test_onnx_metadata_and_weight_hash(tmp_path, rng):
    import onnxruntime as ort

    p = _save(_onnx_model(_meta(), rng), tmp_path / "u.onnx")
    meta = read_metadata(p, verify=True)
    assert meta["dataset"] == "toy" and len(meta["weights_sha256"]) == 64
    # The hand-made file is a real graph: onnxruntime runs it.
    sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, 2), dtype=np.float32)
    assert sess.run(["model_output"], {"x": x, "t": np.arange(3)})[0].shape == (3, 2)


def test_onnx_edited_weights_detected(tmp_path, rng):
    from onnx import numpy_helper

    model = _onnx_model(_meta(), rng)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0] += 1e-3
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    p = _save(model, tmp_path / "u.onnx")
    read_metadata(p)  # metadata alone is still consistent...
    with pytest.raises(ArtifactError, match="weights do not match the metadata"):
        read_metadata(p, verify=True)  # ...but the weights are not the exported ones


def test_onnx_edited_metadata_truncated_and_ir_rejected(tmp_path, rng):
    model = _onnx_model(_meta(), rng)
    for e in model.metadata_props:
        if e.key == "model":
            e.value = json.dumps({"arch": "mlp", "dim": 5})
    p = _save(model, tmp_path / "u.onnx")
    with pytest.raises(ArtifactError, match=r"u\.onnx: inconsistent metadata: sample_shape \[2\]"):
        read_metadata(p)

    good = _save(_onnx_model(_meta(), rng), tmp_path / "g.onnx")
    data = good.read_bytes()
    for cut in (len(data) // 3, len(data) - 40):
        good.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match=r"g\.onnx: (not a readable ONNX model|no ddpm metadata)"):
            read_metadata(good)

    bare = _onnx_model(_meta(), rng)
    del bare.metadata_props[:]
    with pytest.raises(ArtifactError, match="no ddpm metadata found"):
        read_metadata(_save(bare, tmp_path / "bare.onnx"))

    new_ir = _onnx_model(_meta(), rng)
    new_ir.ir_version = MAX_ONNX_IR_VERSION + 1
    with pytest.raises(ArtifactError, match=f"IR version {MAX_ONNX_IR_VERSION + 1} is newer"):
        read_metadata(_save(new_ir, tmp_path / "ir.onnx"))


# ---- TensorRT sidecars ----


def _engine_with_sidecar(tmp_path, rng, **over):
    from ddpm.export.tensorrt_build import BatchProfile, make_sidecar

    engine = rng.bytes(4096)  # stands in for a serialized engine: only its bytes and hash matter here
    path = tmp_path / "unet.trt"
    path.write_bytes(engine)
    side = make_sidecar(
        _meta(),
        engine=engine,
        trt_version="10.9.0.34",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        precision="fp16",
        profile=BatchProfile(1, 8, 64),
    )
    side.update(over)
    sidecar_path(path).write_text(json.dumps(side, indent=2))
    return path, side


def test_sidecar_roundtrip(tmp_path, rng):
    path, side = _engine_with_sidecar(tmp_path, rng)
    meta = read_metadata(path, verify=True)
    assert meta["profile"] == {"min": 1, "opt": 8, "max": 64}
    assert meta["precision"] == "fp16" and meta["compute_capability"] == "9.0"
    assert meta["model"] == _meta()["model"] and meta["engine_sha256"] == file_sha256(path)
    # Human-readable sidecar: structured values are real JSON, not JSON-in-strings.
    raw = json.loads(sidecar_path(path).read_text())
    assert isinstance(raw["model"], dict) and isinstance(raw["profile"], dict)


def test_sidecar_problems_rejected(tmp_path, rng):
    path, _ = _engine_with_sidecar(tmp_path, rng)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="engine is 4086 bytes but its sidecar records 4096"):
        read_metadata(path)

    path, _ = _engine_with_sidecar(tmp_path, rng)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    read_metadata(path)
    with pytest.raises(ArtifactError, match="engine bytes do not match its sidecar"):
        read_metadata(path, verify=True)

    path, _ = _engine_with_sidecar(tmp_path, rng, profile={"min": 4, "opt": 2, "max": 8})
    with pytest.raises(ArtifactError, match="'profile' must be"):
        read_metadata(path)

    path, _ = _engine_with_sidecar(tmp_path, rng, sample_shape=[3, 32, 32])
    with pytest.raises(ArtifactError, match=r"unet\.trt\.json: inconsistent metadata"):
        read_metadata(path)

    path, side = _engine_with_sidecar(tmp_path, rng)
    del side["tensorrt_version"]
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(ArtifactError, match="sidecar lacks TensorRT key"):
        read_metadata(path)

    sidecar_path(path).write_text("{ truncated")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_metadata(path)

    sidecar_path(path).unlink()
    with pytest.raises(ArtifactError, match=r"sidecar unet\.trt\.json is missing"):
        read_metadata(path)


def test_check_engine_compat():
    side = {"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    here = {"trt_version": "10.9.0.34", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0)}
    check_engine_compat(side, **here)
    with pytest.raises(
        ArtifactError, match=r"built with TensorRT 10\.9\.0\.34 but this machine has TensorRT 10\.10\.0"
    ):
        check_engine_compat(side, **{**here, "trt_version": "10.10.0"})
    with pytest.raises(ArtifactError, match=r"compute capability 9\.0 .* has compute capability 8\.0"):
        check_engine_compat(side, **{**here, "gpu_name": "NVIDIA A100", "compute_capability": "8.0"})
    with pytest.raises(
        ArtifactError, match="built on GPU 'NVIDIA H100 80GB HBM3' but this GPU is 'NVIDIA H200'"
    ):
        check_engine_compat(side, **{**here, "gpu_name": "NVIDIA H200"})
    # Relaxed by the build flags recorded in the sidecar.
    vc = {**side, "version_compatible": True}
    check_engine_compat(vc, **{**here, "trt_version": "10.12.0"})
    with pytest.raises(ArtifactError, match="same major version, not older"):
        check_engine_compat(vc, **{**here, "trt_version": "10.8.0"})
    with pytest.raises(ArtifactError, match="same major version"):
        check_engine_compat(vc, **{**here, "trt_version": "11.0.0"})
    hw = {**side, "hardware_compat": "ampere+"}
    check_engine_compat(hw, **{**here, "gpu_name": "NVIDIA A10", "compute_capability": "8.6"})
    with pytest.raises(ArtifactError, match=r"Ampere and newer .* compute capability 7\.5"):
        check_engine_compat(hw, **{**here, "gpu_name": "Tesla T4", "compute_capability": "7.5"})
