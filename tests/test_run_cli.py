"""``ddpm run`` end to end on tiny exported models: outputs, summary, and one-line errors with exit code 2."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _runtime_models import shared_artifacts

from ddpm.cli import main
from ddpm.images import to_uint8_nhwc
from ddpm.runtime.sampling import sample


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def _ok(args, capsys):
    # one inference thread: these models are tiny, and a busy 2-core machine punishes OpenMP barriers
    code = main(["run", "--threads", "1", *map(str, args)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_images_png_and_npz(art, tmp_path, capsys):
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    out, _ = _ok(
        [
            "--engine",
            art["unet"][1],
            "--steps",
            20,
            "--num-samples",
            5,
            "--batch",
            2,
            "--seed",
            9,
            "--out",
            png,
            "--npz",
            npz,
            "--no-progress",
        ],
        capsys,
    )
    assert "backend: onnxruntime on cpu [onnxruntime" in out and "CPUExecutionProvider" in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith(
        "backend=onnxruntime device=cpu steps=20 batch=2 samples=5 kernel=fused seconds="
    )
    assert "samples/s=" in summary
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arr = np.load(npz)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 1)
    # the CLI writes exactly what the Python API returns
    want = to_uint8_nhwc(sample(art["unet"][1], 5, steps=20, batch=5, seed=9, device="cpu"))
    np.testing.assert_array_equal(arr, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.png"]  # no temp files left


def test_points_npz_only_and_checkpoint_backend(art, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, _ = _ok(
        [
            "--engine",
            art["mlp"][0],
            "--steps",
            30,
            "--num-samples",
            7,
            "--batch",
            4,
            "--npz",
            "p.npz",
            "--no-progress",
        ],
        capsys,
    )
    assert "backend: torch on cpu" in out and out.strip().splitlines()[-1].startswith(
        "backend=torch device=cpu"
    )
    arr = np.load(tmp_path / "p.npz")["arr_0"]
    assert arr.dtype == np.float32 and arr.shape == (7, 2)
    want = sample(art["mlp"][0], 7, steps=30, batch=4, device="cpu").numpy()
    np.testing.assert_array_equal(arr, want)
    assert not (tmp_path / "samples.png").exists()  # --npz alone writes no PNG


def test_default_output_is_samples_png_with_progress(art, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, err = _ok(["--engine", art["mlp"][1], "--steps", 10, "--num-samples", 3], capsys)
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert "sampling" in err and "10/10" in err  # the progress bar (stderr), one batch of 10 steps


def test_reference_kernel_and_ddim_options(art, tmp_path, capsys):
    npz = tmp_path / "r.npz"
    out, _ = _ok(
        [
            "--engine",
            art["mlp"][1],
            "--steps",
            25,
            "--num-samples",
            4,
            "--sampler",
            "ddim",
            "--eta",
            0.5,
            "--clip",
            1.0,
            "--kernel",
            "reference",
            "--npz",
            npz,
            "--no-progress",
        ],
        capsys,
    )
    assert "kernel=reference" in out
    want = sample(
        art["mlp"][1], 4, steps=25, sampler="ddim", eta=0.5, clip=1.0, kernel="reference", device="cpu"
    )
    np.testing.assert_array_equal(np.load(npz)["arr_0"], want.numpy())


# ---- bad input: one line on stderr, exit code 2, nothing written ----


def _onnx_with_metadata(src, dst, edit):
    import onnx

    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    del model.metadata_props[:]
    for k, v in edit(props).items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def bad_files(art, tmp_path_factory):
    import json

    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("not a model")
    (d / "garbage.onnx").write_bytes(os.urandom(2048))
    (d / "empty.safetensors").write_bytes(b"")
    _onnx_with_metadata(art["mlp"][1], d / "nometa.onnx", lambda p: {})

    def wrong_shape(p):
        return {**p, "sample_shape": json.dumps([3])}  # the MLP config says dim 2

    _onnx_with_metadata(art["mlp"][1], d / "inconsistent.onnx", wrong_shape)
    return d


def _bad(args, capsys, tmp_path, match):
    before = set(tmp_path.iterdir())
    code = main(["run", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddpm: error:"), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    assert set(tmp_path.iterdir()) == before  # no output, no temp file


@pytest.mark.parametrize(
    "engine, match",
    [
        ("missing.onnx", "does not exist"),
        ("notes.txt", "unknown extension '.txt'"),
        ("garbage.onnx", "not a readable ONNX model"),
        ("empty.safetensors", "not a readable safetensors checkpoint"),
        ("nometa.onnx", "no ddpm metadata found"),
        ("inconsistent.onnx", "sample_shape [3] does not match the mlp config [2]"),
    ],
)
def test_bad_engine(bad_files, engine, match, tmp_path, capsys):
    _bad(["--engine", bad_files / engine, "--out", tmp_path / "s.png"], capsys, tmp_path, match)


@pytest.mark.parametrize(
    "extra, match",
    [
        # refused by the options before the model is read; 1001 is refused by the model's T
        (
            ["--steps", "0"],
            "--steps must be an integer >= 1 (and at most the model's T, <= 100000), got 0",
        ),
        (["--steps", "1001"], "steps must be an integer in 1..1000, got 1001"),
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
        (["--eta", "-1"], "eta must be a finite number >= 0, got -1.0"),
        (["--sampler", "euler"], "unknown sampler 'euler'; allowed: ddpm, ddim"),
        (["--variance", "learned"], "unknown variance 'learned'"),
        (["--kernel", "triton"], "unknown kernel 'triton'; allowed: fused, reference"),
        (["--clip", "0"], "clip must be a positive number"),
        (["--seed", "-3"], "seed must be an integer in [0, 2^64), got -3"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--threads", "0"], "threads must be an integer >= 1"),
        (["--out", "/nonexistent-dir/s.png"], "--out folder '/nonexistent-dir' does not exist"),
        (["--out", "{tmp}/s.jpg"], "must be a .png file"),
        (["--npz", "{tmp}/s.txt"], "--npz"),
        (["--npz", "/nonexistent-dir/s.npz"], "--npz folder '/nonexistent-dir' does not exist"),
    ],
)
def test_bad_options(art, extra, match, tmp_path, capsys):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    args = ["--engine", art["mlp"][1], "--steps", "5", "--no-progress"]
    if "--out" not in extra:
        args += ["--out", tmp_path / "s.png"]
    _bad([*args, *extra], capsys, tmp_path, match)


def test_out_is_a_directory(art, tmp_path, capsys):
    (tmp_path / "d.png").mkdir()
    _bad(["--engine", art["mlp"][1], "--out", tmp_path / "d.png"], capsys, tmp_path, "is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_read_only_folder(art, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _bad(["--engine", art["mlp"][1], "--out", ro / "s.png"], capsys, tmp_path, "is not writable")
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("extra", [["--device", "cuda"], ["--cuda-graph"]])
def test_cuda_without_gpu(art, extra, tmp_path, capsys):
    match = "torch sees no CUDA GPU" if "--device" in extra else "--cuda-graph needs a CUDA device"
    _bad(["--engine", art["mlp"][1], "--out", tmp_path / "s.png", *extra], capsys, tmp_path, match)


def test_ddpm_debug_shows_the_traceback(art, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_DEBUG", "1")
    from ddpm.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        main(["run", "--engine", str(art["mlp"][1]), "--steps", "0", "--out", str(tmp_path / "s.png")])
