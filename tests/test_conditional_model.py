"""Class-conditional models (docs/design.md, "Conditional models"): the network's class table and null class, the
``classes`` metadata of every artifact, the (x, t, y) export through onnxruntime and OpenVINO, the backends' y
checks, ``ddpm train --cond class`` (metadata, one preview row per class, bitwise resume, folders of class
sub-folders, refusals) and ``ddpm eval --per-class``.

Networks have their weights perturbed: a fresh UNet outputs exactly zero (zero-initialised output conv).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _files import read_loss_csv, torchrun_failure
from safetensors.torch import load_file, save_file

from ddpm.checkpoint import load_model, save_checkpoint
from ddpm.cli import main
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.evaluation.evaluate import evaluate
from ddpm.images import to_uint8_nhwc
from ddpm.metadata import FORMAT, class_info, encode_metadata
from ddpm.models import build_model, preset_config
from ddpm.runtime.backends import open_backend
from ddpm.schedule import Schedule
from ddpm.trainer.conditional import drop_labels, preview_classes
from ddpm.trainer.data import load_class_labels, load_dataset
from ddpm.trainer.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 3  # classes of the small test network; its null class is 3
# torch and onnxruntime / OpenVINO sum in different orders: measured ~1e-6 (tests/test_backends.py's bound)
CALL_RTOL = 1e-5


def _perturbed(cfg: dict) -> torch.nn.Module:
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _small(k: int = K) -> dict:
    return preset_config("tiny", base_channels=8, groups=4, num_classes=k)


def _meta(k: int = K, **classes) -> dict:
    info = {"count": k, "null": k, "names": ["cat", "dog", "emu"][:k], "p_uncond": 0.1, **classes}
    return {"schedule": Schedule.linear(1000).config, "prediction": "eps", "dataset": "test", "step": 1,
            "classes": info}  # fmt: skip


@pytest.fixture(scope="module")
def cond_artifacts(tmp_path_factory):
    """A conditional checkpoint and its ONNX export (through the exporter, parity-checked with random y)."""
    from ddpm.export.pipeline import export

    d = tmp_path_factory.mktemp("cond")
    ckpt = save_checkpoint(d / "cond.safetensors", _perturbed(_small()), _meta())
    lines: list[str] = []
    export(ckpt, d / "cond.onnx", log=lines.append)
    return ckpt, d / "cond.onnx", lines


# ---- the network ----


def test_class_changes_the_output_and_the_null_row_exists():
    model = _perturbed(_small())
    assert tuple(model.class_emb.weight.shape) == (K + 1, 4 * 8)  # K classes and the null class K
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        a, b = model(x, t, torch.tensor([0, 1, 2, 3])), model(x, t, torch.tensor([1, 2, 3, 0]))
        again = model(x, t, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(a, again)
    assert all(float((a[i] - b[i]).abs().max()) > 1e-4 for i in range(4))  # every row, the null class too
    with pytest.raises(InvalidArgumentError, match="class-conditional: call it as model"):
        model(x, t)


def test_unconditional_config_and_keys_are_unchanged():
    plain, zero = preset_config("tiny"), preset_config("tiny", num_classes=0)
    assert plain == zero and "num_classes" not in plain  # stored configs stay as they were
    keys = set(build_model(plain).state_dict())
    assert keys == set(build_model(zero).state_dict()) and not any("class" in k for k in keys)
    assert set(build_model(_small()).state_dict()) - set(build_model(_small(0)).state_dict()) == {
        "class_emb.weight"
    }
    with pytest.raises(InvalidArgumentError, match="unconditional: call it as model"):
        build_model(plain)(torch.randn(1, 1, 8, 8), torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(InvalidArgumentError, match="MLP denoiser is unconditional"):
        preset_config("mlp", num_classes=2)
    with pytest.raises(InvalidArgumentError, match=r"'num_classes' must be an integer in 0..100000"):
        preset_config("tiny", num_classes=100_001)


# ---- metadata ----


def _edited(tmp_path, name: str, classes, model_cfg=None):
    """A checkpoint whose metadata key ``classes`` holds ``classes`` (JSON text; None: left out), written past
    the writer's validation."""
    model = _perturbed(model_cfg or _small())
    strings = encode_metadata({"format": FORMAT, "model": _small(), "sample_shape": [1, 8, 8], **_meta()})
    strings["model"] = json.dumps(model.config)
    strings.pop("classes")
    if classes is not None:
        strings["classes"] = classes
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / name, metadata=strings)
    return tmp_path / name


