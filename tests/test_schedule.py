"""Schedules: golden values, textbook identities, respacing, and argument errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddpm import Schedule
from ddpm.errors import InvalidArgumentError
from ddpm.schedule import Prediction, Sampler, Variance, coefficient_table

# Golden values (float64). Linear: Ho et al.'s 1e-4..0.02 over T=1000 (alphabar_999 = 4.0358e-5 is the
# widely quoted value, e.g. in diffusers' DDPMScheduler). Cosine: Nichol & Dhariwal, s = 0.008.
GOLDEN = {
    "linear": {0: 0.9999, 499: 7.858724288177824e-02, 999: 4.035829765375676e-05},
    "cosine": {0: 9.9995871577517803e-01, 499: 4.9384359044063819e-01, 999: 2.4287669070348567e-09},
}


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_golden_alphas_cumprod(kind):
    s = Schedule.create(kind, 1000)
    for t, v in GOLDEN[kind].items():
        assert s.alphas_cumprod[t] == pytest.approx(v, rel=1e-12)


def test_linear_matches_definition():
    s = Schedule.linear(1000)
    assert s.betas.dtype == np.float64 and s.betas.shape == (1000,)
    assert s.betas[0] == 1e-4 and s.betas[-1] == 0.02
    np.testing.assert_allclose(s.alphas, 1 - s.betas, rtol=0, atol=0)
    # cumulative product computed independently, in log space
    np.testing.assert_allclose(s.alphas_cumprod, np.exp(np.cumsum(np.log1p(-s.betas))), rtol=1e-12)
    np.testing.assert_array_equal(s.timesteps, np.arange(1000))


def test_cosine_matches_closed_form():
    T, sv = 1000, 0.008
    s = Schedule.cosine(T, sv)
    f = lambda t: math.cos((t / T + sv) / (1 + sv) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 250, 600, 900):  # away from the 0.999 clip, alphabar_t = f(t+1)/f(0)
        assert s.alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert s.betas.max() <= 0.999


def test_from_betas_and_config_roundtrip(rng):
    betas = rng.uniform(1e-4, 0.05, size=37)
    s = Schedule.from_betas(betas)
    np.testing.assert_array_equal(s.betas, betas)
    for sched in (s, Schedule.linear(100).respace(7), Schedule.cosine(50)):
        again = Schedule.from_config(sched.config)
        np.testing.assert_array_equal(again.betas, sched.betas)
        np.testing.assert_array_equal(again.timesteps, sched.timesteps)


def test_arrays_are_read_only():
    s = Schedule.linear(10)
    with pytest.raises(ValueError):
        s.betas[0] = 0.5


def test_respace_identity():
    s = Schedule.linear(1000)
    r = s.respace(1000)
    np.testing.assert_array_equal(r.betas, s.betas)
    np.testing.assert_array_equal(r.timesteps, s.timesteps)


@pytest.mark.parametrize("steps", [1, 2, 10, 50, 333, 999])
def test_respace_keeps_last_and_recomputes_betas(steps):
    s = Schedule.cosine(1000)
    r = s.respace(steps)
    assert len(r) == steps
    assert r.timesteps[-1] == 999
    assert np.all(np.diff(r.timesteps) > 0)
    # evenly spaced: gaps differ by at most one
    if steps > 2:
        gaps = np.diff(r.timesteps)
        assert gaps.max() - gaps.min() <= 1
    # alphabar over the kept steps is the original alphabar at those timesteps
    np.testing.assert_allclose(
        r.alphas_cumprod, s.alphas_cumprod[r.timesteps], rtol=1e-12, atol=1e-15
    )  # 1-(1-ab) cancels when ab ~ 1e-9
    ab = s.alphas_cumprod[r.timesteps]
    np.testing.assert_allclose(r.betas, 1 - ab / np.append(1.0, ab[:-1]), rtol=1e-12)


def test_respace_of_respaced_indexes_original_timesteps():
    r = Schedule.linear(1000).respace(100).respace(10)
    assert r.timesteps[-1] == 999 and len(r) == 10
    np.testing.assert_allclose(
        r.alphas_cumprod, Schedule.linear(1000).alphas_cumprod[r.timesteps], rtol=1e-12
    )


# ---- argument errors: each names the value and what is allowed ----


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Schedule.linear(0), r"timesteps T must be an integer >= 1, got 0"),
        (lambda: Schedule.cosine(-5), r"timesteps T must be an integer >= 1, got -5"),
        (lambda: Schedule.linear(10, beta_start=0.0), r"beta_start must lie in \(0, 1\), got 0.0"),
        (lambda: Schedule.linear(10, beta_start=0.02, beta_end=1e-4), r"must not exceed beta_end"),
        (lambda: Schedule.from_betas([0.1, 1.0]), r"open interval \(0, 1\)"),
        (lambda: Schedule.from_betas([0.1, -0.2]), r"open interval \(0, 1\)"),
        (lambda: Schedule.from_betas([]), r"non-empty"),
        (lambda: Schedule.linear(10).respace(0), r"steps must be in 1..10 .*got 0"),
        (lambda: Schedule.linear(10).respace(11), r"steps must be in 1..10 .*got 11"),
        (lambda: Schedule.create("quadratic"), r"unknown schedule kind 'quadratic'; allowed: linear, cosine"),
        (lambda: Schedule.linear(10).check_index(10), r"step index i must be an integer in 0..9, got 10"),
        (lambda: Schedule.linear(10).check_index(-1), r"in 0..9, got -1"),
        (lambda: Prediction.parse("noise"), r"unknown prediction 'noise'; allowed: eps, x0, v"),
        (lambda: Sampler.parse("euler"), r"unknown sampler 'euler'; allowed: ddpm, ddim"),
        (lambda: Variance.parse("learned"), r"unknown variance 'learned'; allowed: fixed_small, fixed_large"),
        (
            lambda: coefficient_table(Schedule.linear(10), "eps", "ddim", eta=-1.0),
            r"eta must be .*>= 0, got -1.0",
        ),
    ],
)
def test_invalid_arguments(make, match):
    with pytest.raises(InvalidArgumentError, match=match):
        make()
