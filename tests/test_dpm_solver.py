"""DPM-Solver++(2M) and its SDE variant: coefficient table, reference step with history, diffusers as oracle.

Oracle: diffusers' ``DPMSolverMultistepScheduler`` (an implementation nobody here wrote), configured as
docs/design.md, "Multistep solvers" describes, fed our respaced timesteps, the same model outputs and our Philox noise.
diffusers computes its schedule in float32 (float32 betas, float32 cumprod): its sigmas differ from our
float64 ones by up to ~3e-4 relative on the cosine schedule, which alone moves a 5-step eps trajectory by
~2e-3. So after ``set_timesteps`` we hand it the float64 values of the same quantity, sqrt((1 - ab) / ab) at
the kept timesteps (plus its final 0); solver order, history, first/final-step logic and the update formulas
stay diffusers' own. ``test_diffusers_sigmas_match_ours`` pins that the substitution is like for like.

Tolerance for whole trajectories: both sides run in float32, ~a dozen roundings per step, each <= u = 2^-24
relative to the term it rounds. The largest term of step i is kappa_i = |a_i| + |sigma_i| +
(|b_i| + |c_{i-1}|) (|p_i| + |q_i|) times |x| (x0_hat of step i enters x through b_i now and c_{i-1} at the
next step), and independent roundings over N steps grow like sqrt(N) (|a_i| <= 1: no step amplifies them), so
we allow max_i |x_ours - x_diffusers| / max |x_diffusers| <= 4 u sqrt(N) max_i kappa_i. kappa is 1.4..5.6 for
x0 and v prediction and reaches ~1.6e4 for eps on the 5-step cosine schedule, whose first step converts eps to
x0 with p ~ 1/sqrt(alphabar_999) ~ 2e4 (the cancellation in x - sigma eps is the same in both implementations
and in any float32 sampler). Measured over 144 random trajectories: max relative error 6.8e-7 (x0, v),
1.8e-6 (eps, linear), 5.5e-4 (eps, cosine), all <= 3 u kappa, i.e. <= 0.25 of the tolerance; 1.9e-6 over
the 1000-step schedule (0.2 of it).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import ddpm
from ddpm import Schedule
from ddpm.diffusion import step_coefficients
from ddpm.errors import InvalidArgumentError
from ddpm.schedule import COEF_A, COEF_B, COEF_C, COEF_P, COEF_Q, COEF_SIGMA, Sampler

# diffusers 0.42 builds its sigmas with np.array(tensor), which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

U = 2.0**-24
TRAJ_C = 4.0
STEP_TOL = 1e-6  # single step vs float64, relative to the term scale (as tests/test_step.py)
SHAPE = (2, 3, 4, 4)
DIFFUSERS_PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SAMPLERS = ["dpm++2m", "dpm++2m-sde"]


def _x0_target(x: np.ndarray, t: int, phase: float) -> np.ndarray:
    """A deterministic, random-ish denoiser: a bounded x0 estimate that depends on x and t."""
    g = np.arange(math.prod(x.shape[1:])).reshape(x.shape[1:]) * 0.61803 + phase
    return np.tanh(0.5 * x + np.sin(g + 0.013 * t))


def _model(base: Schedule, prediction: str, x: torch.Tensor, t: int, phase: float, scale: float = 1.0):
    """The model output (float64 -> float32) consistent with x0 = scale * _x0_target: eps, x0 or v.

    A consistent model keeps x0_hat = p x + q m bounded; a model whose eps ignores x would make x0_hat
    ~1e4 at the cosine schedule's noisiest step, a trajectory no trained network produces.
    """
    ab = base.alphas_cumprod[t]
    x64 = x.double().numpy()
    x0 = scale * _x0_target(x64, t, phase)
    eps = (x64 - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)
    out = {"eps": eps, "x0": x0, "v": math.sqrt(ab) * eps - math.sqrt(1.0 - ab) * x0}[prediction]
    return torch.from_numpy(out).float()


def _kappa(s: Schedule, prediction: str, sampler: str) -> float:
    t = s.coefficients(prediction, sampler)
    conv = np.abs(t[:, COEF_P]) + np.abs(t[:, COEF_Q])
    c_next = np.append(0.0, np.abs(t[:-1, COEF_C]))  # c_{i-1}: row i's x0_hat is read again at step i - 1
    k = np.abs(t[:, COEF_A]) + np.abs(t[:, COEF_SIGMA]) + (np.abs(t[:, COEF_B]) + c_next) * conv
    return float(k.max())


def _traj_tol(s: Schedule, prediction: str, sampler: str) -> float:
    return TRAJ_C * U * _kappa(s, prediction, sampler) * math.sqrt(len(s))


def _diffusers(base: Schedule, s: Schedule, prediction: str, sampler: str, float64_sigmas: bool = True):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=len(base),
        trained_betas=base.betas,
        solver_order=2,
        prediction_type=DIFFUSERS_PRED[prediction],
        algorithm_type="sde-dpmsolver++" if sampler == "dpm++2m-sde" else "dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(timesteps=[int(t) for t in s.timesteps[::-1]])
    assert sched.timesteps.tolist() == s.timesteps[::-1].tolist()
    if float64_sigmas:
        ab = base.alphas_cumprod[s.timesteps[::-1]]
        sched.sigmas = torch.from_numpy(np.append(np.sqrt((1.0 - ab) / ab), 0.0))
    return sched


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_diffusers_sigmas_match_ours(kind):
    """diffusers' own (float32) sigmas are ours to float32-schedule precision: the substitution is like for like."""
    base = Schedule.create(kind, 1000)
    s = base.respace(12)
    theirs = _diffusers(base, s, "eps", "dpm++2m", float64_sigmas=False).sigmas.double().numpy()
    ab = s.alphas_cumprod[::-1]
    assert theirs[-1] == 0.0
    np.testing.assert_allclose(theirs[:-1], np.sqrt((1.0 - ab) / ab), rtol=5e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("steps", [5, 12, 25])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_trajectory_matches_diffusers(kind, steps, prediction, sampler, rng):
    base = Schedule.create(kind, 1000)
    s = base.respace(steps)
    sched = _diffusers(base, s, prediction, sampler)
    seed, phase = int(rng.integers(0, 2**63)), float(rng.uniform(0, 2 * math.pi))
    ours = ddpm.noise.initial_noise(seed, SHAPE)
    theirs = ours.clone()
    history = torch.zeros(SHAPE)
    err = 0.0
    for i in range(steps - 1, -1, -1):
        t = int(s.timesteps[i])
        z = ddpm.noise.normal(seed, SHAPE, step=i)  # exactly DDPM's noise of step i
        m = _model(base, prediction, ours, t, phase)
        ours = ddpm.step(s, i, ours, m, z, prediction=prediction, sampler=sampler, history=history)
        m = _model(base, prediction, theirs, t, phase)
        theirs = sched.step(m, t, theirs, variance_noise=z).prev_sample
        err = max(err, ((ours - theirs).abs().max() / theirs.abs().max()).item())
    tol = _traj_tol(s, prediction, sampler)
    assert err <= tol, f"max relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_full_schedule_matches_diffusers(sampler, rng):
    """No respacing: all 1000 steps (h ~ 1e-2, r ~ 1), eps prediction on the linear schedule."""
    base = Schedule.linear(1000)
    sched = _diffusers(base, base, "eps", sampler)
    seed, phase = int(rng.integers(0, 2**63)), float(rng.uniform(0, 2 * math.pi))
    shape = (1, 1, 2, 3)
    ours = ddpm.noise.initial_noise(seed, shape)
    theirs, history, err = ours.clone(), torch.zeros(shape), 0.0
    for i in range(len(base) - 1, -1, -1):
        z = ddpm.noise.normal(seed, shape, step=i)
        ours = ddpm.step(
            base, i, ours, _model(base, "eps", ours, i, phase), z, sampler=sampler, history=history
        )
        theirs = sched.step(_model(base, "eps", theirs, i, phase), i, theirs, variance_noise=z).prev_sample
        err = max(err, ((ours - theirs).abs().max() / theirs.abs().max()).item())
    tol = _traj_tol(base, "eps", sampler)
    assert err <= tol, f"max relative error {err:.3g} > {tol:.3g}"


def _paper_step(s: Schedule, i: int, x, x0, x0_prev, z, sde: bool):
    """DPM-Solver++(2M) / SDE variant written directly from Lu et al. 2022 Algorithm 2 (float64, scalar per step).

    Uses the log-SNR from schedule.snr (lambda = log(snr)/2), an independent route from the table's.
    """
    n = len(s)
    lam = 0.5 * np.log(s.snr)
    ab_t = s.alphas_cumprod[i - 1] if i > 0 else 1.0
    alpha_t, sigma_t = math.sqrt(ab_t), math.sqrt(1.0 - ab_t)
    sigma_s = math.sqrt(1.0 - s.alphas_cumprod[i])
    if i == 0:  # to the clean sample: sigma_t = 0, lambda_t = inf, first order
        return x0
    h = lam[i - 1] - lam[i]
    if i == n - 1:  # no history yet: first order
        d = x0
    else:
        r = (lam[i] - lam[i + 1]) / h
        d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    if not sde:
        return sigma_t / sigma_s * x + alpha_t * (1 - math.exp(-h)) * d
    return (
        sigma_t / sigma_s * math.exp(-h) * x
        + alpha_t * (1 - math.exp(-2 * h)) * d
        + sigma_t * math.sqrt(1 - math.exp(-2 * h)) * z
    )


def _textbook_x0(s: Schedule, i: int, prediction: str, x, m):
    ab = s.alphas_cumprod[i]
    if prediction == "eps":
        return (x - math.sqrt(1 - ab) * m) / math.sqrt(ab)
    if prediction == "v":
        return math.sqrt(ab) * x - math.sqrt(1 - ab) * m
    return m


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("sched", ["linear/7", "cosine/25", "cosine/1000"])
def test_table_is_algorithm_2_in_float64(sampler, sched, rng):
    """The coefficient form a x + b x0 + c h + sigma z (float64) is Algorithm 2 (float64) at every step."""
    kind, steps = sched.split("/")
    s = Schedule.create(kind, 1000).respace(int(steps))
    table = s.coefficients("eps", sampler)
    for i in range(len(s)):
        x, x0, h, z = (rng.standard_normal(SHAPE) for _ in range(4))
        a, b, c, _, _, sig = table[i]
        ref = _paper_step(s, i, x, x0, h, z, sde=sampler == "dpm++2m-sde")
        scale = np.abs(a * x) + np.abs(b * x0) + np.abs(c * h) + np.abs(sig * z)
        np.testing.assert_array_less(np.abs(a * x + b * x0 + c * h + sig * z - ref), 1e-12 * scale + 1e-300)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_step_with_history_matches_float64(sampler, prediction, clip, rng):
    """Every step of ``ddpm.step`` (float32, float32-cast table) vs Algorithm 2 in float64 on the same inputs;
    clip = 1 with a model whose x0 reaches +-2.5, so clipping is active (and the clipped x0_hat is what the
    history keeps). Error relative to the term scale, as tests/test_step.py."""
    base = Schedule.cosine(1000)
    s = base.respace(int(rng.integers(3, 40)))
    seed, phase = int(rng.integers(0, 2**63)), float(rng.uniform(0, 2 * math.pi))
    bound = math.inf if clip is None else clip
    x = ddpm.noise.initial_noise(seed, SHAPE)
    history = torch.zeros(SHAPE)
    x0_prev, conv_prev = np.zeros(SHAPE), np.zeros(SHAPE)
    table = s.coefficients(prediction, sampler)
    for i in range(len(s) - 1, -1, -1):
        m = _model(base, prediction, x, int(s.timesteps[i]), phase, scale=2.5)
        z = ddpm.noise.normal(seed, SHAPE, step=i)
        x64, m64, z64 = x.double().numpy(), m.double().numpy(), z.double().numpy()
        x0 = np.clip(_textbook_x0(s, i, prediction, x64, m64), -bound, bound)
        if clip is not None:
            assert np.abs(x0).max() <= clip
        ref = _paper_step(s, i, x64, x0, x0_prev, z64, sde=sampler == "dpm++2m-sde")
        out = ddpm.step(s, i, x, m, z, prediction=prediction, sampler=sampler, clip=clip, history=history)
        a, b, c, p, q, sig = table[i]
        conv = np.abs(p * x64) + np.abs(q * m64)
        # our history is the previous float32 x0_hat: its rounding scales with that step's conversion
        scale = np.abs(a * x64) + np.abs(b) * conv + np.abs(c) * conv_prev + np.abs(sig * z64) + 1e-30
        err = np.max(np.abs(out.double().numpy() - ref) / scale)
        assert err <= STEP_TOL, f"step {i}: relative error {err:.3g} > {STEP_TOL}"
        h_err = np.max(np.abs(history.double().numpy() - x0) / (conv + 1e-30))
        assert h_err <= STEP_TOL, f"step {i}: history is not x0_hat (relative error {h_err:.3g})"
        x, x0_prev, conv_prev = out, x0, conv


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 1000])
def test_first_and_final_steps_are_first_order(kind, steps):
    """No history at the first step, sigma_t = 0 at the final one: c = 0 there and the step is DDIM (ODE) or
    DDPM with the posterior variance (SDE; docs/design.md, "Multistep solvers" shows the identity)."""
    s = Schedule.create(kind, 1000).respace(steps)
    ode, sde = s.coefficients("v", "dpm++2m"), s.coefficients("v", "dpm++2m-sde")
    ddim, ddpm_t = s.coefficients("v", "ddim", eta=0.0), s.coefficients("v", "ddpm", "fixed_small")
    for i in {0, steps - 1}:
        assert ode[i, COEF_C] == 0.0 and sde[i, COEF_C] == 0.0
        np.testing.assert_allclose(ode[i], ddim[i], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sde[i], ddpm_t[i], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(ode[0], [0.0, 1.0, 0.0, *ode[0, COEF_P : COEF_Q + 1], 0.0])
    assert np.all(ode[:, COEF_SIGMA] == 0.0)
    assert np.all(sde[1:, COEF_SIGMA] > 0.0) and sde[0, COEF_SIGMA] == 0.0
    if steps >= 3:  # second order in between: D = (1 + 1/2r) x0_hat - 1/2r h, so b + c is the first-order b
        inner = slice(1, steps - 1)
        assert np.all(ode[inner, COEF_C] < 0.0)
        np.testing.assert_allclose(ode[inner, COEF_B] + ode[inner, COEF_C], ddim[inner, COEF_B], rtol=1e-9)
    for t in (ode, sde):
        assert np.all(np.isfinite(t))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_single_step_samplers_have_no_history_column(sampler, prediction):
    for s in (Schedule.linear(1000), Schedule.cosine(1000).respace(17)):
        for variance in ("fixed_small", "fixed_large"):
            for eta in (0.0, 0.5, 1.0):
                assert np.all(s.coefficients(prediction, sampler, variance, eta)[:, COEF_C] == 0.0)


def test_variance_is_ignored_and_eta_refused():
    s = Schedule.linear(1000).respace(10)
    for sampler in SAMPLERS:
        np.testing.assert_array_equal(
            s.coefficients("eps", sampler, "fixed_small"), s.coefficients("eps", sampler, "fixed_large")
        )
        with pytest.raises(
            InvalidArgumentError,
            match=rf"eta applies to the ddim sampler only; sampler {re.escape(sampler)} needs eta = 0",
        ):
            s.coefficients("eps", sampler, eta=0.5)


def test_sampler_parse_and_multistep():
    assert Sampler.parse("DPM++2M") is Sampler.DPMPP_2M
    assert Sampler.parse("dpm++2m-sde") is Sampler.DPMPP_2M_SDE
    assert [m.value for m in Sampler if m.multistep] == ["dpm++2m", "dpm++2m-sde"]


def test_history_for_single_step_samplers_is_optional_and_updated(rng):
    s = Schedule.linear(1000).respace(20)
    x, m, z = (torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32)) for _ in range(3))
    history = torch.full(SHAPE, 7.0)
    with_h = ddpm.step(s, 5, x, m, z, sampler="ddim", eta=0.5, clip=1.0, history=history)
    assert torch.equal(with_h, ddpm.step(s, 5, x, m, z, sampler="ddim", eta=0.5, clip=1.0))
    _, _, _, p, q, _ = step_coefficients(s, 5, sampler="ddim", eta=0.5)
    assert torch.equal(history, (p * x + q * m).clamp(-1.0, 1.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="dpm++2m"), r"sampler dpm\+\+2m is multistep and needs history"),
        (dict(sampler="dpm++2m-sde"), r"sampler dpm\+\+2m-sde is multistep and needs history"),
        (dict(sampler="dpm++2m", history=torch.zeros(2, 3).double()), r"history must be float32"),
        (dict(sampler="dpm++2m", history=torch.zeros(1, 3)), r"shapes must match"),
        (dict(sampler="dpm++2m", eta=1.0, history=torch.zeros(2, 3)), r"needs eta = 0, got 1.0"),
    ],
)
def test_step_history_errors(kwargs, match):
    s = Schedule.linear(10)
    x = torch.zeros(2, 3)
    with pytest.raises(InvalidArgumentError, match=match):
        ddpm.step(s, 3, x, x, x, **kwargs)