@pytest.mark.parametrize(
    "classes, match",
    [
        ('{"count": 100001, "null": 100001}', r"metadata\.classes\.count must be an integer in 1\.\.100000"),
        ('{"count": 3, "null": 2}', r"classes\.null is 2 but this UNet's null class is its last row, 3"),
        ('{"count": 4, "null": 4}', r"classes\.count 4 but the unet network's class table holds 3"),
        ('{"count": 3, "null": 3, "names": ["a", "a", "b"]}', "classes.names repeats a name"),
        ('{"count": 3, "null": 3, "names": ["a"]}', "classes.names holds 1 names for 3 classes"),
        (
            '{"count": 3, "null": 3, "names": ["' + "x" * 300 + '", "b", "c"]}',
            r"names\[0\] must be a string of",
        ),
        ('{"count": 3, "null": 3, "p_uncond": 1.5}', r"p_uncond must be a finite number in \[0, 1\)"),
        ('{"count": 3, "null": 3, "guidance": 7}', "metadata.classes has unknown key"),
        ("[1, 2]", "metadata.classes must be an object"),
        (None, "conditioned on 3 classes but metadata lacks 'classes'"),
    ],
)
def test_hostile_classes_metadata_is_one_line(tmp_path, capsys, classes, match):
    path = _edited(tmp_path, "bad.safetensors", classes)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err


def test_classes_on_an_unconditional_network_is_refused(tmp_path, capsys):
    path = _edited(tmp_path, "u.safetensors", '{"count": 3, "null": 3}', model_cfg=preset_config("tiny"))
    assert main(["info", str(path)]) == 2
    assert "but the unet network is unconditional" in capsys.readouterr().err


def test_class_info_maps_names_and_numbers(cond_artifacts):
    info = class_info(load_model(cond_artifacts[0])[1])
    assert (info.count, info.null, info.names, info.p_uncond) == (3, 3, ("cat", "dog", "emu"), 0.1)
    assert [info.index_of(c) for c in ("dog", 2, "0", np.int64(1))] == [1, 2, 0, 1]
    for bad, match in [("yak", "'yak' is not a class of this model: give a number in 0..2 or a name"),
                       (3, "class 3 is out of range: this model has classes 0..2"), (True, "'True' is not")]:  # fmt: skip
        with pytest.raises(InvalidArgumentError, match=match):
            info.index_of(bad)


# ---- export and backends ----


def test_onnx_takes_x_t_y_and_matches_torch_in_onnxruntime_and_openvino(cond_artifacts, capsys):
    import onnx

    ckpt, onnx_path, lines = cond_artifacts
    graph = onnx.load(str(onnx_path)).graph
    assert [i.name for i in graph.input] == ["x", "t", "y"]
    y_type = graph.input[2].type.tensor_type
    assert y_type.elem_type == onnx.TensorProto.INT64 and y_type.shape.dim[0].dim_param  # dynamic batch N
    assert any("parity onnxruntime[cpu] batch 7" in ln and ln.endswith("ok") for ln in lines)
    rng = np.random.default_rng()
    x = torch.from_numpy(rng.standard_normal((5, 1, 8, 8), dtype=np.float32))
    t = torch.from_numpy(rng.integers(0, 1000, 5))
    y = torch.tensor([0, 1, 2, K, int(rng.integers(0, K + 1))])  # the null class K included
    with open_backend(ckpt, device="cpu") as tb:
        want = tb(x, t, y).clone()
    for runtime in ("onnxruntime", "openvino"):
        with open_backend(onnx_path, device="cpu", runtime=runtime) as b:
            assert b.classes.count == K
            got = b(x, t, y).clone()
            rel = float((got - want).norm() / want.norm())
            assert rel < CALL_RTOL, (runtime, rel)
    assert main(["info", str(onnx_path)]) == 0
    out = capsys.readouterr().out
    for row in ('classes.count *3', r'classes.names *\["cat", "dog", "emu"\]', "classes.p_uncond *0.1",
                "classes.null *3", r'"y": "int64 \[N\]"'):  # fmt: skip
        assert re.search(row, out), row


