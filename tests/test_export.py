"""`ddpm export` to ONNX and `ddpm info`: real exports of the presets, real onnxruntime sessions, parity against
PyTorch on fresh random inputs, and the failure paths (one line, exit 2, nothing half-written).

Tolerances (export/parity.py): fp32 1e-4 normwise relative error (measured ~1e-6), fp16 1e-2 (measured ~2e-3).
Checkpoints have their weights perturbed: a fresh UNet outputs exactly zero (zero-initialised output conv),
which would make any comparison pass.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ddpm.artifacts import MAX_ONNX_IR_VERSION, read_metadata
from ddpm.cli import main
from ddpm.errors import ArtifactError, InvalidArgumentError

FP32_TOL = 1e-4


def _make_checkpoint(path, preset):
    import torch

    from ddpm.models import build_model, preset_config
    from ddpm.schedule import Schedule
    from ddpm.trainer.checkpoint import save_checkpoint

    model = build_model(preset_config(preset))
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    meta = {
        "schedule": Schedule.cosine(1000).config,
        "prediction": "eps",
        "dataset": f"test-{preset}",
        "step": 7,
    }
    return save_checkpoint(path, model, {**meta, "ema_decay": 0.9999})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {name: _make_checkpoint(d / f"{name}.safetensors", name) for name in ("tiny", "mlp", "mnist")}


@pytest.fixture(scope="module")
def tiny_onnx(ckpts, tmp_path_factory):
    from ddpm.export.pipeline import export

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    lines: list[str] = []
    report = export(ckpts["tiny"], out, log=lines.append)
    return report, lines


def _no_temp_files(folder):
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def _torch_out(ckpt, x, t):
    import torch

    from ddpm.trainer.checkpoint import load_model

    model, _ = load_model(ckpt)
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t)).numpy()


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_onnx_file_contract(tiny_onnx, ckpts):
    import onnx

    report, lines = tiny_onnx
    model = onnx.load(str(report.out))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= MAX_ONNX_IR_VERSION  # onnxruntime 1.31 rejects IR 14, onnx 1.23's default
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    ins = {i.name: i.type.tensor_type for i in model.graph.input}
    assert set(ins) == {"x", "t"} and [o.name for o in model.graph.output] == ["model_output"]
    assert ins["x"].elem_type == onnx.TensorProto.FLOAT and ins["t"].elem_type == onnx.TensorProto.INT64
    x_dims = [d.dim_param or d.dim_value for d in ins["x"].shape.dim]
    assert x_dims[1:] == [1, 8, 8] and isinstance(x_dims[0], str)  # symbolic batch axis
    # GroupNorm exported the way TensorRT parses it (see export/onnx_export.py), attention as MatMul/Softmax.
    ops = {n.op_type for n in model.graph.node}
    assert "InstanceNormalization" in ops and "GroupNormalization" not in ops and "Softmax" in ops
    # Metadata: the checkpoint's, plus provenance.
    meta = read_metadata(report.out, verify=True)
    ck = read_metadata(ckpts["tiny"])
    for key in ("model", "schedule", "prediction", "sample_shape", "dataset", "step", "ema_decay"):
        assert meta[key] == ck[key]
    assert meta["onnx_opset"] == "18" and meta["precision"] == "fp32"
    for key in ("torch_version", "onnx_version", "onnxscript_version", "weights_sha256", "checkpoint_sha256"):
        assert meta[key]
    # Parity was run and printed at batch 1 and 7, under the stated fp32 tolerance.
    assert {r.batch for r in report.parity} == {1, 7} and all(r.max_rel <= FP32_TOL for r in report.parity)
    assert any("parity onnxruntime[cpu] batch 7" in line and line.endswith("ok") for line in lines)
    assert _no_temp_files(report.out.parent)


def test_onnxruntime_runs_other_batch_sizes(tiny_onnx, ckpts, rng):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tiny_onnx[0].out), providers=["CPUExecutionProvider"])
    for n in (3, 16):  # traced at batch 2, checked at 1 and 7
        x = rng.standard_normal((n, 1, 8, 8), dtype=np.float32)
        t = rng.integers(0, 1000, n)
        out = sess.run(["model_output"], {"x": x, "t": t})[0]
        assert out.shape == (n, 1, 8, 8)
        assert _rel(out, _torch_out(ckpts["tiny"], x, t)) <= FP32_TOL


def test_info_table_and_json(tiny_onnx, ckpts, capsys):
    path = str(tiny_onnx[0].out)
    assert main(["info", path]) == 0
    table = capsys.readouterr().out
    assert "weights_verified" in table and "model.base_channels" in table and "prediction" in table
    assert main(["info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "onnx" and info["metadata"]["sample_shape"] == [1, 8, 8]
    assert info["file_facts"]["inputs"]["t"] == "int64 [N]"
    assert main(["info", str(ckpts["mlp"])]) == 0
    assert "checkpoint" in capsys.readouterr().out


def _one_line_error(capsys, match):
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_info_and_loader_reject_edited_or_truncated(tiny_onnx, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    src = tiny_onnx[0].out
    # 1. Edited metadata: a sample shape that disagrees with the model config.
    model = onnx.load(str(src))
    for e in model.metadata_props:
        if e.key == "sample_shape":
            e.value = "[3, 8, 8]"
    edited = tmp_path / "edited.onnx"
    onnx.save(model, str(edited))
    assert main(["info", str(edited)]) == 2
    _one_line_error(capsys, "inconsistent metadata: sample_shape [3, 8, 8]")
    with pytest.raises(ArtifactError, match="inconsistent metadata"):
        read_metadata(edited)
    # 2. Edited weights: metadata intact, initializer changed.
    model = onnx.load(str(src))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    assert main(["info", str(tampered)]) == 2
    _one_line_error(capsys, "weights do not match the metadata")
    # 3. Truncated file.
    cut = tmp_path / "cut.onnx"
    shutil.copy(src, cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert main(["info", str(cut)]) == 2
    _one_line_error(capsys, "cut.onnx: not a readable ONNX model")
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        read_metadata(cut)


def test_cli_export_mlp_prints_parity(ckpts, tmp_path, capsys):
    out = tmp_path / "mlp.onnx"
    assert main(["export", "--ckpt", str(ckpts["mlp"]), "--out", str(out), "--batch", "1,7,100"]) == 0
    text = capsys.readouterr().out
    for b in (1, 7, 100):
        assert f"parity onnxruntime[cpu] batch {b}: max abs err" in text
    assert "ok: " in text and out.is_file() and _no_temp_files(tmp_path)
    meta = read_metadata(out, verify=True)
    assert meta["sample_shape"] == [2] and meta["model"]["arch"] == "mlp"


def test_fp16_export_keeps_norms_fp32(ckpts, tmp_path, rng):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    from ddpm.export.pipeline import export

    out = tmp_path / "tiny16.onnx"
    report = export(ckpts["tiny"], out, fp16=True)
    assert report.precision == "fp16" and all(r.max_rel <= 1e-2 for r in report.parity)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= MAX_ONNX_IR_VERSION
    assert read_metadata(out, verify=True)["precision"] == "fp16"
    # I/O contract unchanged.
    assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input} == {
        "x": TensorProto.FLOAT,
        "t": TensorProto.INT64,
    }
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    # Conv weights are fp16; normalisation and softmax read fp32 tensors.
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == TensorProto.FLOAT16 for n in convs)
    norms = [n for n in model.graph.node if n.op_type in ("InstanceNormalization", "Softmax")]
    assert norms and all(types[n.input[0]] == TensorProto.FLOAT for n in norms)
    # The sinusoidal timestep embedding stays fp32 (t up to 999 is not representable finely in fp16).
    assert all(
        types[n.input[0]] == TensorProto.FLOAT for n in model.graph.node if n.op_type in ("Sin", "Cos")
    )
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x, t = rng.standard_normal((5, 1, 8, 8), dtype=np.float32), rng.integers(0, 1000, 5)
    assert _rel(sess.run(None, {"x": x, "t": t})[0], _torch_out(ckpts["tiny"], x, t)) <= 1e-2


def test_mnist_export(ckpts, tmp_path):
    from ddpm.export.pipeline import export

    report = export(ckpts["mnist"], tmp_path / "mnist.onnx")
    assert {r.batch for r in report.parity} == {1, 7} and all(r.max_rel <= FP32_TOL for r in report.parity)
    assert read_metadata(report.out)["sample_shape"] == [1, 28, 28]


def test_cifar10_export(tmp_path, capsys):
    """The paper's CIFAR-10 UNet (35.7M parameters): once, parity at batch 1 and 7."""
    ckpt = _make_checkpoint(tmp_path / "cifar10.safetensors", "cifar10")
    out = tmp_path / "cifar10.onnx"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "35.7" in text  # the weight count in the export summary, in millions
    meta = read_metadata(out)
    assert meta["sample_shape"] == [3, 32, 32] and meta["model"]["base_channels"] == 128
    assert text.count("parity onnxruntime[cpu] batch") == 2 and "ok: " in text


