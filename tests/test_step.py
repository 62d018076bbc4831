"""The affine coefficient table reproduces the textbook formulas (fresh random inputs, float64 references).

Tolerance: ``step`` evaluates the affine form in float32 with float32-cast coefficients, about six roundings
(each <= 2^-24 ~ 6e-8 relative to the term it rounds). So its error is bounded by ~4e-7 times the elementwise
magnitude scale |a x| + |b| (|p x| + |q m|) + |sigma z|; we allow 1e-6 of that scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ddpm
from ddpm import Schedule
from ddpm.errors import InvalidArgumentError
from ddpm.schedule import COEF_SIGMA

TOL = 1e-6
SCHEDULES = {
    "linear": lambda: Schedule.linear(1000),
    "cosine": lambda: Schedule.cosine(1000),
    "linear/50": lambda: Schedule.linear(1000).respace(50),
}


def _rand(rng, shape=(3, 2, 5, 7)):
    return rng.standard_normal(shape).astype(np.float32)


def _check(out: torch.Tensor, ref: np.ndarray, scale: np.ndarray) -> None:
    err = np.max(np.abs(out.double().numpy() - ref) / scale)
    assert err <= TOL, f"relative error {err:.3g} > {TOL}"


def _textbook_x0(s: Schedule, i: int, prediction: str, x, m):
    ab = s.alphas_cumprod[i]
    if prediction == "eps":  # Ho et al. eq. 4 solved for x0
        return (x - np.sqrt(1 - ab) * m) / np.sqrt(ab)
    if prediction == "v":  # Salimans & Ho: x0 = sqrt(ab) x - sqrt(1 - ab) v
        return np.sqrt(ab) * x - np.sqrt(1 - ab) * m
    return m


def _posterior_mean(s: Schedule, i: int, x, x0):
    """Ho et al. eq. 7: mu_tilde = sqrt(ab_prev) beta / (1 - ab) x0 + sqrt(alpha) (1 - ab_prev) / (1 - ab) x_t."""
    ab, beta = s.alphas_cumprod[i], s.betas[i]
    ab_prev = s.alphas_cumprod[i - 1] if i > 0 else 1.0
    return np.sqrt(ab_prev) * beta / (1 - ab) * x0 + np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * x


def _scale(s, i, x, m, z, **kw):
    a, b, _c, p, q, sigma = s.coefficients(**kw)[i][:6]
    return np.abs(a * x) + np.abs(b) * (np.abs(p * x) + np.abs(q * m)) + np.abs(sigma * z) + 1e-30


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddpm_posterior_mean_and_variance(sched, prediction, rng):
    s = SCHEDULES[sched]()
    for i in [1, 2, len(s) // 2, len(s) - 1, int(rng.integers(1, len(s)))]:
        x, m, z = _rand(rng), _rand(rng), _rand(rng)
        for variance, var in (("fixed_small", s.posterior_variance[i]), ("fixed_large", s.betas[i])):
            kw = dict(prediction=prediction, sampler="ddpm", variance=variance)
            out = ddpm.step(s, i, torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(z), **kw)
            ref = (
                _posterior_mean(s, i, x.astype(np.float64), _textbook_x0(s, i, prediction, x, m))
                + np.sqrt(var) * z
            )
            _check(out, ref, _scale(s, i, x, m, z, **kw))


@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_eps_form_eq11(sched, rng):
    """Ho et al. eq. 11: mu = (x_t - beta / sqrt(1 - ab) eps) / sqrt(alpha)."""
    s = SCHEDULES[sched]()
    for i in [1, len(s) // 3, len(s) - 1]:
        x, m = _rand(rng), _rand(rng)
        out = ddpm.step(
            s, i, torch.from_numpy(x), torch.from_numpy(m), None if i == 0 else torch.zeros(x.shape)
        )
        ab, beta = s.alphas_cumprod[i], s.betas[i]
        ref = (x - beta / np.sqrt(1 - ab) * m.astype(np.float64)) / np.sqrt(1 - beta)
        _check(out, ref, _scale(s, i, x, m, np.zeros_like(x)))


def test_last_step_adds_no_noise(rng):
    s = Schedule.linear(1000)
    for variance in ("fixed_small", "fixed_large"):
        assert s.coefficients("eps", "ddpm", variance)[0, COEF_SIGMA] == 0.0
    x, m = torch.from_numpy(_rand(rng)), torch.from_numpy(_rand(rng))
    assert torch.equal(ddpm.step(s, 0, x, m, None), ddpm.step(s, 0, x, m, torch.randn(x.shape)))


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_eq12(sched, prediction, eta, rng):
    """Song et al. eq. 12: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z."""
    s = SCHEDULES[sched]()
    for i in [0, 1, len(s) // 2, len(s) - 1]:
        x, m, z = _rand(rng), _rand(rng), _rand(rng)
        kw = dict(prediction=prediction, sampler="ddim", eta=eta)
        out = ddpm.step(s, i, torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(z), **kw)
        ab = s.alphas_cumprod[i]
        ab_prev = s.alphas_cumprod[i - 1] if i > 0 else 1.0
        x64 = x.astype(np.float64)
        x0 = _textbook_x0(s, i, prediction, x64, m.astype(np.float64))
        eps = (x64 - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
        sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        ref = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma**2) * eps + sigma * z
        _check(out, ref, _scale(s, i, x, m, z, prediction=prediction, sampler="ddim", eta=eta))


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_eta1_equals_ddpm_fixed_small(sched, prediction):
    s = SCHEDULES[sched]()
    ddim = s.coefficients(prediction, "ddim", eta=1.0)
    ddpm_t = s.coefficients(prediction, "ddpm", "fixed_small")
    np.testing.assert_allclose(ddim, ddpm_t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_clip_clips_x0_hat(prediction, rng):
    s = Schedule.linear(1000).respace(20)
    c = 0.5
    for i in [0, 5, 19]:
        x, m, z = (_rand(rng) * 3 for _ in range(3))
        kw = dict(prediction=prediction, sampler="ddim", eta=0.5)
        out = ddpm.step(s, i, torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(z), clip=c, **kw)
        x64 = x.astype(np.float64)
        x0 = np.clip(_textbook_x0(s, i, prediction, x64, m.astype(np.float64)), -c, c)
        assert np.abs(x0).max() <= c
        a, b, _, _, _, sigma = s.coefficients(**kw)[i]
        _check(out, a * x64 + b * x0 + sigma * z, _scale(s, i, x, m, z, **kw))
    # at i = 0 DDIM returns x0_hat itself, so the output lies inside [-c, c]
    out0 = ddpm.step(
        s, 0, torch.from_numpy(x), torch.from_numpy(m), None, clip=c, prediction=prediction, sampler="ddim"
    )
    assert out0.abs().max().item() <= c


def test_q_sample_and_conversions_roundtrip(rng):
    s = Schedule.cosine(1000)
    x0 = torch.from_numpy(_rand(rng)).double().float()
    eps = torch.from_numpy(_rand(rng))
    t = torch.from_numpy(rng.integers(0, 900, size=x0.shape[0]))
    xt = ddpm.q_sample(s, x0, t, eps)
    ab = torch.from_numpy(s.alphas_cumprod[t.numpy()]).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, rtol=1e-5, atol=1e-6)
    v = ddpm.v_from_x0_eps(s, x0, t, eps)
    torch.testing.assert_close(ddpm.x0_from_v(s, xt, t, v), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ddpm.eps_from_v(s, xt, t, v), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ddpm.x0_from_eps(s, xt, t, eps), x0, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ddpm.eps_from_x0(s, xt, t, x0), eps, rtol=1e-4, atol=1e-3)
    for pred, want in (("eps", eps), ("x0", x0), ("v", v)):
        torch.testing.assert_close(ddpm.training_target(s, pred, x0, t, eps), want)


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_learned_range_eq15(sched, prediction, rng):
    """Nichol & Dhariwal eq. 15: Sigma = exp(v log beta + (1 - v) log beta_tilde) with v in [0, 1] the model's
    interpolation output (here frac = (v + 1) / 2 of an output in [-1, 1], diffusers' convention), beta and
    beta_tilde of the (respaced) schedule; the mean is the posterior mean. float64 textbook vs the float32 step.
    The exponent's absolute float32 rounding is a relative error of sigma, hence the term scale's extra factor."""
    s = SCHEDULES[sched]()
    for i in [1, 2, len(s) // 2, len(s) - 1]:
        x, m, z = _rand(rng), _rand(rng), _rand(rng)
        v = rng.uniform(-1, 1, x.shape).astype(np.float32)
        kw = dict(prediction=prediction, sampler="ddpm", variance="learned_range")
        out = ddpm.step(
            s, i, *(torch.from_numpy(t) for t in (x, m, z)), variance_output=torch.from_numpy(v), **kw
        )
        frac = (v.astype(np.float64) + 1) / 2
        log_var = frac * np.log(s.betas[i]) + (1 - frac) * np.log(s.posterior_variance[i])
        sigma = np.exp(0.5 * log_var)
        ref = _posterior_mean(s, i, x.astype(np.float64), _textbook_x0(s, i, prediction, x, m)) + sigma * z
        scale = _scale(s, i, x, m, np.zeros_like(z), **kw) + np.abs(sigma * z) * (1 + np.abs(0.5 * log_var))
        _check(out, ref, scale)


@pytest.mark.parametrize("ratio, max_value", [(0.995, np.inf), (0.8, 1.5), (1.0, 2.0)])
def test_dynamic_threshold_is_imagens(ratio, max_value, rng):
    """Saharia et al. 2022: s = the ratio-quantile of |x0_hat| per sample (linear interpolation, as np.quantile),
    s = clip(s, 1, max_value), x0_hat = clip(x0_hat, -s, s) / s; DDIM at i = 0 returns x0_hat itself."""
    s = Schedule.linear(1000).respace(20)
    x, m = _rand(rng) * 3, _rand(rng) * 3
    dyn = ddpm.diffusion.DynamicThreshold(ratio, max_value)
    out = ddpm.step(
        s, 0, torch.from_numpy(x), torch.from_numpy(m), None, prediction="x0", sampler="ddim", clip=dyn
    )
    flat = np.abs(m.astype(np.float64)).reshape(m.shape[0], -1)
    thr = np.clip(np.quantile(flat, ratio, axis=1), 1.0, max_value).reshape(-1, 1, 1, 1)
    ref = np.clip(m, -thr, thr) / thr
    _check(out, ref, np.abs(m) + 1e-30)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, x: ddpm.step(s, 10, x, x, x), r"step index i must be an integer in 0..9, got 10"),
        (lambda s, x: ddpm.step(s, 3, x, x[:1], x), r"shapes must match"),
        (lambda s, x: ddpm.step(s, 3, x, x, x[:1]), r"shapes must match"),
        (lambda s, x: ddpm.step(s, 3, x, x, None), r"needs noise, got None"),
        (lambda s, x: ddpm.step(s, 3, x.double(), x, x), r"must be float32"),
        (lambda s, x: ddpm.step(s, 3, x, x, x, prediction="score"), r"unknown prediction 'score'"),
        (lambda s, x: ddpm.step(s, 3, x, x, x, sampler="pndm"), r"unknown sampler 'pndm'"),
        (lambda s, x: ddpm.step(s, 3, x, x, x, variance="big"), r"unknown variance 'big'"),
        (lambda s, x: ddpm.step(s, 3, x, x, x, sampler="ddim", eta=-1), r"eta must be .*>= 0, got -1"),
        (lambda s, x: ddpm.step(s, 3, x, x, x, clip=0), r"clip must be a positive number"),
        (lambda s, x: ddpm.q_sample(s, x, torch.tensor([0, 10]), x), r"t must index the schedule: 0..9"),
        (lambda s, x: ddpm.q_sample(s, x, torch.tensor([0]), x), r"t must have shape \[N\] = \[2\]"),
    ],
)
def test_step_argument_errors(call, match):
    s = Schedule.linear(10)
    with pytest.raises(InvalidArgumentError, match=match):
        call(s, torch.zeros(2, 3))