def test_a_graph_with_y_needs_classes_metadata(cond_artifacts, tmp_path):
    import onnx

    proto = onnx.load(str(cond_artifacts[1]))
    props = {e.key: e.value for e in proto.metadata_props}
    model = json.loads(props.pop("model"))
    del model["num_classes"], props["classes"]
    del proto.metadata_props[:]
    for key, value in {**props, "model": json.dumps(model)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp_path / "unlabelled.onnx"))
    for runtime in ("onnxruntime", "openvino"):
        with pytest.raises(ArtifactError, match=r"and t \[N\] and one output; this model has inputs \(.*y: "):
            open_backend(tmp_path / "unlabelled.onnx", device="cpu", runtime=runtime)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino"])
def test_backends_check_y(cond_artifacts, runtime):
    ckpt, onnx_path, _ = cond_artifacts
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 6])
    cases = [
        (None, r"this model is class-conditional \(3 classes\): call it with y"),
        (torch.tensor([0, 1], dtype=torch.int32), r"y must be int64 of shape \[2\], got torch.int32"),
        (torch.tensor([0]), r"y must be int64 of shape \[2\], got torch.int64 \[1\]"),
        (torch.tensor([0, 4]), r"y holds class 4; this model's classes are 0\.\.2, or the null class 3"),
        (torch.tensor([-1, 0]), "y holds class -1"),
    ]
    with open_backend(ckpt if runtime == "torch" else onnx_path, device="cpu", runtime=runtime) as b:
        for y, match in cases:
            with pytest.raises(InvalidArgumentError, match=match):
                b(x, t, y)
        y = torch.tensor([0, 3])
        first = b(x, t, y).clone()
        y[1] = 9  # an in-place change is seen: the values are checked again
        with pytest.raises(InvalidArgumentError, match="y holds class 9"):
            b(x, t, y)
        assert torch.equal(b(x, t, torch.tensor([0, 3])), first)


def test_unconditional_backend_refuses_y(tmp_path):
    meta = {"schedule": Schedule.linear(1000).config, "prediction": "eps", "dataset": "test", "step": 1}
    ckpt = save_checkpoint(tmp_path / "u.safetensors", _perturbed(_small(0)), meta)
    with open_backend(ckpt, device="cpu") as b:
        assert b.classes is None
        with pytest.raises(InvalidArgumentError, match="this model is unconditional: call it without y"):
            b(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.tensor([0]))


def test_tensorrt_profile_covers_y():
    from ddpm.export.tensorrt_build import BatchProfile, _optimization_profile

    class Profile:
        shapes: dict = {}

        def set_shape(self, name, *shapes):
            self.shapes[name] = shapes

    class Tensor:
        def __init__(self, name):
            self.name = name

    class Network:
        inputs = [Tensor("x"), Tensor("t"), Tensor("y")]
        num_inputs = 3

        def get_input(self, i):
            return self.inputs[i]

    class Builder:
        def create_optimization_profile(self):
            return Profile()

    got = _optimization_profile(Builder(), Network(), [1, 8, 8], BatchProfile(1, 4, 16)).shapes
    assert got["y"] == got["t"] == ((1,), (4,), (16,)) and got["x"][2] == (16, 1, 8, 8)


# ---- training ----


def _cfg(out, data="digits", **kw):
    base = dict(iters=6, batch_size=16, warmup=2, sample_steps=2, num_samples=20, progress=False, seed=3)
    return TrainConfig(data=data, out=out, cond="class", **{**base, **kw})


