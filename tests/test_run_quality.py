"""The exported path samples the right distribution: train the swiss-roll MLP, export it to ONNX, run 1000 DDPM
steps through ``ddpm run`` (onnxruntime + the fused kernel), and score the points by energy distance.

Slow: the session's reference swiss-roll model (tests/_reference.py, the trainer's defaults) is trained once for
every quality test. The same numbers also give the torch-vs-onnxruntime agreement of a TRAINED model after 1000
steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm.cli import main
from ddpm.runtime.sampling import sample

pytestmark = pytest.mark.slow

NUM_POINTS = 2000


@pytest.fixture(scope="module")
def swissroll(swissroll_reference, tmp_path_factory):
    """The session's default swiss-roll model (tests/_reference.py) and its ONNX export."""
    from ddpm.export.pipeline import export

    onnx_path = tmp_path_factory.mktemp("swissroll") / "swissroll.onnx"
    export(swissroll_reference, onnx_path)
    return swissroll_reference, onnx_path


def test_onnx_run_lands_on_the_roll(swissroll, tmp_path, capsys):
    from ddpm.evaluation.metrics import swissroll_energy_check

    _, onnx_path = swissroll
    npz = tmp_path / "points.npz"
    code = main(
        [
            "run",
            "--engine",
            str(onnx_path),
            "--sampler",  # explicit: the model's recommendation (its previews' sampler) is dpm++2m
            "ddpm",
            "--steps",
            "1000",
            "--num-samples",
            str(NUM_POINTS),
            "--batch",
            "1000",
            "--seed",
            "0",
            "--npz",
            str(npz),
            "--out",
            str(tmp_path / "points.png"),
            "--no-progress",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "backend=onnxruntime device=cpu steps=1000 batch=1000 samples=2000" in out
    points = np.load(npz)["arr_0"]
    assert points.shape == (NUM_POINTS, 2) and points.dtype == np.float32
    e = swissroll_energy_check(points)
    print(f"\nswissroll energy distances: {e}")
    # An untrained model scores like N(0, I) (data_vs_gauss = 0.022); two independent draws of the real roll
    # score the noise floor (data_vs_data = -0.0011). Measured: -0.0009 for this model (0.0006..0.0008 after
    # only 1500 iterations). On the roll means within 10% of the Gaussian score.
    assert e["sample_vs_data"] < 0.1 * e["data_vs_gauss"], e
    assert e["data_vs_data"] < 0.1 * e["data_vs_gauss"], e  # the check itself tells the two apart


def test_trained_model_torch_and_onnxruntime_agree(swissroll):
    """The measured torch-vs-onnxruntime agreement after 1000 steps, on a trained network (README figure)."""
    ckpt, onnx_path = swissroll
    a = sample(ckpt, 256, batch=256, steps=1000, seed=4, device="cpu", threads=1)
    b = sample(onnx_path, 256, batch=256, steps=1000, seed=4, device="cpu", threads=1)
    rel = float((b - a).norm() / a.norm())
    worst = float((b - a).abs().max())
    print(f"\ntorch vs onnxruntime after 1000 steps: relative L2 {rel:.3g}, max abs {worst:.3g}")
    # Measured on trained swiss-roll models: 2e-7..8.6e-6 relative L2 (max abs up to 2e-4); the tiny random nets
    # of test_sampling.py: ~3e-7. 1e-4 still catches any real mismatch (a wrong weight or timestep: > 1e-2).
    assert rel < 1e-4, (rel, worst)
    assert torch.isfinite(a).all()


def test_torch_compile_backend_matches_eager(swissroll):
    """``--compile``: torch.compile (inductor, a C++ compiler on CPU; ~20 s to compile) samples what eager does,
    to the rounding of its fused elementwise code."""
    ckpt, _ = swissroll
    eager = sample(ckpt, 64, steps=50, seed=2, device="cpu", threads=1)
    compiled = sample(ckpt, 64, steps=50, seed=2, device="cpu", threads=1, compile=True)
    assert float((compiled - eager).norm() / eager.norm()) < 1e-5


def test_dpm_solver_at_20_steps_lands_on_the_roll_as_well_as_ddpm_1000(swissroll):
    """DPM-Solver++(2M) at 20 steps through the ONNX path vs 1000-step DDPM: same point count and seed, same run.
    Energy distance is a U-statistic that scatters around the data floor, so "within 1.5x" is taken on the
    excess over that floor, with three standard deviations of the floor (4 draws) as the resolution."""
    from ddpm.evaluation.metrics import swissroll_energy_check

    _, onnx_path = swissroll
    kw = {"batch": 1000, "seed": 0, "device": "cpu", "threads": 1}
    ref = swissroll_energy_check(sample(onnx_path, NUM_POINTS, steps=1000, **kw))
    floor, res = ref["data_vs_data"], 3 * ref["data_vs_data_std"]
    budget = floor + 1.5 * max(ref["sample_vs_data"] - floor, 0.0) + res
    e = swissroll_energy_check(sample(onnx_path, NUM_POINTS, steps=20, sampler="dpm++2m", **kw))
    sde = swissroll_energy_check(sample(onnx_path, NUM_POINTS, steps=20, sampler="dpm++2m-sde", **kw))
    print(
        f"\ndpm++2m-20 {e['sample_vs_data']:.5f}, dpm++2m-sde-20 {sde['sample_vs_data']:.5f}, "
        f"ddpm-1000 {ref['sample_vs_data']:.5f}, floor {floor:.5f}, budget {budget:.5f}"
    )
    # Measured (a default-trained model, trailing spacing): dpm++2m -0.0006 vs DDPM-1000 -0.0009 at a floor of
    # -0.0011 +- 0.0002. With improved-diffusion's uniform spacing dpm++2m scored 0.0053 (ddpm/spacing.py):
    # this bound rejects that.
    assert e["sample_vs_data"] <= budget, (e, ref)
    # The SDE variant (0.0008 measured) is held to the "on the roll" bound of the 1000-step test above.
    assert sde["sample_vs_data"] < 0.1 * sde["data_vs_gauss"], sde