def test_parity_failure_exit_2_and_nothing_written(ckpts, tmp_path, monkeypatch, capsys):
    import ddpm.export.pipeline as pipeline

    real = pipeline.torch_reference
    # A 1% error, as a wrong weight or operator would cause: far above the fp32 tolerance.
    monkeypatch.setattr(pipeline, "torch_reference", lambda m, x, t: real(m, x, t) * 1.01)
    out = tmp_path / "bad.onnx"
    assert main(["export", "--ckpt", str(ckpts["mlp"]), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    assert "parity check failed" in captured.err and "nothing was written" in captured.err
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not out.exists() and _no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--ckpt", "{d}/missing.safetensors", "--out", "{d}/u.onnx"], "does not exist"),
        (["--ckpt", "{d}/junk.safetensors", "--out", "{d}/u.onnx"], "not a readable safetensors checkpoint"),
        (["--ckpt", "{d}/model.onnx", "--out", "{d}/u.onnx"], "is an ONNX model, not a checkpoint"),
        (["--ckpt", "{tiny}", "--out", "{d}/u.pt"], "export writes .onnx (ONNX) or .trt / .engine / .plan"),
        (
            ["--ckpt", "{tiny}", "--out", "{d}/u.onnx", "--batch", "0,1,2"],
            "batch sizes must be in 1..65536, got 0",
        ),
        (
            ["--ckpt", "{tiny}", "--out", "{d}/u.trt", "--batch", "0,1,2"],
            "batch sizes must be in 1..65536, got 0",
        ),
        (
            ["--ckpt", "{tiny}", "--out", "{d}/u.trt", "--batch", "8,4,16"],
            "needs MIN <= OPT <= MAX, got 8,4,16",
        ),
        (["--ckpt", "{tiny}", "--out", "{d}/u.plan", "--batch", "1,x,4"], "must be comma-separated integers"),
        (
            ["--ckpt", "{tiny}", "--out", "{d}/u.engine", "--fp16"],
            "--fp16 is not supported for TensorRT outputs",
        ),
        (["--ckpt", "{tiny}", "--out", "{d}/u.trt", "--precision", "int8"], "unknown --precision 'int8'"),
        (["--ckpt", "{tiny}", "--out", "{d}/u.onnx", "--opset", "12"], "--opset must be an integer in 18.."),
        (["--ckpt", "{tiny}", "--out", "{d}/u.onnx", "--precision", "fp16"], "an ONNX export takes --fp16"),
        (["--ckpt", "{tiny}", "--out", "{d}/nodir/u.onnx"], "does not exist"),
        (["--out", "{d}/u.onnx"], "--ckpt is required"),
    ],
)
def test_bad_input_one_line_exit_2(args, match, ckpts, tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"definitely not a safetensors file")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08")
    before = set(tmp_path.iterdir())
    argv = ["export", *(a.format(d=tmp_path, tiny=ckpts["tiny"]) for a in args)]
    assert main(argv) == 2
    _one_line_error(capsys, match)
    assert set(tmp_path.iterdir()) == before  # nothing written, no temporary left behind


