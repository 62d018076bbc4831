"""Plain-torch reference math: the forward process q_sample, prediction conversions, and one reverse step.

``step`` is the reference the fused C++/CUDA kernel is checked against: it evaluates the same affine form
from the same float32-cast coefficient table, in the same order of operations; with a learned-range variance it
reads the model's variance output, and :class:`DynamicThreshold` (Imagen's dynamic thresholding) may stand where a
clip bound is accepted. Classifier-free guidance is the caller's: ``step`` on ``u + S (m - u)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InvalidArgumentError
from .schedule import Prediction, Sampler, Schedule, Variance

__all__ = [
    "step",
    "step_coefficients",
    "q_sample",
    "extract",
    "x0_from_eps",
    "eps_from_x0",
    "x0_from_v",
    "eps_from_v",
    "v_from_x0_eps",
    "training_target",
    "check_clip",
    "check_clip_or_threshold",
    "DynamicThreshold",
]


def extract(values: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] as float32 on t's device, shaped [N, 1, 1, ...] to broadcast against an ndim-dimensional x."""
    v = torch.as_tensor(np.asarray(values), dtype=torch.float64, device=t.device)[t.long()]
    return v.to(torch.float32).reshape(-1, *([1] * (ndim - 1)))


def _check_t(schedule: Schedule, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise InvalidArgumentError(f"t must have shape [N] = [{x.shape[0]}], got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= len(schedule)):
        raise InvalidArgumentError(
            f"t must index the schedule: 0..{len(schedule) - 1}, got {t.min()}..{t.max()}"
        )
    return t


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise InvalidArgumentError(f"shapes must match: {shapes}")


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Diffuse x0 [N, ...] to x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) noise (Ho et al. eq. 4)."""
    _check_same_shape(x0=x0, noise=noise)
    t = _check_t(schedule, t, x0)
    ab = schedule.alphas_cumprod
    return extract(np.sqrt(ab), t, x0.dim()) * x0 + extract(np.sqrt(1.0 - ab), t, x0.dim()) * noise


def x0_from_eps(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(1/ab) x_t - sqrt(1/ab - 1) eps."""
    ab = schedule.alphas_cumprod
    t = _check_t(schedule, t, x_t)
    return (
        extract(np.sqrt(1.0 / ab), t, x_t.dim()) * x_t - extract(np.sqrt(1.0 / ab - 1.0), t, x_t.dim()) * eps
    )


def eps_from_x0(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (sqrt(1/ab) x_t - x0) / sqrt(1/ab - 1)."""
    ab = schedule.alphas_cumprod
    t = _check_t(schedule, t, x_t)
    return (extract(np.sqrt(1.0 / ab), t, x_t.dim()) * x_t - x0) / extract(
        np.sqrt(1.0 / ab - 1.0), t, x_t.dim()
    )


def x0_from_v(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(ab) x_t - sqrt(1 - ab) v."""
    ab = schedule.alphas_cumprod
    t = _check_t(schedule, t, x_t)
    return extract(np.sqrt(ab), t, x_t.dim()) * x_t - extract(np.sqrt(1.0 - ab), t, x_t.dim()) * v


def eps_from_v(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(1 - ab) x_t + sqrt(ab) v."""
    ab = schedule.alphas_cumprod
    t = _check_t(schedule, t, x_t)
    return extract(np.sqrt(1.0 - ab), t, x_t.dim()) * x_t + extract(np.sqrt(ab), t, x_t.dim()) * v


def v_from_x0_eps(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)."""
    ab = schedule.alphas_cumprod
    t = _check_t(schedule, t, x0)
    return extract(np.sqrt(ab), t, x0.dim()) * eps - extract(np.sqrt(1.0 - ab), t, x0.dim()) * x0


def training_target(
    schedule: Schedule, prediction: Prediction | str, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """What the network is trained to output at (x_t, t) for a prediction type: eps, x0 or v."""
    prediction = Prediction.parse(prediction)
    if prediction is Prediction.EPS:
        return noise
    if prediction is Prediction.X0:
        return x0
    return v_from_x0_eps(schedule, x0, t, noise)


@dataclass(frozen=True)
class DynamicThreshold:
    """Dynamic thresholding of x0_hat (Saharia et al. 2022, Imagen; diffusers' ``_threshold_sample``), usable
    wherever a clip bound is: per sample n, s_n = clamp(quantile(|x0_hat_n|, ratio), 1, max_value) over the
    sample's values (torch.quantile's linear interpolation), then x0_hat_n = clamp(x0_hat_n, -s_n, s_n) / s_n.
    With s_n = 1 that is the clip at 1; a saturated sample is pulled inwards instead of clipped flat.

    CLI text: ``dynamic:RATIO`` or ``dynamic:RATIO:MAX`` (:meth:`parse`), e.g. ``dynamic:0.995``.
    """

    ratio: float  # the quantile of |x0_hat| taken per sample, in (0, 1] (Imagen: 0.995)
    max_value: float = math.inf  # upper bound on s_n, >= 1 (diffusers' sample_max_value); inf: none

    def __post_init__(self) -> None:
        for name in ("ratio", "max_value"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise InvalidArgumentError(
                    f"DynamicThreshold {name} must be a number, got {type(v).__name__} {v!r}"
                )
            object.__setattr__(self, name, float(v))
        if not 0.0 < self.ratio <= 1.0:
            raise InvalidArgumentError(f"DynamicThreshold ratio must be in (0, 1], got {self.ratio}")
        if not self.max_value >= 1.0:
            raise InvalidArgumentError(
                f"DynamicThreshold max_value must be >= 1 (inf for no bound), got {self.max_value}"
            )

    @classmethod
    def parse(cls, text: str) -> DynamicThreshold:
        """``"dynamic:RATIO"`` or ``"dynamic:RATIO:MAX"`` (a CLI option's text) as a DynamicThreshold."""
        parts = str(text).strip().split(":")
        if len(parts) not in (2, 3) or parts[0].lower() != "dynamic":
            raise InvalidArgumentError(
                f"dynamic threshold must read dynamic:RATIO or dynamic:RATIO:MAX (e.g. dynamic:0.995), got {text!r}"
            )
        try:
            values = [float(v) for v in parts[1:]]
        except ValueError:
            raise InvalidArgumentError(
                f"dynamic threshold {text!r}: RATIO and MAX must be numbers (e.g. dynamic:0.995:2)"
            ) from None
        return cls(*values)

    def __str__(self) -> str:
        tail = "" if math.isinf(self.max_value) else f":{self.max_value:g}"
        return f"dynamic:{self.ratio:g}{tail}"

    def thresholds(self, x0_hat: torch.Tensor) -> torch.Tensor:
        """s [N] float32 of x0_hat [N, ...] by torch.quantile (the reference; the kernels compute the same)."""
        flat = x0_hat.abs().reshape(x0_hat.shape[0], -1)
        rows = max(1, (1 << 24) // max(1, flat.shape[1]))  # torch.quantile takes at most 2^24 values per call
        s = (
            torch.cat([torch.quantile(c, self.ratio, dim=1) for c in flat.split(rows)])
            if flat.shape[0]
            else flat[:, 0]
        )
        return s.clamp(min=1.0, max=self.max_value)

    def apply(self, x0_hat: torch.Tensor) -> torch.Tensor:
        """clamp(x0_hat_n, -s_n, s_n) / s_n per sample n."""
        s = self.thresholds(x0_hat).reshape(-1, *([1] * (x0_hat.dim() - 1)))
        return x0_hat.clamp(-s, s) / s


def check_clip(clip: float | None) -> float:
    """None -> inf (no clipping); otherwise a positive finite bound c."""
    if clip is None:
        return math.inf
    if isinstance(clip, DynamicThreshold):
        raise InvalidArgumentError(
            f"clip must be a positive number (or None for no clipping) here, got {clip} (dynamic thresholding "
            "is taken by ddpm.step, ddpm.fused_step and the step tables)"
        )
    c = float(clip)
    if not (c > 0) or math.isnan(c):
        raise InvalidArgumentError(f"clip must be a positive number (or None for no clipping), got {clip}")
    return c


def check_clip_or_threshold(clip: float | DynamicThreshold | None) -> float | DynamicThreshold:
    """:func:`check_clip`, or a :class:`DynamicThreshold` as it is (it checked itself when it was made)."""
    return clip if isinstance(clip, DynamicThreshold) else check_clip(clip)


def step_coefficients(
    schedule: Schedule,
    i: int,
    *,
    prediction: Prediction | str = "eps",
    sampler: Sampler | str = "ddpm",
    variance: Variance | str = "fixed_small",
    eta: float = 0.0,
) -> tuple[float, ...]:
    """Row i of the coefficient table, cast to float32 (as the kernels see it): (a, b, c, p, q, sigma), plus
    (lv0, lv1) for ddpm with a learned-range variance."""
    i = schedule.check_index(i)
    row = schedule.coefficients(prediction, sampler, variance, eta)[i].astype(np.float32)
    return tuple(float(v) for v in row)  # type: ignore[return-value]


def step(
    schedule: Schedule,
    i: int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    noise: torch.Tensor | None,
    *,
    prediction: Prediction | str = "eps",
    sampler: Sampler | str = "ddpm",
    variance: Variance | str = "fixed_small",
    eta: float = 0.0,
    clip: float | DynamicThreshold | None = None,
    history: torch.Tensor | None = None,
    variance_output: torch.Tensor | None = None,
) -> torch.Tensor:
    """One reverse step x_i -> x_{i-1} (reference, plain torch, float32 in and out).

    Evaluates x0_hat = clip(p x + q m), x_prev = a x + b x0_hat + c h + sigma z with the float32-cast row i
    of the coefficient table, in the kernels' order of operations, then h <- x0_hat.

    Args:
        schedule: the (possibly respaced) schedule; ``i`` indexes it, 0 = the cleanest step.
        x: x_t, [N, ...] float32.
        model_output: the network's output at (x, schedule.timesteps[i]), same shape as x (for guidance, the
            guided output u + S (m - u)).
        noise: z ~ N(0, I) like x; ignored (may be None) where sigma_i = 0.
        clip: clip x0_hat to [-clip, clip]; None for no clipping; or a :class:`DynamicThreshold`.
        history: h, a float32 tensor like x holding the previous step's x0_hat (zeros before the first step).
            Read where c_i != 0, then overwritten in place with this step's x0_hat. Required by the multistep
            samplers (dpm++2m, dpm++2m-sde); optional (and still updated) for ddpm and ddim.
        variance_output: v [N, ...] like x, the model's variance output, for ``variance="learned_range"``:
            required with sampler ddpm (sigma = exp(lv0 + lv1 v) where sigma_i != 0), ignored by ddim and the
            dpm++ samplers (they use the mean only); refused with any other variance.
    Returns:
        x_{i-1}, a new float32 tensor like x.
    """
    sampler = Sampler.parse(sampler)
    variance = Variance.parse(variance)
    row = step_coefficients(schedule, i, prediction=prediction, sampler=sampler, variance=variance, eta=eta)
    a, b, c_h, p, q, sigma = row[:6]
    bound = check_clip_or_threshold(clip)
    if x.dtype != torch.float32 or model_output.dtype != torch.float32:
        raise InvalidArgumentError(
            f"x and model_output must be float32, got {x.dtype} and {model_output.dtype}"
        )
    _check_same_shape(x=x, model_output=model_output)
    if history is None and sampler.multistep:
        raise InvalidArgumentError(
            f"sampler {sampler} is multistep and needs history: a float32 tensor like x holding the previous "
            "step's x0_hat (zeros before the first step), got None"
        )
    if history is not None:
        if history.dtype != torch.float32:
            raise InvalidArgumentError(f"history must be float32, got {history.dtype}")
        _check_same_shape(x=x, history=history)
    learned = len(row) == 8
    _check_variance_output(variance, sampler, variance_output, x)
    x0_hat = p * x + q * model_output
    if isinstance(bound, DynamicThreshold):
        x0_hat = bound.apply(x0_hat)
    elif math.isfinite(bound):
        x0_hat = x0_hat.clamp(-bound, bound)
    out = a * x + b * x0_hat
    if c_h != 0.0 and history is not None:  # c_h != 0 only for multistep samplers, which require history
        out = out + c_h * history
    if sigma != 0.0:
        if noise is None:
            raise InvalidArgumentError(f"step {i} has sigma = {sigma:.3g} > 0 and needs noise, got None")
        _check_same_shape(x=x, noise=noise)
        if learned:  # Nichol & Dhariwal eq. 15: exp of the interpolated half log-variance
            out = out + torch.exp(row[6] + row[7] * variance_output) * noise
        else:
            out = out + sigma * noise
    if history is not None:
        history.copy_(x0_hat)  # after the read above: h held the previous step's x0_hat until now
    return out


def _check_variance_output(
    variance: Variance, sampler: Sampler, variance_output: torch.Tensor | None, x: torch.Tensor
) -> None:
    if variance is not Variance.LEARNED_RANGE:
        if variance_output is not None:
            raise InvalidArgumentError(
                f"variance_output is read only with variance='learned_range', got variance='{variance}'"
            )
        return
    if variance_output is None:
        if sampler is Sampler.DDPM:
            raise InvalidArgumentError(
                "variance='learned_range' with sampler ddpm needs variance_output: the model's variance output v "
                "(the second half of its channels), like x"
            )
        return
    if not isinstance(variance_output, torch.Tensor) or variance_output.dtype != torch.float32:
        raise InvalidArgumentError(
            f"variance_output must be a float32 tensor, got {getattr(variance_output, 'dtype', variance_output)}"
        )
    _check_same_shape(x=x, variance_output=variance_output)
