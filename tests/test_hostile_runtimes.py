"""The last hostile inputs (issue #25): a foreign runtime's own log must not reach the user, `ddpm bench` refuses what
`ddpm run` refuses through the same path, ONNX external data stays inside the model's folder, and a compressed
data file is measured before it is inflated. Each: one line on stderr, exit 2, nothing written; plus fuzzed
compressed and external-data files (hypothesis, derandomized).

Runtime logs are written by C++ straight to file descriptor 2, which capsys does not see, so those cases run the
CLI in a subprocess, as a user does.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from _hostile import assert_one_line, cli, leftovers, raw_strings, write_onnx
from _runtime_models import make_checkpoint, shared_artifacts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


def _ddpm(*args, env=None) -> subprocess.CompletedProcess:
    """`python -m ddpm ...` in a subprocess; also returns its peak RSS (KiB) through GNU time where present."""
    cmd = [sys.executable, "-m", "ddpm", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def _one_line(r: subprocess.CompletedProcess, match: str) -> None:
    assert_one_line(r.returncode, r.stderr, match=match)
    assert ":onnxruntime:" not in r.stderr and "\x1b[" not in r.stderr, (
        r.stderr
    )  # its log: "[E:onnxruntime:, ..."


# ---- a runtime's own log lines never reach stderr (DDPM_DEBUG=1 shows them) ----


def _onnx(path: Path, nodes, out_shape) -> Path:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("t", onnx.TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out_shape)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    for k, v in raw_strings().items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_foreign_runtime_logs_stay_out_of_stderr(tmp_path, runtime):
    bad = {
        "batch": write_onnx(tmp_path / "batch.onnx", raw_strings(), output="batch2"),
        "lying": _onnx(
            tmp_path / "lying.onnx", [helper.make_node("Concat", ["x", "x"], ["y"], axis=1)], ["N", 2]
        ),
        "scalar": _onnx(
            tmp_path / "scalar.onnx", [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], []
        ),
    }
    # One fresh process runs the three commands (`ddpm.cli.main` each; a process start costs seconds): its stderr
    # holds exactly their three lines, and nothing of the runtime's own log.
    runs = [["run", "--engine", str(path), "--runtime", runtime, "--steps", "2", "--num-samples", "3",
             "--no-progress", "--out", str(tmp_path / "s.png")] for path in bad.values()]  # fmt: skip
    script = (
        "import json, sys\nfrom ddpm.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n    print('exit', main(argv), flush=True)\n    sys.stderr.flush()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, json.dumps(runs)], capture_output=True, text=True, timeout=300
    )
    codes = [ln for ln in r.stdout.splitlines() if ln.startswith("exit ")]
    assert codes == ["exit 2"] * len(runs), (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == len(runs) and all("the model failed on its first call" in ln for ln in lines), (
        r.stderr
    )
    assert ":onnxruntime:" not in r.stderr and "\x1b[" not in r.stderr and "Traceback" not in r.stderr, (
        r.stderr
    )
    assert not (tmp_path / "s.png").exists()


# ---- ddpm bench refuses what ddpm run refuses, through the same checks ----


@pytest.fixture(scope="module")
def nan_onnx(tmp_path_factory) -> Path:
    nan = onnx.numpy_helper.from_array(__import__("numpy").array([float("nan")], dtype="float32"), "nan")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "nan"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("t", onnx.TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializer=[nan],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    for k, v in raw_strings().items():
        model.metadata_props.add(key=k, value=v)
    path = tmp_path_factory.mktemp("nan") / "nan.onnx"
    onnx.save(model, str(path))
    return path


def test_bench_and_run_refuse_the_same_inputs(nan_onnx, tmp_path, capsys):
    unet = make_checkpoint(tmp_path, "unet")
    misfit = tmp_path / "misfit.safetensors"
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(unet), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(misfit), metadata=meta)
    cases = [
        ([nan_onnx, "--steps", 3], 2, "NaN/Inf"),
        ([misfit, "--steps", 3], 2, "weights do not match the stored model config"),
        ([unet, "--steps", 3, "--batch", 1_000_000_000], 1_000_000_000, "values per batch tensor"),
    ]
    for args, n, match in cases:
        out = tmp_path / "r.png"
        assert_one_line(*cli(["run", "--engine", *args, "--num-samples", n, "--no-progress", "--out", out], capsys),
                        match=match)  # fmt: skip
        bench = ["bench", "--engine", *args, "--repeats", 3, "--loop-budget", 1, "--no-progress"]
        assert_one_line(*cli(bench if "--batch" in args else [*bench, "--batch", 2], capsys), match=match)
    assert leftovers(tmp_path) == []


# ---- ONNX external data ----


@pytest.fixture(scope="module")
def external(tmp_path_factory) -> dict[str, Path]:
    from onnx.external_data_helper import convert_model_to_external_data

    root = tmp_path_factory.mktemp("ext")
    model = onnx.load(str(shared_artifacts(tmp_path_factory)["unet"][1]))
    (root / "legit" / "weights").mkdir(parents=True)
    convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="weights/w.bin", size_threshold=256
    )
    onnx.save(model, str(root / "legit" / "model.onnx"))
    out = {"legit": root / "legit" / "model.onnx"}
    (root / "link").mkdir()
    (root / "link" / "w.bin").symlink_to(root / "legit" / "weights" / "w.bin")
    for name, loc in {"absolute": str(root / "legit" / "weights" / "w.bin"), "escape": "../legit/weights/w.bin",
                      "link": "w.bin", "device": "/dev/zero", "folder": "."}.items():  # fmt: skip
        out[name] = _relocate(out["legit"], root / name / "model.onnx", loc)
    return out


def _relocate(src: Path, dst: Path, location: str) -> Path:
    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    dst.parent.mkdir(exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def test_external_data_in_a_sub_folder_loads(external, tmp_path, capsys):
    code, err = cli(["info", external["legit"]], capsys)
    assert code == 0, err
    run = [
        "run",
        "--engine",
        external["legit"],
        "--steps",
        2,
        "--num-samples",
        2,
        "--npz",
        tmp_path / "s.npz",
    ]
    assert cli([*run, "--no-progress"], capsys)[0] == 0


@pytest.mark.parametrize("name, match", [("absolute", "must be a relative path"), ("escape", "must be a relative path"),
                                         ("link", "leads out of the model's folder"), ("device", "relative path"),
                                         ("folder", "not a regular file")])  # fmt: skip
def test_external_data_outside_the_folder_is_refused(external, name, match, tmp_path, capsys):
    assert_one_line(*cli(["info", external[name]], capsys), match=match)
    run = ["run", "--engine", external[name], "--steps", 2, "--num-samples", 2, "--npz", tmp_path / "s.npz"]
    assert_one_line(
        *cli([*run, "--no-progress"], capsys), match="cannot"
    )  # onnxruntime's refusal, in our line
    assert not (tmp_path / "s.npz").exists()


@FUZZ
@given(
    location=st.one_of(
        st.text(min_size=1, max_size=40), st.sampled_from(["..", "/", "a/../../b", "./w", "~"])
    )
)
def test_fuzz_external_data_locations(external, location, capsys):
    try:
        path = _relocate(external["legit"], external["legit"].parent.parent / "fuzz" / "model.onnx", location)
    except (ValueError, OSError, onnx.checker.ValidationError):  # not even writable as ONNX: nothing to test
        return
    code, err = cli(["info", path], capsys)
    assert code in (0, 2), err
    assert_one_line(code, err, expect=code)


# ---- compressed data files ----


def _idx_gz(folder: Path, n: int, rows: int = 28, cols: int = 28, body: int = 1 << 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(struct.pack(">IIII", 0x803, n, rows, cols))
        f.write(bytes(min(body, n * rows * cols)))
    return path


def test_gzip_bomb_is_refused_before_inflating(tmp_path):
    """A 1 MB gzip whose header declares 20M 28x28 images (15.7 GB) is refused from its header, in bounded
    memory (the child's peak RSS), with the size named."""
    _idx_gz(tmp_path / "bomb", 20_000_000)
    r = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "ddpm", "train", "--data",
                        f"mnist:{tmp_path / 'bomb'}", "--out", tmp_path / "run", "--no-progress"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = r.stderr.strip().splitlines()
    peak_kib = int(lines[-1])
    err = "\n".join(line for line in lines[:-1] if not line.startswith("Command exited"))
    assert_one_line(r.returncode, err + "\n", match="its header declares 15.7 GB of data")
    assert peak_kib < 1_000_000, peak_kib  # ~300 MB of imports; the data was never inflated
    assert not (tmp_path / "run").exists()


@FUZZ
@given(n=st.integers(0, 2**32 - 1), rows=st.integers(0, 2**16), cols=st.integers(0, 2**16),
       body=st.integers(0, 4096))  # fmt: skip
def test_fuzz_compressed_idx_headers(tmp_path_factory, n, rows, cols, body, capsys):
    folder = tmp_path_factory.mktemp("idx")
    _idx_gz(folder, n, rows, cols, body)
    code, err = cli(["train", "--data", f"mnist:{folder}", "--out", folder / "run", "--iters", 1, "--batch-size", 2,
                     "--preview-samples", 0, "--no-progress", "--threads", 1], capsys)  # fmt: skip
    assert code in (0, 2), err
    assert_one_line(code, err, expect=code)
