"""Noise schedules and the per-step coefficient table: the one source of truth for the project's math.

Everything is computed in float64 (improved-diffusion: "use float64 for accuracy") and cast to float32 only
when a kernel needs the table. Index conventions: a Schedule has ``len(schedule)`` entries; entry ``i``
(0 = the cleanest step) corresponds to the ORIGINAL timestep ``schedule.timesteps[i]`` that the model is fed.

Every sampler step is one affine form (docs/design.md, "The step"):

    x0_hat = clip(p_i * x + q_i * m, -c, c)          # m = model output
    x_prev = a_i * x + b_i * x0_hat + c_i * h + sigma_i * z
    h <- x0_hat                                      # history: the previous step's x0_hat (multistep solvers)

so a step is six floats (a, b, c, p, q, sigma); :func:`coefficient_table` builds the [steps, 6] table. A
learned-range variance (ddpm sampler) adds two columns (lv0, lv1): sigma_e = exp(lv0 + lv1 v) per element, v the
model's variance output ([steps, 8]; docs/design.md, "Operands of the step").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .choices import Prediction, Sampler, Spacing, Variance
from .errors import InvalidArgumentError
from .solvers import dpmpp_2m
from .spacing import kept_timesteps

__all__ = [
    "Prediction",
    "Sampler",
    "Variance",
    "Spacing",
    "Schedule",
    "coefficient_table",
    "COEF_A",
    "COEF_B",
    "COEF_C",
    "COEF_P",
    "COEF_Q",
    "COEF_SIGMA",
    "COEF_LV0",
    "COEF_LV1",
]

# Column order of the coefficient table: x_prev = a x + b x0_hat + c h + sigma z, x0_hat = clip(p x + q m), where
# h is the previous step's x0_hat (multistep solvers; c = 0 for DDPM and DDIM). docs/design.md, "The step".
COEF_A, COEF_B, COEF_C, COEF_P, COEF_Q, COEF_SIGMA = range(6)
NUM_COEFS = 6
KINDS = ("linear", "scaled_linear", "cosine", "custom")  # Schedule.config["kind"]
# Two more columns for a learned-range variance (sampler ddpm, variance learned_range): sigma_e = exp(lv0 + lv1 v),
# v the model's variance output in [-1, 1] (Nichol & Dhariwal 2021 eq. 15). Such a table is [steps, 8].
COEF_LV0, COEF_LV1 = 6, 7
NUM_COEFS_LEARNED = 8


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float64) if a.dtype != np.int64 else np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Schedule:
    """A variance schedule over ``len(betas)`` steps.

    Attributes:
        betas: [T] float64, beta_i in (0, 1).
        timesteps: [T] int64, the original timestep index of each entry (0..T-1 for a full schedule).
        config: JSON-able description that rebuilds the *base* schedule (kind + parameters), plus
            ``"steps"`` when the schedule was respaced. Stored in artifact metadata.
    """

    betas: np.ndarray
    timesteps: np.ndarray
    config: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise InvalidArgumentError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
            bad = betas[~((betas > 0) & (betas < 1))]
            raise InvalidArgumentError(
                f"betas must lie in the open interval (0, 1); got {bad[:3].tolist()} "
                f"(min {np.nanmin(betas):.3g}, max {np.nanmax(betas):.3g})"
            )
        ts = np.asarray(self.timesteps, dtype=np.int64)
        if ts.shape != betas.shape:
            raise InvalidArgumentError(f"timesteps shape {ts.shape} != betas shape {betas.shape}")
        if np.any(np.diff(ts) <= 0) or ts[0] < 0:
            raise InvalidArgumentError("timesteps must be non-negative and strictly increasing")
        object.__setattr__(self, "betas", _readonly(betas))
        object.__setattr__(self, "timesteps", _readonly(ts))

    # ---- constructors ----
    @classmethod
    def linear(cls, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
        """Ho et al.'s linear schedule: betas rise linearly from beta_start to beta_end over T steps."""
        T = _check_timesteps(timesteps)
        for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not (0 < v < 1):
                raise InvalidArgumentError(f"{name} must lie in (0, 1), got {v}")
        if beta_start > beta_end:
            raise InvalidArgumentError(
                f"beta_start ({beta_start}) must not exceed beta_end ({beta_end}); the DDPM schedule rises"
            )
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
        cfg = {"kind": "linear", "timesteps": T, "beta_start": float(beta_start), "beta_end": float(beta_end)}
        return cls(betas, np.arange(T, dtype=np.int64), cfg)

    @classmethod
    def scaled_linear(cls, timesteps: int, beta_start: float, beta_end: float) -> Schedule:
        """sqrt(beta) rises linearly: betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (diffusers'
        ``scaled_linear``, from latent diffusion)."""
        base = cls.linear(timesteps, beta_start, beta_end)  # the same argument checks
        betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), len(base), dtype=np.float64) ** 2
        return cls(betas, base.timesteps, {**base.config, "kind": "scaled_linear"})

    @classmethod
    def cosine(cls, timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
        """Nichol & Dhariwal's cosine schedule: alphabar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2,
        betas = 1 - alphabar(t+1)/alphabar(t) clipped at max_beta."""
        T = _check_timesteps(timesteps)
        if not (s >= 0):
            raise InvalidArgumentError(f"cosine offset s must be >= 0, got {s}")
        t = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
        cfg = {"kind": "cosine", "timesteps": T, "s": float(s), "max_beta": float(max_beta)}
        return cls(betas, np.arange(T, dtype=np.int64), cfg)

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray) -> Schedule:
        """Any custom schedule given by its betas (each in (0, 1))."""
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or b.size < 1:
            raise InvalidArgumentError(f"betas must be a non-empty 1-D sequence, got shape {b.shape}")
        return cls(b, np.arange(b.size, dtype=np.int64), {"kind": "custom", "betas": b.tolist()})

    @classmethod
    def from_config(cls, config: dict) -> Schedule:
        """Rebuild a schedule from :attr:`config` (as stored in checkpoint / ONNX / engine metadata)."""
        if not isinstance(config, dict) or "kind" not in config:
            raise InvalidArgumentError(f"schedule config must be a dict with a 'kind', got {config!r}")
        kind = config["kind"]
        try:
            if kind in ("linear", "scaled_linear"):
                make = cls.linear if kind == "linear" else cls.scaled_linear
                base = make(int(config["timesteps"]), float(config["beta_start"]), float(config["beta_end"]))
            elif kind == "cosine":
                base = cls.cosine(
                    int(config["timesteps"]),
                    float(config.get("s", 0.008)),
                    float(config.get("max_beta", 0.999)),
                )
            elif kind == "custom":
                base = cls.from_betas(config["betas"])
            else:
                raise InvalidArgumentError(f"unknown schedule kind {kind!r}; allowed: {', '.join(KINDS)}")
        except KeyError as e:
            raise InvalidArgumentError(
                f"schedule config of kind {kind!r} lacks the key {e.args[0]!r}"
            ) from None
        if "steps" not in config:
            return base
        return base.respace(int(config["steps"]), spacing=config.get("spacing", "uniform"))

    @classmethod
    def create(cls, kind: str, timesteps: int = 1000) -> Schedule:
        """By name with default parameters: ``linear`` or ``cosine``."""
        if kind == "linear":
            return cls.linear(timesteps)
        if kind == "cosine":
            return cls.cosine(timesteps)
        raise InvalidArgumentError(f"unknown schedule kind {kind!r}; allowed: linear, cosine")

    # ---- derived quantities (float64) ----
    def __len__(self) -> int:
        return int(self.betas.size)

    @property
    def num_timesteps(self) -> int:
        """T of the original (un-respaced) schedule: the model's timestep range is 0..T-1."""
        return int(self.config.get("timesteps", len(self.config.get("betas", self.betas))))

    @property
    def alphas(self) -> np.ndarray:
        """alpha_i = 1 - beta_i, [T] float64."""
        return self._derived("alphas", lambda: 1.0 - self.betas)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """alphabar_i = prod_{j<=i} alpha_j, [T] float64."""
        return self._derived("alphas_cumprod", lambda: np.cumprod(self.alphas))

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        """alphabar_{i-1} with alphabar_{-1} = 1, [T] float64."""
        return self._derived("alphas_cumprod_prev", lambda: np.append(1.0, self.alphas_cumprod[:-1]))

    @property
    def posterior_variance(self) -> np.ndarray:
        """beta_tilde_i = beta_i (1 - alphabar_{i-1}) / (1 - alphabar_i) (Ho et al. eq. 7), [T] float64."""
        return self._derived(
            "posterior_variance",
            lambda: self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod),
        )

    @property
    def snr(self) -> np.ndarray:
        """Signal-to-noise ratio alphabar / (1 - alphabar), [T] float64."""
        return self._derived("snr", lambda: self.alphas_cumprod / (1.0 - self.alphas_cumprod))

    def _derived(self, key: str, fn) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = _readonly(fn())
        return self._cache[key]

    # ---- respacing ----
    def respace(self, steps: int, spacing: Spacing | str = "uniform") -> Schedule:
        """``steps`` of the entries, with betas recomputed as 1 - alphabar_i / alphabar_prev over the kept ones
        (improved-diffusion's respacing); ``timesteps`` keeps the original indices. ``spacing`` picks which
        entries (ddpm/spacing.py): uniform (improved-diffusion's, keeps 0 and T-1), trailing, or logsnr.
        ``respace(len(self))`` returns an equal schedule."""
        n = len(self)
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise InvalidArgumentError(f"steps must be an integer, got {steps!r}")
        if not (1 <= steps <= n):
            raise InvalidArgumentError(f"steps must be in 1..{n} (the schedule's length), got {steps}")
        spacing = Spacing.parse(spacing)
        if steps == n:
            return self
        keep = kept_timesteps(self.alphas_cumprod, int(steps), spacing)
        ab = self.alphas_cumprod[keep]
        ab_prev = np.append(1.0, ab[:-1])
        betas = 1.0 - ab / ab_prev
        cfg = {**self.config, "steps": int(steps)}
        if spacing is not Spacing.UNIFORM:
            cfg["spacing"] = spacing.value
        return Schedule(betas, self.timesteps[keep], cfg)

    # ---- coefficient tables ----
    def coefficients(
        self,
        prediction: Prediction | str = "eps",
        sampler: Sampler | str = "ddpm",
        variance: Variance | str = "fixed_small",
        eta: float = 0.0,
    ) -> np.ndarray:
        """Cached :func:`coefficient_table` of this schedule (read-only [steps, 6] float64; [steps, 8] for ddpm
        with ``variance="learned_range"``).

        ``variance`` matters to ddpm only, ``eta`` to ddim only; the dpm++ samplers ignore ``variance`` and
        refuse ``eta != 0`` (see :func:`coefficient_table`)."""
        key = (
            "coef",
            Prediction.parse(prediction),
            Sampler.parse(sampler),
            Variance.parse(variance),
            float(eta),
        )
        if key not in self._cache:
            self._cache[key] = _readonly(coefficient_table(self, *key[1:]))
        return self._cache[key]

    def check_index(self, i: int) -> int:
        """Validate a step index 0 <= i < len(self)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not (0 <= i < len(self)):
            raise InvalidArgumentError(f"step index i must be an integer in 0..{len(self) - 1}, got {i!r}")
        return int(i)


def _check_timesteps(T: Any) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise InvalidArgumentError(f"timesteps T must be an integer >= 1, got {T!r}")
    return int(T)


def coefficient_table(
    schedule: Schedule,
    prediction: Prediction | str = "eps",
    sampler: Sampler | str = "ddpm",
    variance: Variance | str = "fixed_small",
    eta: float = 0.0,
) -> np.ndarray:
    """The [steps, 6] float64 table of (a, b, c, p, q, sigma), row i for step i (0 = cleanest); [steps, 8] with
    (lv0, lv1) appended for sampler ddpm with variance learned_range.

    p, q turn the model output m into x0_hat = p x + q m:
        eps: (sqrt(1/ab), -sqrt(1/ab - 1))   (Ho et al. eq. 15 solved for x0)
        v:   (sqrt(ab), -sqrt(1 - ab))       (Salimans & Ho, x0 = sqrt(ab) x - sqrt(1-ab) v)
        x0:  (0, 1)
    DDPM: (a, b) are the posterior-mean coefficients of x_t and x0 (Ho et al. eq. 7),
        sigma = sqrt(beta_tilde) (fixed_small) or sqrt(beta) (fixed_large); sigma_0 = 0 (Algorithm 2: z = 0 at t = 1).
        learned_range (Nichol & Dhariwal eq. 15): columns 0..5 as fixed_small, plus lv0 = (min_log + max_log) / 4
        and lv1 = (max_log - min_log) / 4 with min_log = log(max(beta_tilde, 1e-20)), max_log = log(beta) (beta of
        this, possibly respaced, schedule, as improved-diffusion and diffusers respace), so that the kernels'
        sigma_e = exp(lv0 + lv1 v) = exp((frac max_log + (1 - frac) min_log) / 2), frac = (v + 1) / 2; still no
        noise where sigma = 0 (the last step). ddim and the dpm++ samplers use the model's mean only: with
        learned_range they get the table of fixed_small (6 columns).
    DDIM (Song et al. eq. 12): sigma = eta sqrt((1 - ab_prev)/(1 - ab)) sqrt(1 - ab/ab_prev),
        k = sqrt(1 - ab_prev - sigma^2), a = k / sqrt(1 - ab), b = sqrt(ab_prev) - k sqrt(ab) / sqrt(1 - ab).
    dpm++2m / dpm++2m-sde: see :func:`_dpmpp_2m`; ``variance`` is ignored (the solver fixes its own noise) and
        ``eta`` must be 0 (it is DDIM's knob; the stochastic multistep sampler is dpm++2m-sde).
    c = 0 for ddpm and ddim: they never read the history.
    """
    prediction = Prediction.parse(prediction)
    sampler = Sampler.parse(sampler)
    variance = Variance.parse(variance)
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise InvalidArgumentError(f"eta must be a finite number >= 0, got {eta}")
    if sampler.multistep and eta != 0.0:
        # Silently ignoring eta would let a user believe they asked for a stochastic dpm++2m.
        raise InvalidArgumentError(
            f"eta applies to the ddim sampler only; sampler {sampler} needs eta = 0, got {eta} "
            f"(use sampler {Sampler.DPMPP_2M_SDE} for a stochastic multistep sampler)"
        )

    ab = schedule.alphas_cumprod
    ab_prev = schedule.alphas_cumprod_prev
    beta = schedule.betas
    table = np.zeros((len(schedule), NUM_COEFS), dtype=np.float64)

    if prediction is Prediction.EPS:
        table[:, COEF_P] = np.sqrt(1.0 / ab)
        table[:, COEF_Q] = -np.sqrt(1.0 / ab - 1.0)
    elif prediction is Prediction.V:
        table[:, COEF_P] = np.sqrt(ab)
        table[:, COEF_Q] = -np.sqrt(1.0 - ab)
    else:
        table[:, COEF_P] = 0.0
        table[:, COEF_Q] = 1.0

    if sampler is Sampler.DDPM:
        table[:, COEF_A] = (1.0 - ab_prev) * np.sqrt(schedule.alphas) / (1.0 - ab)
        table[:, COEF_B] = beta * np.sqrt(ab_prev) / (1.0 - ab)
        var = beta if variance is Variance.FIXED_LARGE else schedule.posterior_variance
        sigma = np.sqrt(var)
        sigma[0] = 0.0
        if variance is Variance.LEARNED_RANGE:
            min_log = np.log(np.maximum(schedule.posterior_variance, 1e-20))  # beta_tilde_0 = 0
            max_log = np.log(beta)
            table = np.concatenate([table, np.zeros((len(schedule), 2))], axis=1)
            table[:, COEF_LV0] = 0.25 * (min_log + max_log)
            table[:, COEF_LV1] = 0.25 * (max_log - min_log)
    elif sampler is Sampler.DDIM:
        sigma = eta * np.sqrt((1.0 - ab_prev) / (1.0 - ab)) * np.sqrt(1.0 - ab / ab_prev)
        k = np.sqrt(np.maximum(1.0 - ab_prev - sigma**2, 0.0))
        table[:, COEF_A] = k / np.sqrt(1.0 - ab)
        table[:, COEF_B] = np.sqrt(ab_prev) - k * np.sqrt(ab) / np.sqrt(1.0 - ab)
    else:
        a, b, c, sigma = dpmpp_2m(ab, ab_prev, sde=sampler is Sampler.DPMPP_2M_SDE)
        table[:, COEF_A], table[:, COEF_B], table[:, COEF_C] = a, b, c
    table[:, COEF_SIGMA] = sigma
    return table
