"""Views of the forward process q(x_t | x0): diffusing images, noise levels, where a reverse run starts, and
DDIM's deterministic encoding (the eta = 0 ODE run forwards).

    eps     = Philox(seed, sample k, step 0, stream 1)     the same eps as sample k's x_T in `ddpm run --seed`
    x_t     = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps             Ho et al. eq. 4 (``ddpm.q_sample``)
    SNR(t)  = ab_t / (1 - ab_t), shown in dB
    x = x0 + sigma z  <=>  x_t = sqrt(ab_t) x  with  sigma^2 = (1 - ab_t) / ab_t

The forward noise is drawn from stream 1 at step 0 (docs/design.md, "Noise"): the initial-noise stream, so
diffusing image k to t = T-1 lands within sqrt(ab_{T-1}) (0.006 on the linear schedule) of the x_T that
``ddpm run --seed S`` starts sample k from, and it never collides with the per-step z of a reverse run
(stream 0) that continues from x_t.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .diffusion import check_clip, q_sample
from .errors import InvalidArgumentError
from .noise import STREAM_INITIAL, normal
from .schedule import COEF_P, COEF_Q, Prediction, Schedule

__all__ = [
    "FORWARD_STREAM",
    "forward_noise",
    "check_timestep",
    "diffuse",
    "snr_db",
    "timestep_for_sigma",
    "scale_pixel_noise",
    "start_schedule",
    "encoding_table",
    "ddim_encode",
    "slerp",
]

FORWARD_STREAM = STREAM_INITIAL  # Philox counter word 3 of the forward noise eps (module docstring)

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def forward_noise(
    seed: int, shape: Sequence[int], *, sample_offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """eps ~ N(0, I) [N, *sample_shape] for images sample_offset .. sample_offset + N - 1 (stream 1, step 0)."""
    return normal(seed, shape, step=0, stream=FORWARD_STREAM, sample_offset=sample_offset, device=device)


def check_timestep(schedule: Schedule, t: int, *, name: str = "t") -> int:
    """t as an int in 0..T-1, the model's timestep range (``schedule.num_timesteps``)."""
    last = int(schedule.timesteps[-1])
    try:
        if isinstance(t, bool):
            raise TypeError
        value = operator.index(t)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be an integer timestep in 0..{last}, got {t!r}") from None
    if not 0 <= value <= last:
        raise InvalidArgumentError(f"{name} must be a timestep in 0..{last}, got {value}")
    return value


def _entry(schedule: Schedule, t: int) -> int:
    """The schedule entry holding timestep t (entry = t for a full schedule)."""
    k = int(np.searchsorted(schedule.timesteps, t))
    if k >= len(schedule) or int(schedule.timesteps[k]) != t:
        raise InvalidArgumentError(f"timestep {t} is not kept by this respaced schedule")
    return k


def diffuse(
    images: torch.Tensor,
    t: int | Sequence[int],
    *,
    schedule: Schedule,
    seed: int = 0,
    sample_offset: int = 0,
) -> torch.Tensor:
    """x_t of each image at each timestep t, with one eps per image shared by every t (q_sample, Ho et al. eq. 4).

    Args:
        images: x0 [N, *sample_shape] float32 in the data range [-1, 1].
        t: one timestep, or a sequence of K timesteps, each in 0..T-1.
        schedule: the forward process (a training schedule: ``Schedule.linear(1000)``, or the model's).
        seed / sample_offset: image k's eps is Philox (seed, sample sample_offset + k, step 0, stream 1).
    Returns:
        x_t [N, *sample_shape] for one t, or [K, N, *sample_shape] for a sequence; float32 on images' device.
    """
    x0 = _check_x0(images)
    many = isinstance(t, (Sequence, np.ndarray, torch.Tensor))
    ts = [int(v) if isinstance(v, (np.integer, torch.Tensor)) else v for v in t] if many else [t]  # type: ignore[union-attr]
    if not ts:
        raise InvalidArgumentError("t must name at least one timestep")
    entries = [_entry(schedule, check_timestep(schedule, v)) for v in ts]
    eps = forward_noise(seed, x0.shape, sample_offset=sample_offset, device=x0.device)
    out = [q_sample(schedule, x0, torch.full((x0.shape[0],), k, device=x0.device), eps) for k in entries]
    return torch.stack(out) if many else out[0]