def test_train_digits_conditional_metadata_and_one_preview_row_per_class(tmp_path, capsys):
    from PIL import Image

    ckpt = train(_cfg(tmp_path / "run"))
    model, meta = load_model(ckpt)
    names = [str(i) for i in range(10)]
    assert meta["classes"] == {"count": 10, "null": 10, "names": names, "p_uncond": 0.1}
    assert meta["model"]["num_classes"] == 10 and tuple(model.class_emb.weight.shape)[0] == 11
    w, h = Image.open(tmp_path / "run" / "samples.png").size
    assert 4.5 < h / w < 5.5  # 10 rows (one per class) of 2 columns
    assert main(["info", str(ckpt)]) == 0
    assert re.search(r"classes\.names +\[\"0\", \"1\"", capsys.readouterr().out)
    assert preview_classes(10, 64) == (list(range(10)), 6)
    assert preview_classes(100, 5) == ([0, 11, 22, 33, 44, 55, 66, 77, 88, 99], 1)


class _Interrupt(Exception):
    pass


def test_conditional_resume_is_bitwise(tmp_path):
    kw = {"iters": 8, "save_every": 4, "p_uncond": 0.3}
    full = train(_cfg(tmp_path / "full", **kw))

    def interrupt(k, loss):
        if k == 7:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(_cfg(tmp_path / "cut", **kw), on_step=interrupt)
    resumed = train(_cfg(tmp_path / "cut", resume=True, **kw))
    assert np.array_equal(read_loss_csv(full.parent / "loss.csv"), read_loss_csv(resumed.parent / "loss.csv"))
    wf, wr = load_file(full), load_file(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    with pytest.raises(InvalidArgumentError, match=r"option p_uncond = .* differs from the run's 0\.3"):
        train(_cfg(tmp_path / "cut", resume=True, iters=10))


@pytest.mark.slow
def test_torchrun_conditional_training_matches_one_process(tmp_path):
    """Two Gloo ranks shard the labels (after label dropout) drawn for the global batch: the same losses to
    float32 rounding of the all-reduce (tests/test_distributed.py's tolerance)."""
    args = ["train", "--data", "digits", "--cond", "class", "--p-uncond", "0.3", "--batch-size", "32",
            "--sample-steps", "2", "--preview-samples", "4", "--threads", "1", "--warmup", "2", "--iters", "6",
            "--no-progress"]  # fmt: skip
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # one process: this one (as tests/test_distributed.py); two: torchrun
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    r = subprocess.run([*torchrun, "-m", "ddpm", *args, "--out", str(tmp_path / "two")], capture_output=True,
                       text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 0, torchrun_failure(r)
    np.testing.assert_allclose(read_loss_csv(tmp_path / "two" / "loss.csv"),
                               read_loss_csv(tmp_path / "one" / "loss.csv"), rtol=1e-5)  # fmt: skip


def test_label_dropout_draws_from_the_seeded_stream():
    y = torch.arange(20000) % 7
    torch.manual_seed(1)
    a = drop_labels(y, 0.3, 7)
    torch.manual_seed(1)
    assert torch.equal(a, drop_labels(y, 0.3, 7))  # a function of the step's seed
    assert abs(float((a == 7).float().mean()) - 0.3) < 0.02 and torch.equal(a[a != 7], y[a != 7])
    assert torch.equal(drop_labels(y, 0.0, 7), y)


def _png(path, value):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_folder_of_class_subfolders(tmp_path):
    root = tmp_path / "pets"
    for k in range(3):
        _png(root / "dog" / f"{k}.png", 250)
        _png(root / "cat" / "deep" / f"{k}.png", 10)  # any depth below the class folder
    labels = load_class_labels(f"folder:{root}")
    assert labels.names == ["cat", "dog"]
    data = load_dataset(f"folder:{root}").data.float().mean((1, 2, 3))
    assert torch.equal(torch.from_numpy(labels.labels), (data > 128).long())  # aligned with the images
    ckpt = train(_cfg(tmp_path / "run", f"folder:{root}", iters=2, batch_size=4, num_samples=2))
    assert load_model(ckpt)[1]["classes"]["names"] == ["cat", "dog"]


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ["--data", "swissroll"],
            "--cond class needs labelled images; swissroll holds unlabelled 2-D points",
        ),
        (
            ["--data", "folder:LOOSE"],
            r"1 image\(s\) lie directly in the folder .* put every image in the sub",
        ),
        (["--data", "folder:ONE"], r"1 class sub-folder\(s\); class labels need 2\.\.100000"),
        (["--data", "mnist:MNIST"], r"mnist:.* has no train-labels-idx1-ubyte \(or \.gz\) beside its images"),
        (["--data", "digits", "--p-uncond", "1"], r"--p-uncond must be in \[0, 1\)"),
        (["--data", "digits", "--p-uncond", "-0.1"], r"--p-uncond must be in \[0, 1\)"),
        (["--data", "digits", "--cond", "text"], "--cond must be class"),
    ],
)
def test_cli_refusals_are_one_line(tmp_path, capsys, args, match):
    _png(tmp_path / "LOOSE" / "a.png", 0)
    _png(tmp_path / "LOOSE" / "cat" / "b.png", 0)
    _png(tmp_path / "ONE" / "cat" / "b.png", 0)
    (tmp_path / "MNIST").mkdir()
    idx = (0x0803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (2, 8, 8)) + bytes(128)
    (tmp_path / "MNIST" / "train-images-idx3-ubyte").write_bytes(idx)
    args = [re.sub(r"(LOOSE|ONE|MNIST)", lambda m: str(tmp_path / m[1]), a) for a in args]
    cond = [] if "--cond" in args else ["--cond", "class"]
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress", "--threads", "1", *cond, *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not out.exists()


