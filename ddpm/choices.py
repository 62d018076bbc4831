"""The choices a sampling run makes, as string enums parsed once at the edge: what the network predicts, which
sampler turns x0_hat into x_prev, which timesteps a respaced schedule keeps, and DDPM's reverse variance.
(Re-exported by :mod:`ddpm.schedule`, where they were defined first.)
"""

from __future__ import annotations

import enum
from typing import Any

from .errors import InvalidArgumentError

__all__ = ["Prediction", "Sampler", "Spacing", "Variance"]


class _Choice(str, enum.Enum):
    """A string enum whose parse() raises a message listing the allowed values."""

    @classmethod
    def parse(cls, value: Any) -> _Choice:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise InvalidArgumentError(f"unknown {cls._label()} {value!r}; allowed: {allowed}") from None

    @classmethod
    def _label(cls) -> str:
        return cls.__name__.lower()

    def __str__(self) -> str:
        return self.value


class Prediction(_Choice):
    """What the network predicts: the noise eps, the clean sample x0, or v = sqrt(ab) eps - sqrt(1-ab) x0."""

    EPS = "eps"
    X0 = "x0"
    V = "v"


class Sampler(_Choice):
    """How a step turns x0_hat into x_prev.

    ddpm: ancestral sampling (Ho et al. Algorithm 2); ddim: Song et al. eq. 12 with eta;
    dpm++2m: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), the multistep data-prediction ODE solver;
    dpm++2m-sde: its SDE variant (diffusers' ``sde-dpmsolver++``). Derivations: docs/design.md, "Multistep solvers".
    """

    DDPM = "ddpm"
    DDIM = "ddim"
    DPMPP_2M = "dpm++2m"
    DPMPP_2M_SDE = "dpm++2m-sde"

    @property
    def multistep(self) -> bool:
        """True when a step reads the previous step's x0_hat (the history buffer h; column c may be != 0)."""
        return self in (Sampler.DPMPP_2M, Sampler.DPMPP_2M_SDE)

    @property
    def default_spacing(self) -> Spacing:
        """Respacing when none is asked for: improved-diffusion's uniform one for ddpm/ddim (unchanged results),
        trailing for the multistep solvers, whose extrapolation blurs across uniform spacing's last huge
        lambda step onto t = 0 (ddpm/spacing.py has the measurement)."""
        return Spacing.TRAILING if self.multistep else Spacing.UNIFORM


class Spacing(_Choice):
    """Which timesteps ``Schedule.respace`` keeps (ddpm/spacing.py): uniform (improved-diffusion's), trailing,
    logsnr."""

    UNIFORM = "uniform"
    TRAILING = "trailing"
    LOGSNR = "logsnr"


class Variance(_Choice):
    """DDPM reverse variance: fixed_small = posterior variance beta_tilde, fixed_large = beta (seeds' simple_var),
    learned_range = the model interpolates log-variances between the two (Nichol & Dhariwal 2021 eq. 15; diffusers'
    ``variance_type="learned_range"``), from a second output v: sigma^2 = exp(frac log beta + (1 - frac) log
    beta_tilde), frac = (v + 1) / 2."""

    FIXED_SMALL = "fixed_small"
    FIXED_LARGE = "fixed_large"
    LEARNED_RANGE = "learned_range"