def _check_x0(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() < 2 or images.shape[0] < 1:
        what = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidArgumentError(
            f"images must be a float tensor [N, *sample_shape] with N >= 1, got {what}"
        )
    if not images.is_floating_point():
        raise InvalidArgumentError(f"images must be floating point in [-1, 1], got {images.dtype}")
    x0 = images.detach().float().contiguous()
    if not bool(torch.isfinite(x0).all()):
        raise InvalidArgumentError("images contain NaN or Inf values")
    return x0


def snr_db(schedule: Schedule, t: int) -> float:
    """10 log10(ab_t / (1 - ab_t)): the signal-to-noise ratio of x_t in decibels."""
    ab = float(schedule.alphas_cumprod[_entry(schedule, check_timestep(schedule, t))])
    return 10.0 * math.log10(ab / (1.0 - ab))


def timestep_for_sigma(schedule: Schedule, sigma: float) -> int:
    """The timestep whose pixel-space noise sqrt((1 - ab_t) / ab_t) is closest to ``sigma``.

    An image x = x0 + sigma z in [-1, 1] units is x_t / sqrt(ab_t) with sigma^2 = (1 - ab_t) / ab_t: divide
    q_sample's x_t by sqrt(ab_t). Levels beyond the schedule's last one (sigma ~ 160 on the linear T = 1000
    schedule) map to T-1.
    """
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"sigma must be a positive number, got {sigma!r}") from None
    if not (s > 0) or not math.isfinite(s):
        raise InvalidArgumentError(f"sigma must be a positive finite number, got {sigma!r}")
    ab = schedule.alphas_cumprod
    levels = np.sqrt((1.0 - ab) / ab)
    return int(schedule.timesteps[int(np.argmin(np.abs(levels - s)))])


def scale_pixel_noise(schedule: Schedule, x: torch.Tensor, t: int) -> torch.Tensor:
    """x = x0 + sigma_t z (pixel-space noise) -> x_t = sqrt(ab_t) x, the state the reverse process expects."""
    ab = float(schedule.alphas_cumprod[_entry(schedule, check_timestep(schedule, t))])
    return x * math.sqrt(ab)


def start_schedule(schedule: Schedule, t: int, steps: int | None = None) -> tuple[Schedule, int]:
    """(schedule, start) for a reverse run from timestep t: the entries with timestep <= t, respaced to ``steps``.

    The prefix keeps the base schedule's alphas_cumprod (a cumulative product of its own betas), and respacing
    always keeps both ends (improved-diffusion semantics, docs/design.md "Respacing"), so ``steps`` reverse
    steps run from the largest kept timestep <= t (t itself on a full schedule) down to 0; ``steps=None`` runs
    every entry. ``start`` is the index of the first step, ``len(schedule) - 1``.
    """
    t = check_timestep(schedule, t)
    k = int(np.searchsorted(schedule.timesteps, t, side="right"))  # entries 0..k-1 have timestep <= t
    prefix = Schedule(schedule.betas[:k], schedule.timesteps[:k], {**schedule.config, "start": t})
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= k:
            raise InvalidArgumentError(
                f"steps must be an integer in 1..{k} (the schedule entries from timestep {t} down to 0), "
                f"got {steps!r}"
            )
        prefix = prefix.respace(int(steps))
    return prefix, len(prefix) - 1


