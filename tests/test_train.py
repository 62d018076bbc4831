"""The training loop: Algorithm 1's loss, outputs of a run, exact --resume, and bad input through the CLI."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _files import read_loss_csv
from safetensors.torch import load_file

from ddpm.cli import main
from ddpm.diffusion import q_sample, v_from_x0_eps
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.models import build_model, preset_config
from ddpm.schedule import Schedule
from ddpm.trainer.checkpoint import load_model
from ddpm.trainer.data import load_dataset
from ddpm.trainer.train import STATE_NAME, BatchOrder, TrainConfig, step_seed, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tmp_path, data="swissroll", **kw):
    base = {
        "iters": 12,
        "batch_size": 32,
        "save_every": 0,
        "sample_steps": 4,
        "num_samples": 16,
        "warmup": 5,
        "progress": False,
        "seed": 3,
    }
    if data == "digits":
        base["dropout"] = 0.1  # exercise dropout's randomness in the reproducibility tests
    return TrainConfig(data=data, out=tmp_path / "run", **{**base, **kw})


def _no_tmp_files(folder):
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_first_loss_is_algorithm_1(tmp_path, prediction):
    # Reference: the step-1 loss recomputed from the definitions (the same seeded draws): x0 from batch 1,
    # t ~ U{0..T-1}, eps ~ N(0, I), loss = mean((model(q_sample(x0, t, eps), t) - target)^2).
    # Same float32 ops in the same order, so the match is exact up to summation order: rtol 1e-6.
    cfg = _cfg(tmp_path, prediction=prediction, schedule="cosine", timesteps=200, iters=1)
    seen = {}
    train(cfg, on_step=lambda k, loss: seen.setdefault(k, loss))
    torch.manual_seed(cfg.seed)
    model = build_model(preset_config("mlp"))
    sched = Schedule.cosine(200)
    ds = load_dataset("swissroll")
    x0 = ds.batch(BatchOrder(len(ds), 32, cfg.seed).indices(1))
    torch.manual_seed(step_seed(cfg.seed, 1))
    t = torch.randint(0, 200, (32,))
    eps = torch.randn_like(x0)
    target = {"eps": eps, "x0": x0, "v": v_from_x0_eps(sched, x0, t, eps)}[prediction]
    with torch.no_grad():
        ref = F.mse_loss(model(q_sample(sched, x0, t, eps), t), target).item()
    assert seen[1] == pytest.approx(ref, rel=1e-6)


def test_run_outputs(tmp_path):
    ckpt = train(_cfg(tmp_path, iters=10, save_every=4, schedule="cosine", timesteps=100, prediction="v"))
    run = tmp_path / "run"
    assert ckpt == run / "model.safetensors"
    model, meta = load_model(ckpt)
    assert meta["step"] == 10 and meta["prediction"] == "v" and meta["dataset"] == "swissroll"
    assert meta["schedule"] == Schedule.cosine(100).config and meta["sample_shape"] == [2]
    assert meta["ema_decay"] == 0.995 and meta["model"]["arch"] == "mlp"
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step_0000004.png",
        "step_0000008.png",
        "step_0000010.png",
    ]
    for name in ("samples.png", "loss.png"):
        assert (run / name).read_bytes()[:4] == b"\x89PNG"
    losses = read_loss_csv(run / "loss.csv")
    assert losses.shape == (10,) and np.all(np.isfinite(losses)) and np.all(losses > 0)
    assert (run / "config.json").is_file() and (run / STATE_NAME).is_file() and _no_tmp_files(run)


def test_same_seed_same_run_other_seed_differs(tmp_path):
    a = train(_cfg(tmp_path / "a", iters=6))
    b = train(_cfg(tmp_path / "b", iters=6))
    c = train(_cfg(tmp_path / "c", iters=6, seed=4))
    la, lb, lc = (read_loss_csv(p.parent / "loss.csv") for p in (a, b, c))
    assert np.array_equal(la, lb) and not np.array_equal(la, lc)
    wa, wb = load_file(a), load_file(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("data", ["swissroll", "digits"])
def test_resume_continues_exactly(tmp_path, data):
    # Uninterrupted: 12 steps. Interrupted: saves at 5 and 10, killed during step 11 (after its update, before
    # any save), then --resume to 12. Same loss trajectory and bitwise-equal EMA weights.
    kw = {"iters": 12, "save_every": 5, "batch_size": 16 if data == "digits" else 32}
    full = train(_cfg(tmp_path / "full", data, **kw))

    def interrupt(k, loss):
        if k == 11:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(_cfg(tmp_path / "cut", data, **kw), on_step=interrupt)
    cut = tmp_path / "cut" / "run"
    assert load_model(cut / "model.safetensors")[1]["step"] == 10
    assert read_loss_csv(cut / "loss.csv").shape == (10,)
    resumed = train(_cfg(tmp_path / "cut", data, resume=True, **kw))
    assert np.array_equal(read_loss_csv(full.parent / "loss.csv"), read_loss_csv(cut / "loss.csv"))
    wf, wr = load_file(full), load_file(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_resume_refuses_mismatch_and_corruption(tmp_path):
    train(_cfg(tmp_path, iters=4))
    with pytest.raises(
        InvalidArgumentError, match=r"--resume: option lr = 0\.5 differs from the run's 0\.001"
    ):
        train(_cfg(tmp_path, iters=8, lr=0.5, resume=True))
    with pytest.raises(InvalidArgumentError, match="already at step 4; pass --iters above it"):
        train(_cfg(tmp_path, iters=4, resume=True))
    state = tmp_path / "run" / STATE_NAME
    state.write_bytes(state.read_bytes()[:1000])
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ArtifactError, match=r"train_state\.pt: corrupt training state"):
        train(_cfg(tmp_path, iters=8, resume=True))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before
    with pytest.raises(ArtifactError, match="no training state"):
        train(_cfg(tmp_path / "fresh", iters=8, resume=True))


def test_cli_train_smoke(tmp_path, capsys):
    out = tmp_path / "r"
    args = [
        "train",
        "--data",
        "swissroll",
        "--out",
        str(out),
        "--iters",
        "3",
        "--batch-size",
        "16",
        "--sample-steps",
        "3",
        "--no-progress",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint: {out / 'model.safetensors'}" in printed and "samples.png" in printed
    assert load_model(out)[1]["step"] == 3


def _folder_of_images(path, n=2, size=12):
    from PIL import Image

    path.mkdir()
    for k in range(n):
        Image.fromarray(np.full((size, size, 3), 40 * k, np.uint8)).save(path / f"{k}.png")
    return path


@pytest.mark.parametrize(
    "args, match",
    [
        (["--data", "imagenet"], r"unknown dataset 'imagenet'; allowed: swissroll, digits"),
        (["--data", "folder:EMPTY"], r"folder: no PNG/JPEG images .* found under"),
        (
            ["--data", "folder:IMAGES", "--image-size", "30", "--model", "cifar10"],
            r"--model cifar10 with folder:.* \(3x30x30\): image size 30 is not divisible by 8",
        ),
        (["--data", "digits", "--iters", "-5"], r"--iters must be an integer >= 1, got -5"),
        (["--data", "digits", "--save-every", "-1"], r"--save-every must be an integer >= 0, got -1"),
        (["--data", "digits", "--sample-steps", "0"], r"--sample-steps must be >= 1"),
        (["--data", "digits", "--prediction", "score"], r"unknown prediction 'score'; allowed: eps, x0, v"),
        (
            ["--data", "swissroll", "--model", "tiny"],
            r"--model tiny is an image UNet; swissroll holds vectors",
        ),
        (["--data", "digits", "--resume"], r"--resume: no training state"),
        (["--data", "digits", "--device", "tpu"], r"--device must be auto, cpu or cuda"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, args, match):
    (tmp_path / "EMPTY").mkdir()
    _folder_of_images(tmp_path / "IMAGES")
    args = [
        a.replace("EMPTY", str(tmp_path / "EMPTY")).replace("IMAGES", str(tmp_path / "IMAGES")) for a in args
    ]
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress", "--threads", "1", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("ddpm: error: ") and __import__("re").search(match, err), err
    assert not out.exists()  # nothing written, not even the run folder


def test_cli_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--data", "digits", "--out", str(blocker / "run"), "--no-progress"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert main(["train", "--data", "digits", "--out", str(ro / "run"), "--no-progress"]) == 2
        assert "is not writable" in capsys.readouterr().err
        assert list(ro.iterdir()) == []


@pytest.mark.gpu
def test_cuda_bf16_training_loads_on_cpu(tmp_path):
    ckpt = train(_cfg(tmp_path, "digits", iters=5, device="cuda", batch_size=16))
    model, meta = load_model(ckpt)
    x = torch.randn(2, 1, 8, 8)
    assert torch.isfinite(model(x, torch.tensor([0, 999]))).all() and meta["step"] == 5
