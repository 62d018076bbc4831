"""Sampling a diffusers folder: `ddpm.sample` against diffusers' own loop on the same network and the same x_T.

diffusers' loop is what a user writes: its UNet2DModel and its scheduler (``DDPMScheduler`` for DDPM,
``DPMSolverMultistepScheduler`` for DPM-Solver++(2M), given our timesteps with ``set_timesteps(timesteps=...)``),
with our Philox noise injected where it draws its own (``DDPMScheduler.step`` calls
``scheduling_ddpm.randn_tensor``; DPMSolver's deterministic dpmsolver++ draws none). Ours runs through the folder
loaded natively (torch backend, no diffusers) and through the ONNX file `ddpm export` writes from it
(onnxruntime CPU), with the fused kernel.

Tolerance 2e-3 relative (max |ours - theirs| / max |theirs|): diffusers computes its schedule in float32 (betas
and their cumprod), ours in float64 (docs/design.md, "The math"); that alone moves each step's coefficients by
up to ~1e-6 relative on the linear schedule and ~3e-4 on the cosine one at large t, and the networks agree to
~1e-6 (tests/test_diffusers_model.py). Measured worst: see the printed figures (well below the bound).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _hostile import cli
from test_diffusers_folder import pipeline, unet

import ddpm
from ddpm.artifacts import read_metadata
from ddpm.cli import main
from ddpm.metadata import schedule_from_meta
from ddpm.runtime.backends import TorchBackend, open_backend

diffusers = pytest.importorskip("diffusers")
scheduling_ddpm = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")

TOL = 2e-3
N = 3  # samples per run
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# name -> (UNet overrides, DDPMScheduler config, our clip); T = 1000 as the google/ddpm-* family
DDPM_CASES = {
    "eps_linear_clip": (
        {},
        {"beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": True},
        1.0,
    ),
    "v_cosine_learned_range": (
        {"out_channels": 6},
        {
            "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "v_prediction",
            "variance_type": "learned_range",
            "clip_sample": False,
        },
        None,
    ),  # fmt: skip
    "x0_scaled_linear_fixed_large": (
        {"in_channels": 1, "out_channels": 1},
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "prediction_type": "sample",
            "variance_type": "fixed_large",
            "clip_sample": True,
            "clip_sample_range": 1.5,
        },
        1.5,
    ),  # fmt: skip
}


def _rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@torch.no_grad()
def _diffusers_ddpm(model, scheduler, timesteps: np.ndarray, seed: int, monkeypatch) -> torch.Tensor:
    """diffusers' DDPM loop over our timesteps, drawing our Philox noise of each step."""
    c, s = model.config.in_channels, model.config.sample_size
    shape = (N, c, s, s)
    x = ddpm.noise.initial_noise(seed, shape)
    scheduler.set_timesteps(timesteps=[int(t) for t in timesteps[::-1]])
    steps = len(timesteps)
    for k, t in enumerate(scheduler.timesteps):
        i = steps - 1 - k  # our schedule index of this step
        z = ddpm.noise.normal(seed, shape, step=i)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, _z=z, **kw: _z.clone())
        out = model(x, t).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("case", DDPM_CASES)
def test_ddpm_50_steps_matches_diffusers_loop(case, tmp_path, torch_gen, monkeypatch, capsys):
    over, sched_cfg, clip = DDPM_CASES[case]
    model = unet(torch_gen, **over)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, **sched_cfg)
    folder = pipeline(tmp_path / case, model, scheduler)
    engines = [folder]
    if case == "v_cosine_learned_range":  # the learned variance through ONNX too (one export: seconds each)
        engines.append(tmp_path / f"{case}.onnx")
        code, err = cli(["export", "--ckpt", folder, "--out", engines[1]], capsys)
        assert code == 0, err
        exported = read_metadata(engines[1], verify=True)
        assert exported["variance"] == "learned_range" and exported["source"]["weights_kind"] == "main"
        x = torch.randn(5, 3, 16, 16, generator=torch_gen)
        t = torch.randint(0, 1000, (5,), generator=torch_gen)
        with torch.no_grad():
            want = model(x, t).sample
        for engine in engines:  # the backends' first-call check accepts [N, 2C, H, W]
            with open_backend(engine, device="cpu") as backend:
                assert backend.output_shape == (6, 16, 16)
                assert isinstance(backend, TorchBackend) == (engine == folder)
                assert _rel(backend(x, t), want) <= 1e-4  # the forward (tests/test_diffusers_model.py's TOL)
    meta = read_metadata(folder)
    plan_ts = schedule_from_meta(meta).respace(50).timesteps  # ddpm's default spacing: improved-diffusion's
    seed = int(torch.randint(0, 2**62, (1,), generator=torch_gen))
    theirs = _diffusers_ddpm(model, scheduler, plan_ts, seed, monkeypatch)
    for engine in engines:
        ours = ddpm.sample(engine, N, steps=50, sampler="ddpm", seed=seed, clip=clip, device="cpu")
        err = _rel(ours, theirs)
        print(f"{case} via {engine.suffix or 'folder'}: max rel err {err:.2e}")
        assert err <= TOL, (case, str(engine), err)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dpm_solver_20_steps_matches_diffusers_loop(prediction, tmp_path, torch_gen, capsys):
    model = unet(torch_gen)
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": prediction}
    folder = pipeline(tmp_path / prediction, model, diffusers.DPMSolverMultistepScheduler(**cfg))
    meta = read_metadata(folder)
    assert meta["sampling"]["sampler"] == "dpm++2m"  # the folder's recommendation
    ts = schedule_from_meta(meta).respace(20, "trailing").timesteps  # dpm++2m's default spacing
    solver = diffusers.DPMSolverMultistepScheduler(
        **cfg, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
        final_sigmas_type="zero",
    )  # fmt: skip
    solver.set_timesteps(timesteps=[int(t) for t in ts[::-1]])
    seed = int(torch.randint(0, 2**62, (1,), generator=torch_gen))
    x = ddpm.noise.initial_noise(seed, (N, 3, 16, 16))
    with torch.no_grad():
        for t in solver.timesteps:
            x = solver.step(model(x, t).sample, t, x).prev_sample
    onnx = tmp_path / "m.onnx"
    code, err = cli(["export", "--ckpt", folder, "--out", onnx], capsys)
    assert code == 0, err
    for engine in (folder, onnx):
        ours = ddpm.sample(engine, N, steps=20, sampler="dpm++2m", seed=seed, device="cpu")
        err = _rel(ours, x)
        print(f"dpm++2m {prediction} via {engine.suffix or 'folder'}: max rel err {err:.2e}")
        assert err <= TOL, (prediction, str(engine), err)


def test_run_takes_the_folders_recommendation(tmp_path, torch_gen, capsys):
    """`ddpm run --engine DIR` with nothing else: the scheduler's sampler, steps and clip, the learned variance."""
    model = unet(torch_gen, out_channels=6)
    sched = diffusers.DDPMScheduler(num_train_timesteps=20, variance_type="learned_range", clip_sample=True)
    folder = pipeline(tmp_path / "lv", model, sched)
    code = main(
        [
            "run",
            "--engine",
            str(folder),
            "--num-samples",
            "2",
            "--npz",
            str(tmp_path / "s.npz"),
            "--no-progress",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "--sampler ddpm --steps 20 --clip 1" in out
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 16, 16, 3)