def encoding_table(schedule: Schedule, prediction: Prediction | str) -> np.ndarray:
    """[steps - 1, 4] float64 (a, b, p, q): row k takes x at entry k to entry k + 1 along the DDIM ODE.

    DDIM's eta = 0 update (Song et al. 2021, eq. 12) with the roles of the two alphabars swapped:
    x0_hat = p x + q m (p, q as in the reverse table, docs/design.md "The step"),
    eps_hat = (x - sqrt(ab) x0_hat) / sqrt(1 - ab), x_next = sqrt(ab_next) x0_hat + sqrt(1 - ab_next) eps_hat:
    a = sqrt(1 - ab_next) / sqrt(1 - ab), b = sqrt(ab_next) - sqrt(ab) a.
    """
    ab = schedule.alphas_cumprod
    pq = schedule.coefficients(prediction, "ddim")[:, [COEF_P, COEF_Q]]
    a = np.sqrt(1.0 - ab[1:]) / np.sqrt(1.0 - ab[:-1])
    b = np.sqrt(ab[1:]) - np.sqrt(ab[:-1]) * a
    return np.column_stack([a, b, pq[:-1]])


@torch.no_grad()
def ddim_encode(
    model: Model,
    x0: torch.Tensor,
    schedule: Schedule,
    *,
    prediction: Prediction | str = "eps",
    stop: int | None = None,
    clip: float | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM inversion: run the deterministic (eta = 0) ODE forwards from the image to entry ``stop``.

    The image is taken as the state at entry 0 (timestep 0, ab_0 ~ 1), as guided-diffusion's
    ``ddim_reverse_sample_loop`` does; each step evaluates the model at the current state and timestep
    (the first-order approximation that makes the encoding invertible only up to discretisation error, Song
    et al. 2021 Sec. 4.3). ``ddpm.reverse(..., sampler="ddim", eta=0, start=stop)`` decodes the result.

    Args:
        model: ``model(x, t) -> output`` as for :func:`ddpm.reverse`.
        x0: images [N, *sample_shape] float32, on the model's device.
        schedule: the (possibly respaced) schedule; default ``stop = len(schedule) - 1`` reaches x_T.
        clip: bound on x0_hat (None: no clipping, which keeps the encoding closest to invertible).
        y: the images' classes (int64 [N]) for a class-conditional model, called as ``model(x, t, y)``.
    Returns:
        x at entry ``stop`` (timestep ``schedule.timesteps[stop]``), float32 like x0.
    """
    x = _check_x0(x0)
    stop = len(schedule) - 1 if stop is None else schedule.check_index(stop)
    bound = check_clip(clip)
    rows = encoding_table(schedule, prediction).astype(np.float32)
    ts = torch.from_numpy(schedule.timesteps.copy()).to(x.device)
    for k in range(stop):
        a, b, p, q = (float(v) for v in rows[k])
        t = ts[k : k + 1].expand(x.shape[0]).contiguous()
        m = (model(x, t) if y is None else model(x, t, y))[
            :, : x.shape[1]
        ]  # a learned variance: the mean half
        x0_hat = p * x + q * m
        if math.isfinite(bound):
            x0_hat = x0_hat.clamp(-bound, bound)
        x = a * x + b * x0_hat
    return x


def slerp(a: torch.Tensor, b: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Spherical interpolation of two latents [*shape] at each weight w in [0, 1] -> [len(weights), *shape].

    sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b, theta the angle between the flattened a
    and b (Shoemake 1985; Song et al. 2021 Sec. 5.4 interpolate x_T this way, since a Gaussian's mass lies near
    a sphere that linear interpolation cuts through). Nearly parallel latents fall back to linear.
    """
    af, bf = a.double().flatten(), b.double().flatten()
    cos = float(torch.dot(af, bf) / (af.norm() * bf.norm()).clamp_min(1e-300))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    out = []
    for w in weights:
        if theta < 1e-4:
            wa, wb = 1.0 - w, w
        else:
            wa, wb = math.sin((1.0 - w) * theta) / math.sin(theta), math.sin(w * theta) / math.sin(theta)
        out.append((wa * a.double() + wb * b.double()).to(a.dtype))
    return torch.stack(out)