def test_ir_version_is_readable_by_onnxruntime():
    """onnx 1.23 stamps IR 14 on new models; onnxruntime 1.31 rejects it. set_ir_version fixes that."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ddpm.export.onnx_export import max_opset, set_ir_version

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert model.ir_version > MAX_ONNX_IR_VERSION  # what onnx writes by default
    with pytest.raises(Exception, match="(?i)ir version"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    set_ir_version(model)
    assert model.ir_version == 8  # the minimum for opset 18
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    hi = max_opset()
    model.opset_import[0].version = hi
    assert set_ir_version(model).ir_version <= MAX_ONNX_IR_VERSION
    model.opset_import[0].version = onnx.defs.onnx_opset_version()
    if helper.find_min_ir_version_for(list(model.opset_import)) > MAX_ONNX_IR_VERSION:
        with pytest.raises(InvalidArgumentError, match="use a lower --opset"):
            set_ir_version(model)


def test_half_conversion_refuses_what_it_cannot_convert():
    from onnx import TensorProto, helper, numpy_helper

    from ddpm.export.precision import convert_to_half

    def model_with(nodes, inits=()):
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
            list(inits),
        )
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("custom", 1)]
        )

    custom = model_with([helper.make_node("Fancy", ["x"], ["y"], domain="custom")])
    with pytest.raises(
        InvalidArgumentError, match="fp16 export is not supported for this model: .*custom domain"
    ):
        convert_to_half(custom)
    big = numpy_helper.from_array(np.array([1.0, 1e6], np.float32), "w")
    huge = model_with([helper.make_node("Mul", ["x", "w"], ["y"])], [big])
    with pytest.raises(InvalidArgumentError, match="beyond the fp16 range"):
        convert_to_half(huge)
    convert_to_half(huge, "bf16")  # bf16 has float32's range
