"""A new user's first hour: defaults chosen from the data and the device, a run header with every setting and an
estimate, progress without a terminal, LR schedules, gradient accumulation, TensorBoard, the sampling settings a
checkpoint recommends to `ddpm run`, and output permissions."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ddpm
from ddpm.checkpoint import read_checkpoint_metadata
from ddpm.cli import app, main
from ddpm.errors import ArtifactError, MissingDependencyError
from ddpm.metadata import decode_metadata, encode_metadata, recommended_sampling
from ddpm.trainer.config import TrainConfig
from ddpm.trainer.data import load_dataset
from ddpm.trainer.presets import PRESET_DEFAULTS, choose_preset
from ddpm.trainer.progress import TrainProgress
from ddpm.trainer.report import estimate_line, smaller_hint
from ddpm.trainer.tblog import require_tensorboard
from ddpm.trainer.train import _lr_at, train

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pngs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return folder


@pytest.mark.parametrize(
    ("shape", "device", "preset"),
    [
        ([2], "cpu", "mlp"),
        ([1, 8, 8], "cpu", "tiny"),
        ([3, 16, 16], "cpu", "tiny"),
        ([3, 32, 32], "cpu", "small"),
        ([3, 16, 16], "cuda", "small"),
        ([1, 28, 28], "cuda", "mnist"),
        ([3, 32, 32], "cuda", "cifar10"),
        ([3, 64, 64], "cuda", "cifar10"),
    ],
)
def test_preset_follows_the_data_and_the_device(shape, device, preset):
    assert choose_preset(shape, device)[0] == preset


def test_defaults_come_from_the_preset_and_given_options_win(tmp_path):
    cfg, origin = TrainConfig(data="folder:x", out=tmp_path).resolved([3, 16, 16], "cpu")
    tiny = PRESET_DEFAULTS["tiny"]
    assert (cfg.model, cfg.lr, cfg.batch_size, cfg.iters, cfg.ema_decay) == (
        "tiny", tiny["lr"], tiny["batch_size"], tiny["iters"], tiny["ema_decay"]
    )  # fmt: skip
    assert origin["model"] == "auto: 3x16x16 images on cpu" and origin["lr"] == "preset tiny"
    assert cfg.warmup == 200 and cfg.flip is False  # min(200, 1500/5); flips are opt-in for a folder
    # an explicit preset brings its own settings; an explicit option wins over the preset
    cfg, origin = TrainConfig(data="folder:x", out=tmp_path, model="small", lr=3e-4, iters=300).resolved(
        [3, 16, 16], "cpu"
    )
    assert cfg.lr == 3e-4 and cfg.ema_decay == PRESET_DEFAULTS["small"]["ema_decay"] and cfg.warmup == 60
    assert "model" not in origin and "lr" not in origin and origin["ema_decay"] == "preset small"


def test_help_documents_the_rule_and_every_preset_default():
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    text = " ".join(out.replace("│", " ").split())
    assert "images on CPU: tiny up to 16 px, small above" in text
    for name, d in PRESET_DEFAULTS.items():
        assert (
            f"{name}: {d['iters']} iters, batch {d['batch_size']}, lr {d['lr']:g}, EMA {d['ema_decay']:g}"
            in text
        )
    assert "--progress" in text and "--no-progress" in text and "--quiet" not in text


def test_run_header_estimate_and_plain_progress_without_a_terminal(tmp_path):
    # A subprocess with stderr on a pipe (not a TTY): header, estimate, then plain progress lines at the interval.
    data = _pngs(tmp_path / "pngs", 12, (10, 8))
    env = {**os.environ, "DDPM_PROGRESS_INTERVAL": "0.05", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "ddpm.cli",
        "train",
        "--data",
        f"folder:{data}",
        "--out",
        str(tmp_path / "run"),
    ]
    r = subprocess.run(
        [*cmd, "--iters", "40", "--sample-steps", "3", "--num-samples", "4", "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "model      tiny [auto: 3x8x8 images on cpu]" in err  # the images' own size (8 px), not 32
    assert "lr 0.002 [preset tiny]" in err and "warm-up 8 [min(200, iters/5)]" in err and "flips off" in err
    assert "estimate: 36 more steps" in err and "GiB peak" in err and "MB train_state.pt" in err
    steps = [int(line.split()[1].split("/")[0]) for line in err.splitlines() if line.startswith("step ")]
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] == 40
    assert "\x1b[" not in err  # no terminal control codes in a log


def test_plain_progress_prints_at_the_interval_only(capsys):
    with TrainProgress("head", total=10, enabled=True, terminal=False, interval=3600) as bar:
        for k in range(1, 11):
            bar.update(k, 0.5)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "head" and len(lines) == 2 and lines[1].startswith("step 10/10 (100%)")  # only the end
    with TrainProgress("head", total=5, enabled=True, terminal=False, interval=1e-9) as bar:
        for k in range(1, 6):
            bar.update(k, 0.5)
    assert len(capsys.readouterr().err.splitlines()) == 6


def test_lr_schedules(tmp_path):
    cfg, _ = TrainConfig(data="swissroll", out=tmp_path, lr=1.0, iters=110, warmup=10).resolved([2], "cpu")
    assert [_lr_at(cfg, k) for k in (1, 5, 10, 60, 110)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    cfg.lr_schedule = "cosine"
    got = [_lr_at(cfg, k) for k in (5, 10, 60, 110)]
    assert got[:2] == [0.5, 1.0] and math.isclose(got[2], 0.5, rel_tol=1e-12) and abs(got[3]) < 1e-12
    assert "lr_schedule" in cfg.trajectory()  # a cosine run resumes only as cosine


def test_grad_accumulation_is_the_same_step(tmp_path):
    # Micro-batches weighted by their share of the rows add up to the full batch's gradient: the same losses and
    # weights up to float32 summation order (stated tolerance 1e-5 relative on the losses, 1e-4 on weights).
    runs = {}
    for n in (1, 4):
        losses: list[float] = []
        cfg = TrainConfig(
            data="swissroll", out=tmp_path / f"a{n}", iters=8, batch_size=64, grad_accum=n, warmup=2,
            sample_steps=2, num_samples=8, progress=False, seed=5,
        )  # fmt: skip
        train(cfg, on_step=lambda k, v, out=losses: out.append(v))
        runs[n] = (losses, ddpm.load_model(tmp_path / f"a{n}" / "model.safetensors")[0].state_dict())
    np.testing.assert_allclose(runs[4][0], runs[1][0], rtol=1e-5)
    for k, w in runs[1][1].items():
        torch.testing.assert_close(runs[4][1][k], w, rtol=1e-4, atol=1e-6)
    assert main(["train", "--data", "swissroll", "--out", str(tmp_path / "b"), "--batch-size", "30",
                 "--grad-accum", "4", "--no-progress"]) == 2  # fmt: skip


def test_tensorboard_scalars_and_samples(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(
        data="digits", out=tmp_path / "run", iters=6, batch_size=16, sample_steps=2, num_samples=4,
        progress=False, log_dir=tmp_path / "tb",
    )  # fmt: skip
    train(cfg)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(tags["scalars"]) and "samples" in tags[
        "images"
    ]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))
    assert all(e.value > 0 for e in acc.Scalars("train/grad_norm"))


def test_log_dir_without_tensorboard_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match="pip install tensorboard"):
        require_tensorboard()
    code = main(
        ["train", "--data", "digits", "--out", str(tmp_path / "r"), "--log-dir", str(tmp_path / "tb")]
    )
    assert code == 2 and "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_run_uses_the_recommended_sampling_and_says_so(tmp_path, capsys):
    ckpt = train(
        TrainConfig(
            data="digits",
            out=tmp_path / "run",
            iters=3,
            batch_size=8,
            sample_steps=7,
            num_samples=2,
            progress=False,
        )  # fmt: skip
    )
    meta = read_checkpoint_metadata(ckpt)
    assert meta["sampling"] == {
        "sampler": "dpm++2m",
        "steps": 7,
        "clip": 1.0,
    }  # previews use the fast sampler
    assert recommended_sampling(meta) == {"sampler": "dpm++2m", "steps": 7, "clip": 1.0}
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "u.onnx")]) == 0
    capsys.readouterr()
    args = [
        "run",
        "--engine",
        str(tmp_path / "u.onnx"),
        "--num-samples",
        "2",
        "--no-progress",
        "--threads",
        "1",
    ]
    assert main([*args, "--npz", str(tmp_path / "a.npz")]) == 0
    out = capsys.readouterr().out
    assert "defaults from the model" in out and "--sampler dpm++2m --steps 7 --clip 1" in out
    assert "steps=7" in out
    assert main([*args, "--steps", "3", "--clip", "inf", "--npz", str(tmp_path / "b.npz")]) == 0
    out = capsys.readouterr().out
    assert "--sampler dpm++2m;" in out and "steps=3" in out
    # the library's sample() keeps its explicit defaults (T steps, no clipping)
    x = ddpm.sample(ckpt, 1, steps=None, device="cpu")
    assert x.shape == (1, 1, 8, 8)


def test_hostile_sampling_metadata_is_refused():
    base = {
        "format": "ddpm/1",
        "model": {"arch": "mlp", "dim": 2, "hidden": 8, "time_dim": 8, "depth": 1},
        "schedule": {"kind": "linear", "timesteps": 10, "beta_start": 1e-4, "beta_end": 0.02},
        "prediction": "eps", "sample_shape": [2], "dataset": "x", "step": 1,
    }  # fmt: skip
    good = encode_metadata({**base, "sampling": {"sampler": "ddim", "steps": 5, "clip": None}})
    assert recommended_sampling(decode_metadata(good, source="f")) == {
        "sampler": "ddim",
        "steps": 5,
        "clip": None,
    }
    for bad in (
        '{"sampler": "magic", "steps": 5}',
        '{"sampler": "ddpm", "steps": -1}',
        '{"steps": 5}',
        "[1]",
    ):
        with pytest.raises(ArtifactError, match="^f: "):
            decode_metadata({**good, "sampling": bad}, source="f")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_every_output_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        cfg = TrainConfig(data="digits", out=run, iters=2, batch_size=8, sample_steps=2, num_samples=2,
                          progress=False)  # fmt: skip
        ckpt = train(cfg)
        assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "u.onnx")]) == 0
        assert main(["run", "--engine", str(tmp_path / "u.onnx"), "--num-samples", "2", "--steps", "2",
                     "--no-progress", "--npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "s.png")]) == 0  # fmt: skip
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {
        "model.safetensors",
        "train_state.pt",
        "config.json",
        "u.onnx",
        "s.npz",
    }
    wrong = {
        str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
        for p in files
        if p.stat().st_mode & 0o777 != mode
    }
    assert not wrong, wrong


def test_folder_trains_at_the_images_own_size(tmp_path):
    assert load_dataset(f"folder:{_pngs(tmp_path / 'a', 3, (16, 16))}").sample_shape == [3, 16, 16]
    assert load_dataset(f"folder:{_pngs(tmp_path / 'b', 2, (40, 24))}").sample_shape == [
        3,
        24,
        24,
    ]  # smallest side
    assert load_dataset(f"folder:{_pngs(tmp_path / 'c', 1, (300, 200))}").sample_shape == [
        3,
        64,
        64,
    ]  # capped
    assert load_dataset(f"folder:{tmp_path / 'c'}", image_size=32).sample_shape == [3, 32, 32]


def test_estimate_and_the_smaller_preset_hint(tmp_path):
    cfg, _ = TrainConfig(data="folder:x", out=tmp_path, model="small", iters=1000).resolved([3, 8, 8], "cpu")
    line = estimate_line(
        cfg, per_step=2.0, measured="steps 2-4", steps_left=996, params=2_500_000, memory=2**30
    )
    assert line.startswith("estimate: 996 more steps ~ 33m12s at 2 s/step (measured over steps 2-4)")
    assert "memory 1.00 GiB peak" in line and "10.0 MB model.safetensors + 40.0 MB train_state.pt" in line
    cpu = torch.device("cpu")
    assert smaller_hint(cfg, [3, 8, 8], cpu, total=60.0) is None  # a short run needs no hint
    hint = smaller_hint(cfg, [3, 8, 8], cpu, total=3600.0)
    assert hint is not None and hint.startswith(
        "hint: that is long on a CPU; --model tiny (0.70M params) measures"
    )


def test_resume_keeps_the_saved_runs_defaults(tmp_path):
    # The default warm-up follows --iters (min(200, iters/5)); a resumed run keeps the saved one, so extending a
    # 10-step run to 20 steps equals an uninterrupted 20-step run with the same warm-up, loss for loss.
    from _files import read_loss_csv

    base = {"data": "swissroll", "batch_size": 32, "sample_steps": 2, "num_samples": 8, "progress": False}
    train(TrainConfig(out=tmp_path / "a", iters=10, **base))  # warm-up 2
    train(TrainConfig(out=tmp_path / "a", iters=20, resume=True, **base))  # its own default would be 4
    train(TrainConfig(out=tmp_path / "b", iters=20, warmup=2, **base))
    np.testing.assert_allclose(
        read_loss_csv(tmp_path / "a" / "loss.csv"), read_loss_csv(tmp_path / "b" / "loss.csv")
    )
    with pytest.raises(Exception, match="option warmup = 3 differs from the run's 2"):
        train(TrainConfig(out=tmp_path / "a", iters=30, resume=True, warmup=3, **base))
