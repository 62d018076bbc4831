"""Hostile and broken inputs: one test per probe of the issue. Each ends in one stderr line and exit 2 (143 for
SIGTERM), leaves nothing half-written, and allocates nothing a real model would not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _hostile import (
    assert_one_line,
    cli,
    leftovers,
    npz_rows,
    raw_strings,
    write_checkpoint,
    write_engine,
    write_onnx,
)

from ddpm.artifacts import sidecar_path
from ddpm.io import atomic_path, remove_stale_temps, write_text_atomic
from ddpm.runtime.backends.base import Backend

UNET_BOMB = {"arch": "unet", "in_channels": 1, "image_size": 16384, "base_channels": 8, "channel_mult": [1]}


# ---- memory bombs from metadata or options ----


@pytest.mark.parametrize(
    "key, value, match",
    [
        (
            "model",
            {"arch": "mlp", "dim": 2, "depth": 10_000_000},
            "'depth' must be a positive integer <= 1024",
        ),
        ("model", {"arch": "mlp", "dim": 2, "hidden": 65536, "depth": 1024}, "parameters; at most"),
        (
            "schedule",
            {"kind": "linear", "timesteps": 300_000_000, "beta_start": 1e-4, "beta_end": 0.02},
            "100000",
        ),
        ("schedule", {"kind": "custom", "betas": [0.01] * 200_000}, "list of 1..100000 items"),
    ],
)
def test_checkpoint_metadata_bombs_are_refused_before_allocation(tmp_path, capsys, key, value, match):
    ckpt = write_checkpoint(tmp_path / "bomb.safetensors", raw_strings(**{key: json.dumps(value)}))
    for cmd in (["info", ckpt], ["run", "--engine", ckpt, "--out", tmp_path / "s.png"]):
        assert_one_line(*cli(cmd, capsys), match=match)
    assert not (tmp_path / "s.png").exists()


def test_tiny_onnx_claiming_a_huge_sample_is_refused(tmp_path, capsys):
    strings = raw_strings(model=json.dumps(UNET_BOMB), sample_shape="[1, 16384, 16384]")
    onnx_path = write_onnx(tmp_path / "bomb.onnx", strings)
    assert onnx_path.stat().st_size < 2000
    for cmd in (["info", onnx_path], ["run", "--engine", onnx_path, "--out", tmp_path / "s.png"]):
        assert_one_line(*cli(cmd, capsys), match="sample_shape")


@pytest.mark.parametrize(
    "args, match",
    [
        (["schedule", "--timesteps", "100000000"], "<= 100000"),
        (["run", "--num-samples", "99999999999999999999"], "--num-samples must be <= 4294967296"),
        (["run", "--batch", "99999999999", "--num-samples", "200000000"], "values per batch tensor"),
    ],
)
def test_option_bombs_are_refused(mlp_ckpt, tmp_path, capsys, args, match):
    if args[0] == "run":
        args = [*args, "--engine", mlp_ckpt, "--out", tmp_path / "s.png"]
    assert_one_line(*cli(args, capsys), match=match)
    assert leftovers(tmp_path) == [] and not (tmp_path / "s.png").exists()


def test_samples_stream_to_the_npz_and_the_png_keeps_a_few(tmp_path):
    import contextlib

    from ddpm.runtime.sample_sink import PNG_MAX_IMAGES, SampleSink

    with contextlib.ExitStack() as stack:
        sink = SampleSink(stack, tmp_path / "a.npz", 600, png=True)
        sink.open((1, 4, 4))
        for offset in range(0, 600, 100):
            sink(offset, torch.zeros(100, 1, 4, 4))
    assert sink.preview().shape[0] == PNG_MAX_IMAGES
    assert npz_rows(tmp_path / "a.npz").shape == (600, 4, 4, 1)


def test_run_checks_disk_space_before_sampling(mlp_ckpt, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10, 10, 10))
    npz = tmp_path / "s.npz"
    args = [
        "run",
        "--engine",
        mlp_ckpt,
        "--npz",
        npz,
        "--num-samples",
        "4000",
        "--steps",
        "2",
        "--no-progress",
    ]
    assert_one_line(*cli(args, capsys), match="GB free")
    assert not npz.exists() and leftovers(tmp_path) == []


def test_streamed_npz_matches_a_valid_run(mlp_ckpt, tmp_path, capsys):
    npz = tmp_path / "s.npz"
    args = [
        "run",
        "--engine",
        mlp_ckpt,
        "--npz",
        npz,
        "--num-samples",
        "300",
        "--batch",
        "64",
        "--steps",
        "2",
    ]
    code, err = cli([*args, "--no-progress"], capsys)
    assert code == 0, err
    rows = npz_rows(npz)
    assert rows.shape == (300, 2) and rows.dtype == np.float32 and np.isfinite(rows).all()


# ---- wrong types and shapes in metadata ----


@pytest.mark.parametrize(
    "key, value",
    [
        ("schedule", '{"kind": "linear", "timesteps": "abc", "beta_start": 0.0001, "beta_end": 0.02}'),
        ("schedule", '{"kind": "linear", "timesteps": null, "beta_start": 0.0001, "beta_end": 0.02}'),
        ("schedule", '{"kind": "linear", "timesteps": NaN, "beta_start": 0.0001, "beta_end": 0.02}'),
        ("schedule", '{"kind": "custom", "betas": ["0.1", "0.2"]}'),
        ("schedule", '{"kind": "custom", "betas": [[0.1], [0.2]]}'),
        ("model", '{"arch": "unet", "in_channels": 1, "image_size": 8, "channel_mult": 4}'),
        ("model", '{"arch": "unet", "in_channels": 1, "image_size": 8, "dropout": "abc"}'),
        ("model", "[" * 100_000 + "]" * 100_000),
        ("sample_shape", "[2.5]"),
        ("step", "-1"),
        ("ema_decay", '"x"'),
    ],
)
def test_mistyped_metadata_is_one_line_in_every_artifact(tmp_path, capsys, key, value):
    strings = raw_strings(**{key: value})
    ckpt = write_checkpoint(tmp_path / "m.safetensors", strings)
    onnx_path = write_onnx(tmp_path / "m.onnx", strings)
    decoded = json.loads(value) if len(value) < 1000 and value[:1] in '[{-"' else value
    engine = write_engine(tmp_path / "m.trt", **{key: decoded})
    for path in (ckpt, onnx_path, engine):
        assert_one_line(*cli(["info", path], capsys))
    for path in (ckpt, onnx_path):  # info and run accept and refuse the same metadata
        assert_one_line(*cli(["run", "--engine", path, "--out", tmp_path / "s.png"], capsys))


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("profile", {"min": 1, "opt": 2, "max": 10**30}, "'profile' must be"),
        ("profile", [1, 2, 3], "'profile' must be"),
        ("engine_bytes", "big", "sidecar.engine_bytes must be an integer"),
        ("gpu_name", ["x"], "sidecar.gpu_name must be a string"),
        ("version_compatible", "yes", "must be true or false"),
    ],
)
def test_mistyped_sidecar_facts(tmp_path, capsys, key, value, match):
    engine = write_engine(tmp_path / "e.trt", **{key: value})
    assert_one_line(*cli(["info", engine], capsys), match=match)


# ---- a model whose output disagrees with its metadata ----


class _Wrong(Backend):
    name, capturable = "wrong", False

    def __init__(self, out_fn) -> None:
        self.out_fn, self.source = out_fn, "wrong.bin"
        super().__init__({"sample_shape": [2]}, torch.device("cpu"), description="test")

    def _infer(self, x, t):
        return self.out_fn(x)

    def _release(self) -> None:
        pass


@pytest.mark.parametrize(
    "out_fn, match",
    [
        (lambda x: torch.cat([x, x], 1), r"output has shape \[3, 4\]"),
        (lambda x: x[:, :1], r"output has shape \[3, 1\]"),
        (lambda x: torch.cat([x, x], 0), r"output has shape \[6, 2\]"),
        (lambda x: x.double(), "output is torch.float64, expected float32"),
    ],
)
def test_backend_checks_the_output_on_its_first_call(out_fn, match):
    from ddpm.errors import ArtifactError

    b = _Wrong(out_fn)
    with pytest.raises(ArtifactError, match=f"wrong.bin: the model {match}"):
        b(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("output", ["wider", "narrower", "batch2", "float64"])
def test_onnx_model_with_a_wrong_output_is_one_line(tmp_path, capsys, output):
    onnx_path = write_onnx(tmp_path / f"{output}.onnx", raw_strings(), output=output)
    args = ["run", "--engine", onnx_path, "--out", tmp_path / "s.png", "--steps", "2", "--num-samples", "3"]
    args.append("--no-progress")
    assert_one_line(*cli(args, capsys), match=str(onnx_path))
    assert leftovers(tmp_path) == [] and not (tmp_path / "s.png").exists()


# ---- train_state.pt that unpickles but holds the wrong things ----


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from ddpm.cli import main

    out = tmp_path_factory.mktemp("hostile_train") / "run"
    args = ["train", "--data", "swissroll", "--out", str(out), "--iters", "2", "--batch-size", "8"]
    assert main([*args, "--sample-steps", "2", "--num-samples", "8", "--no-progress", "--threads", "1"]) == 0
    return out


def _train_args(out):
    return ["train", "--data", "swissroll", "--out", out, "--batch-size", "8", "--sample-steps", "2"]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: [s], "not a ddpm training state"),
        (lambda s: {**s, "step": -1}, "state.step must be an integer"),
        (lambda s: {**s, "version": torch.tensor(1)}, "state.version must be an integer"),
        (lambda s: {**s, "model": [1, 2]}, "state.model must be a dict"),
        (lambda s: {**s, "losses": "x"}, "state.losses must be a 1-D float tensor"),
        (lambda s: {**s, "trajectory": "[" * 5000}, "state.trajectory nests deeper"),
        (lambda s: {**s, "optimizer": {"state": {}, "param_groups": "x"}}, "param_groups"),
        (lambda s: {**s, "optimizer": {**s["optimizer"], "state": {0: {"exp_avg": torch.zeros(3)}}}}, "fit"),
    ],
)
def test_resume_validates_the_state(trained_run, tmp_path, capsys, edit, match):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    state_path = out / "train_state.pt"
    torch.save(edit(torch.load(state_path, weights_only=True)), state_path)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    args = [
        *_train_args(out),
        "--resume",
        "--iters",
        "4",
        "--num-samples",
        "8",
        "--no-progress",
        "--threads",
        "1",
    ]
    assert_one_line(*cli(args, capsys), match=match)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


# ---- data sets, image size, full disk ----


def test_png_decompression_bomb_is_refused(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("1", (9000, 9000)).save(folder / "bomb.png")  # ~10 KB on disk, 81M pixels
    args = ["train", "--data", f"folder:{folder}", "--out", tmp_path / "run", "--no-progress"]
    assert_one_line(*cli(args, capsys), match="bomb.png")
    assert not (tmp_path / "run").exists()


def test_image_size_beyond_the_cap(tmp_path, capsys):
    args = ["train", "--data", "digits", "--image-size", "4096", "--out", tmp_path / "run", "--no-progress"]
    assert_one_line(*cli(args, capsys), match="--image-size must be a positive integer <= 1024")


def test_full_disk_during_training_is_one_line(trained_run, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10, 10, 10))
    out = tmp_path / "run"
    args = [*_train_args(out), "--iters", "2", "--num-samples", "8", "--no-progress", "--threads", "1"]
    assert_one_line(*cli(args, capsys), match="GB free")
    assert leftovers(out) == [] and not (out / "model.safetensors").exists()


# ---- interrupted writes ----


def test_sigterm_removes_partial_outputs_and_exits_143(mlp_ckpt, tmp_path):
    npz = tmp_path / "s.npz"
    code = (
        "import sys; from ddpm.cli import main; sys.exit(main(["
        f"'run', '--engine', {str(mlp_ckpt)!r}, '--npz', {str(npz)!r}, '--num-samples', '100000000', "
        "'--batch', '64', '--steps', '50', '--no-progress']))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert leftovers(tmp_path), "the npz temp file never appeared"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert_one_line(proc.returncode, err, expect=143, match="terminated")
    assert leftovers(tmp_path) == [] and not npz.exists()


def test_stale_temp_files_are_removed_on_the_next_write(tmp_path):
    dead = tmp_path / ".model.safetensors.999999999.abcd1234.tmp"
    old = tmp_path / ".loss.csv.abcd_xyz.tmp"
    live = tmp_path / f".config.json.{os.getpid()}.zz99zz99.tmp"
    other = tmp_path / ".notes.txt.swp"
    for p in (dead, old, live, other):
        p.write_text("x")
    os.utime(old, (0, 0))
    write_text_atomic(tmp_path / "config.json", "{}")
    assert not dead.exists() and not old.exists() and live.exists() and other.exists()
    with atomic_path(tmp_path / "x.bin") as tmp:
        assert str(os.getpid()) in tmp.name
        assert remove_stale_temps(tmp_path) == []  # a live writer's file is kept


# ---- never lose a run ----


def test_train_refuses_an_existing_run_without_resume_or_overwrite(trained_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = (out / "model.safetensors").read_bytes()
    args = [*_train_args(out), "--iters", "2", "--num-samples", "8", "--no-progress", "--threads", "1"]
    assert_one_line(*cli(args, capsys), match="already holds a run")
    assert (out / "model.safetensors").read_bytes() == before
    code, err = cli([*args, "--overwrite"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("save_every, what", [("1", "sample to NaN/Inf"), ("0", "the loss is")])
def test_diverging_training_stops_and_keeps_the_last_good_checkpoint(
    trained_run, tmp_path, capsys, save_every, what
):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = (out / "model.safetensors").read_bytes()
    args = [*_train_args(out), "--iters", "30", "--save-every", save_every, "--lr", "1e30", "--warmup", "0"]
    code, err = cli([*args, "--overwrite", "--num-samples", "8", "--no-progress", "--threads", "1"], capsys)
    assert_one_line(code, err, match="training diverged at step")
    assert what in err and "nothing of this run was saved" in err
    assert (out / "model.safetensors").read_bytes() == before and leftovers(out) == []


# ---- messages that said the wrong thing ----


def test_sidecar_that_is_a_directory(tmp_path, capsys):
    engine = write_engine(tmp_path / "e.trt")
    side = sidecar_path(engine)
    side.unlink()
    side.mkdir()
    assert_one_line(*cli(["info", engine], capsys), match="not a regular file")


@pytest.mark.parametrize(
    "args, match",
    [
        (["--data", "swissroll", "--model", "resnet"], "unknown model preset 'resnet'"),
        (["--data", "digits", "--timesteps", "0"], "--timesteps must be an integer in 1..100000"),
        (["--data", "digits", "--lr", "nan"], "--lr must be a positive number"),
        (["--data", "digits", "--resume", "--overwrite"], "give one"),
    ],
)
def test_train_messages_name_the_right_option(tmp_path, capsys, args, match):
    assert_one_line(*cli(["train", "--out", tmp_path / "run", "--no-progress", *args], capsys), match=match)
    assert not (tmp_path / "run").exists()


def test_schedule_plot_must_be_png(tmp_path, capsys):
    assert_one_line(*cli(["schedule", "--plot", tmp_path / "p.jpg"], capsys), match="must be a .png file")
    assert not (tmp_path / "p.jpg").exists()


def test_usage_errors_are_one_line(capsys):
    assert_one_line(*cli(["schedule", "--timesteps", "abc"], capsys), match="Invalid value for '--timesteps'")


def test_unexpected_errors_exit_1_with_a_hint(capsys, monkeypatch):
    import ddpm.runtime.cli_schedule as mod

    monkeypatch.setattr(mod, "schedule_table", lambda *a, **k: 1 / 0)
    assert_one_line(*cli(["schedule"], capsys), expect=1, match="set DDPM_DEBUG=1 for the traceback")


@pytest.fixture(scope="module")
def mlp_ckpt(tmp_path_factory) -> Path:
    from _runtime_models import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("hostile_ckpt"), "mlp")