def test_p_uncond_needs_cond_class(tmp_path, capsys):
    args = ["train", "--data", "digits", "--out", str(tmp_path / "r"), "--p-uncond", "0.3", "--no-progress"]
    assert main(args) == 2
    assert "--p-uncond applies to class-conditional runs: add --cond class" in capsys.readouterr().err


# ---- ddpm eval --per-class ----


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return to_uint8_nhwc(d.images[:, None] / 8.0 - 1.0), d.target


def test_eval_per_class_scores_each_asked_class(tmp_path, capsys):
    u, target = _digits()
    pick = np.random.default_rng(0).permutation(np.flatnonzero(target != 9))[:150]
    asked = target[pick].copy()
    asked[target[pick] == 3] = 9  # the model was asked for 9 and drew 3s: class 9 must score badly
    np.savez(tmp_path / "s.npz", arr_0=u[pick], classes=asked)
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", "digits", "--per-class", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["class"]: r for r in report["per_class"]}
    assert 3 not in rows and sorted(rows) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert sum(r["count"] for r in rows.values()) == 150
    good = [r for c, r in rows.items() if c != 9]
    assert all(r["accuracy"] > 0.8 and r["confidence"] > 0.8 for r in good)
    assert all(r["fd"] < r["fd_scale"] + 4 * r["fd_spread"] + 20 for r in good)
    assert rows[9]["accuracy"] < 0.6 and rows[9]["fd"] > 3 * rows[9]["fd_scale"]
    acc = report["metrics"]["class_accuracy"]
    assert acc["value"] < acc["scale"] and acc["scale"] > 0.95


@pytest.mark.parametrize(
    "arrays, ref, match",
    [
        ({}, "digits", "no 'classes' array"),
        ({"classes": np.zeros(5, np.int64)}, "digits", r"classes must be integers \[8\]"),
        ({"classes": np.zeros(8, np.float32)}, "digits", r"classes must be integers \[8\]"),
        ({"classes": np.full(8, 10)}, "digits", "classes holds 10, which is not a class of digits"),
        (
            {"classes": np.zeros(8, np.int64)},
            "swissroll",
            "needs a labelled reference; swissroll has no labels",
        ),
        ({"classes": np.zeros(8, np.int64)}, "REF.npz", "needs a dataset as --ref"),
    ],
)
def test_eval_per_class_refusals_are_one_line(tmp_path, capsys, arrays, ref, match):
    np.savez(tmp_path / "s.npz", arr_0=_digits()[0][:8], **arrays)
    ref = ref.replace("REF", str(tmp_path / "ref"))
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", ref, "--per-class"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err


def test_eval_per_class_in_python_checks_the_classes_first():
    u = _digits()[0][:8]
    with pytest.raises(
        InvalidArgumentError, match="--per-class needs the classes the samples were asked for"
    ):
        evaluate(u, "digits", per_class=True)
    with pytest.raises(InvalidArgumentError, match="classes holds 10"):  # before any feature is computed
        evaluate(u, "digits", per_class=True, classes=np.full(8, 10))
