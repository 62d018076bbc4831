"""torchrun training and sharded sampling (CPU, Gloo): each equals one process with the same global batch/seed.

Tolerances: the 2-rank loss of step k is the mean of two shard means where one process takes the mean of the
whole batch, and DDP sums two partial gradients; both only reorder float32 sums, so each loss agrees to a few
float32 ulps and the weights drift apart only through that rounding (measured: losses <= 1.2e-7 relative,
EMA weights 6.9e-9 relative after 14 steps). The tests allow 1e-5 and 1e-4. Sampling is bitwise: every shard
draws the noise of its global sample indices.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _files import torchrun_failure
from _runtime_models import shared_artifacts

import ddpm
from ddpm.cli import app, main
from ddpm.errors import InvalidArgumentError
from ddpm.runtime import cli_merge
from ddpm.runtime.shard import Shard
from ddpm.trainer.checkpoint import STATE_NAME
from ddpm.trainer.distributed import DistContext, from_env
from ddpm.trainer.train import TrainConfig, train

TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2"]
TRAIN = [
    "--data",
    "digits",
    "--batch-size",
    "32",
    "--sample-steps",
    "2",
    "--num-samples",
    "4",
    "--threads",
    "1",
    "--warmup",  # given: the default warm-up depends on --iters, and a long run stands in for a short one
    "5",
]
RUN = ["--num-samples", "10", "--steps", "20", "--threads", "1", "--no-progress"]


def _ddpm(*args: str, torchrun: bool = False, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, "-m", "ddpm", *args] if torchrun else [sys.executable, "-m", "ddpm", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _cli(argv: list[str]) -> int:
    if not any(c.name == "merge" for c in app.registered_commands):  # until ddpm.cli lists the module
        cli_merge.register(app)
    return main(argv)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    return shared_artifacts(tmp_path_factory)["unet"][1]


# --- shard planning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("m, n", [(10, 3), (7, 7), (1000, 16), (5, 1)])
def test_shards_tile_the_run(m, n):
    ranges = [Shard(k, n).range(m) for k in range(n)]
    assert ranges[0][0] == 0 and ranges[-1][1] == m
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:] + [(m, m + 1)], strict=True))


@pytest.mark.parametrize("text", ["3/3", "1", "a/2", "-1/2", "0/0", "1/2/3"])
def test_bad_shard_spec(text):
    with pytest.raises(InvalidArgumentError, match="K/N"):
        Shard.parse(text)


def test_more_shards_than_samples():
    with pytest.raises(InvalidArgumentError, match="cannot be split into 4 shards"):
        Shard(0, 4).range(3)


def test_batch_sharding_and_env():
    ctx = DistContext(rank=1, world_size=2)
    x, t = torch.arange(8.0).reshape(4, 2), torch.arange(4)
    xs, ts = ctx.shard(x, t)
    assert torch.equal(xs, x[2:]) and torch.equal(ts, t[2:])
    assert ctx.facts(32) == {"world_size": 2, "per_rank_batch": 16} and not ctx.is_main
    with pytest.raises(InvalidArgumentError, match="--batch-size 33 does not split evenly over 2 ranks"):
        ctx.check_batch(33)
    assert not from_env().active  # pytest runs outside torchrun


def test_bad_dist_backend_is_refused_without_torchrun(tmp_path, capsys):
    argv = [
        "train",
        "--data",
        "digits",
        "--out",
        str(tmp_path / "r"),
        "--iters",
        "1",
        "--dist-backend",
        "mpi",
    ]
    assert main(argv) == 2
    assert "--dist-backend must be one of nccl, gloo, got 'mpi'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --- sampling -----------------------------------------------------------------------------------------------


def test_sample_shard_rows_equal_full_run(onnx_file):
    opts = {"steps": 8, "threads": 1, "batch": 4}
    full = ddpm.sample(onnx_file, 10, **opts)
    parts = [ddpm.sample(onnx_file, 10, shard=(k, 3), **opts) for k in range(3)]
    assert [p.shape[0] for p in parts] == [3, 3, 4]
    assert torch.equal(torch.cat(parts), full)


def test_shard_merge_equals_single_npz(onnx_file, tmp_path, capsys):
    single = tmp_path / "a.npz"
    assert _cli(["run", "--engine", str(onnx_file), *RUN, "--npz", str(single)]) == 0
    shards = [tmp_path / f"s{k}.npz" for k in range(3)]
    for k, path in enumerate(shards):
        assert _cli(["run", "--engine", str(onnx_file), *RUN, "--shard", f"{k}/3", "--npz", str(path)]) == 0
    merged = tmp_path / "m.npz"
    assert _cli(["merge", *map(str, reversed(shards)), "--npz", str(merged)]) == 0
    assert merged.read_bytes() == single.read_bytes()  # arr_0 and the file itself

    capsys.readouterr()
    cases = {
        "is missing": [shards[0], shards[2]],
        "given twice": [shards[0], shards[1], shards[1], shards[2]],
    }
    other = tmp_path / "seed1.npz"
    assert (
        _cli(["run", "--engine", str(onnx_file), *RUN, "--seed", "1", "--shard", "1/3", "--npz", str(other)])
        == 0
    )
    cases["seed 1 vs 0"] = [shards[0], other, shards[2]]
    cases["not a shard npz"] = [single, *shards]
    for match, paths in cases.items():
        capsys.readouterr()
        assert _cli(["merge", *map(str, paths), "--npz", str(tmp_path / "bad.npz")]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and err.startswith("ddpm: error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "bad.npz").exists()


def test_shard_needs_npz(onnx_file, tmp_path, capsys):
    assert (
        _cli(["run", "--engine", str(onnx_file), *RUN, "--shard", "0/2", "--out", str(tmp_path / "a.png")])
        == 2
    )
    assert "--shard writes an npz" in capsys.readouterr().err


def test_torchrun_sampling_equals_single_process(onnx_file, tmp_path):
    single, gathered = tmp_path / "a.npz", tmp_path / "b.npz"
    assert _ddpm("run", "--engine", str(onnx_file), *RUN, "--npz", str(single)).returncode == 0
    r = _ddpm("run", "--engine", str(onnx_file), *RUN, "--npz", str(gathered), torchrun=True)
    assert r.returncode == 0, torchrun_failure(r)
    assert "ranks=2 samples per rank=5,5" in r.stdout
    assert gathered.read_bytes() == single.read_bytes()


# --- training ----------------------------------------------------------------------------------------------


def _losses(run: Path) -> np.ndarray:
    with open(run / "loss.csv") as f:
        return np.array([float(row["loss"]) for row in csv.DictReader(f)])


def _rank_pid(parent: int, rank: int) -> int | None:
    kids = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    for pid in kids:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _kill_rank_after_first_save(run: Path) -> subprocess.CompletedProcess:
    # --iters does not change the trajectory (the LR does not depend on it with a given --warmup), so a long run stands in for one
    # that is interrupted: rank 1 dies as soon as the first save (step 5) is on disk.
    args = ["train", *TRAIN, "--out", str(run), "--iters", "1000", "--save-every", "5", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [*TORCHRUN, "-m", "ddpm", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (run / STATE_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_torchrun_training_matches_one_process(tmp_path):
    base = {
        "data": "digits",
        "batch_size": 32,
        "sample_steps": 2,
        "num_samples": 4,
        "threads": 1,
        "warmup": 5,
    }
    base["progress"] = False
    ref = tmp_path / "ref"
    train(TrainConfig(out=ref, iters=14, **base))

    run = tmp_path / "two"
    killed = _kill_rank_after_first_save(run)
    assert killed.returncode != 0
    assert "rank      : 1" in killed.stderr and "SIGKILL" in killed.stderr  # torchrun names the dead rank
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary files left
    meta = ddpm.read_metadata(run / "model.safetensors")
    assert meta["world_size"] == "2" and meta["per_rank_batch"] == "16"
    saved = meta["step"]
    assert saved in (5, 10)
    np.testing.assert_allclose(_losses(run), _losses(ref)[:saved], rtol=1e-5)

    r = _ddpm("train", *TRAIN, "--out", str(run), "--iters", "12", "--resume", "--no-progress", torchrun=True)
    assert r.returncode == 0, torchrun_failure(r)
    assert r.stdout.count("checkpoint:") == 1  # rank 0 reports, rank 1 stays quiet
    np.testing.assert_allclose(_losses(run), _losses(ref)[:12], rtol=1e-5)

    train(TrainConfig(out=run, iters=14, resume=True, **base))  # the same run continued on one process
    np.testing.assert_allclose(_losses(run), _losses(ref), rtol=1e-5)
    print(f"losses: max relative difference {np.max(np.abs(_losses(run) / _losses(ref) - 1)):.2e}")
    a, b = (ddpm.load_model(p / "model.safetensors")[0].state_dict() for p in (run, ref))
    num = sum(float((a[k] - b[k]).float().norm() ** 2) for k in a) ** 0.5
    den = sum(float(b[k].float().norm() ** 2) for k in b) ** 0.5
    print(f"EMA weights after 14 steps (2 ranks to 12, then 1): relative difference {num / den:.2e}")
    assert num / den < 1e-4
    x, y = (ddpm.sample(p / "model.safetensors", 8, steps=10, threads=1) for p in (run, ref))
    # and the checkpoints sample the same images (unclipped 10-step samples reach |x| ~ 60: relative to the max)
    assert float((x - y).abs().max() / y.abs().max()) < 1e-5
