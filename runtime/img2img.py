"""Image in, image out: the reverse process started from a given image instead of from x_T.

    denoise      x_t = q_sample(x0, t, eps) (SDEdit, Meng et al. 2022) or a given noisy x_t, then
                 ddpm.reverse(start = the entry of timestep t) back to x_0
    interpolate  A and B to x_t, mixed, then the reverse process: "noise" (Ho et al. 2020, Sec. 4.3 / Fig. 8:
                 the same eps for both, linear mixing) or "ddim" (Song et al. 2021: deterministic encoding with the
                 eta = 0 ODE, spherical mixing, decoding with DDIM eta = 0)
    invert       DDIM's deterministic encoding to x_T (or to any timestep t)

Every backend (checkpoint, ONNX, TensorRT) and every sampler runs the same way: the one reverse loop
(ddpm/loop.py) started mid-schedule. With ``steps=N`` the entries with timestep <= t are respaced to N
(``ddpm.forward.start_schedule``), so N steps run from t down to 0. Image k's forward eps is Philox stream 1,
sample k (ddpm/forward.py); its reverse noise is stream 0, sample k (docs/design.md, "Noise"): every output is
a function of the seed."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddpm.diffusion import DynamicThreshold, q_sample
from ddpm.errors import InvalidArgumentError
from ddpm.executors import model_call
from ddpm.forward import (
    check_timestep,
    ddim_encode,
    forward_noise,
    scale_pixel_noise,
    slerp,
    start_schedule,
    timestep_for_sigma,
)
from ddpm.kernels import dynamic_thresholds, fused_step_raw
from ddpm.loop import FiniteWatch, ReversePlan, StepJob, run_reverse
from ddpm.metadata import schedule_from_meta
from ddpm.options import SamplingOptions
from ddpm.schedule import COEF_P, COEF_Q, Sampler

from .sampling import image_shape, open_engine

__all__ = [
    "image_shape",  # re-exported from .sampling
    "check_images",
    "DenoiseResult",
    "denoise_run",
    "denoise",
    "interpolate",
    "invert",
    "SharedNoiseExecutor",
]

ENCODINGS = ("noise", "ddim")
# Steps of the deterministic sampler that restores a given noisy image by default (docs/design.md, "Image in,
# image out"): DDIM eta = 0 follows the model's x0 estimate down to t = 0; 50 steps are as good as all t + 1.
RESTORE_STEPS = 50
_RANGE_SLACK = 1e-3  # clean images may overshoot [-1, 1] by rounding (a PNG round trip: 0.5/127.5)


def check_images(
    images: Any, shape: Sequence[int], *, clean: bool = True, name: str = "images"
) -> torch.Tensor:
    """images [N, *shape] (or one [*shape]) as float32 [N, *shape]; ``clean`` also requires the data range
    [-1, 1] (a noisy x_t or a latent need not be in it)."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        what = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidArgumentError(f"{name} must be a float tensor [N, {_dims(shape)}], got {what}")
    x = images[None] if images.dim() == len(shape) else images
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape) or x.shape[0] < 1:
        raise InvalidArgumentError(
            f"{name} must have shape [N, {_dims(shape)}] (the model's sample shape), got {list(images.shape)}"
        )
    x = x.detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise InvalidArgumentError(f"{name} contain NaN or Inf values")
    if clean and float(x.abs().max()) > 1.0 + _RANGE_SLACK:
        raise InvalidArgumentError(
            f"{name} must lie in the data range [-1, 1], got values in "
            f"[{float(x.min()):.3g}, {float(x.max()):.3g}] (map u8 pixels with u / 127.5 - 1)"
        )
    return x


def _dims(shape: Sequence[int]) -> str:
    return ", ".join(map(str, shape))


@contextlib.contextmanager
def _session(engine: Any, options: SamplingOptions):
    """The backend, its image shape and training schedule; on CUDA, its stream made current."""
    with open_engine(engine, options) as backend:
        source = str(engine) if isinstance(engine, (str, os.PathLike)) else "the engine"
        shape = image_shape(backend.meta, source=source)
        dev, stream = backend.device, getattr(backend, "stream", None)
        ctx = (
            torch.cuda.stream(stream)
            if dev.type == "cuda" and stream is not None
            else contextlib.nullcontext()
        )
        with torch.no_grad(), ctx:
            yield backend, shape, schedule_from_meta(backend.meta)


def _reverse(
    backend: Any, x: torch.Tensor, plan: ReversePlan, start: int, kernel: Any = "fused", y: Any = None
) -> torch.Tensor:
    """ddpm's one loop from entry ``start`` to the sample, with the NaN/Inf watch; the result on the CPU."""
    x = x.to(backend.device)
    watch = FiniteWatch(plan.schedule, x.shape[0], device=backend.device, start=start)
    return run_reverse(backend, x, plan, start=start, kernel=kernel, on_step=watch, y=y).to("cpu")


def _conditional_plan(schedule: Any, options: SamplingOptions, meta: dict[str, Any]) -> ReversePlan:
    """The plan of options resolved against the artifact (its classes and null class included)."""
    info = meta.get("classes")
    null = info.get("null") if isinstance(info, dict) else None
    return ReversePlan.create(schedule, options.resolve(meta)[0], prediction=meta["prediction"], null=null)


def _class_rows(options: SamplingOptions, meta: dict[str, Any], n: int, device: Any) -> torch.Tensor | None:
    """Image k's class: the resolved classes cycled over the images (None for an unconditional model)."""
    classes = options.resolve(meta)[0].classes
    if classes is None:
        return None
    table = torch.tensor(classes, dtype=torch.int64)
    return table[torch.arange(n) % len(classes)].to(device)


@dataclass
class DenoiseResult:
    """What :func:`denoise_run` computed, on the CPU. images: the input [N, C, H, W]; noisy: the x_t the reverse
    process started from; denoised: its output in [-1, 1] scale; t: the start timestep; steps: steps run."""

    images: torch.Tensor
    noisy: torch.Tensor
    denoised: torch.Tensor
    t: int
    steps: int
    description: str
    sampler: str = "ddpm"


def denoise_run(
    engine: str | os.PathLike | Any,
    images: torch.Tensor,
    t: int | None = None,
    options: SamplingOptions | None = None,
    *,
    sigma: float | None = None,
    add_noise: bool = True,
    **fields: Any,
) -> DenoiseResult:
    """:func:`denoise` with the noisy input and the run's facts (what ``ddpm denoise`` draws)."""
    if (t is None) == (sigma is None):
        raise InvalidArgumentError(
            "give the noise level as exactly one of t (a timestep) or sigma (pixel space)"
        )
    opts = _options(options, fields)
    with _session(engine, opts) as (backend, shape, base):
        x = check_images(images, shape, clean=add_noise)
        t = timestep_for_sigma(base, sigma) if sigma is not None else check_timestep(base, t)
        if not add_noise and opts.sampler is None:  # restoring: the posterior mean's path, not a sample
            opts = opts.replace(sampler=Sampler.DDIM, steps=opts.steps or min(RESTORE_STEPS, t + 1))
        opts = opts.replace(sampler=opts.sampler or Sampler.DDPM)
        schedule, start = start_schedule(base, t, opts.steps)
        t_start = int(schedule.timesteps[start])
        if add_noise:  # SDEdit: q_sample to the start timestep, image k with eps of sample k
            eps = forward_noise(opts.seed, x.shape)
            x_t = q_sample(base, x, torch.full((x.shape[0],), t_start), eps)
        else:  # x is x_t already; a pixel-space sigma means x = x_t / sqrt(ab_t)
            x_t = scale_pixel_noise(base, x, t) if sigma is not None else x
        plan = _conditional_plan(schedule, opts, backend.meta)
        y = _class_rows(opts, backend.meta, x.shape[0], backend.device)
        out = _reverse(backend, x_t, plan, start, opts.kernel, y)
        description = getattr(backend, "description", "")
        return DenoiseResult(x, x_t, out, t_start, start + 1, description, str(plan.sampler))


def denoise(
    engine: str | os.PathLike | Any, images: torch.Tensor, t: int | None = None, **kwargs: Any
) -> torch.Tensor:
    """Denoise images with the reverse process started at timestep t.

    Args:
        engine: a checkpoint / ONNX / TensorRT path, or an open backend (anything :func:`ddpm.sample` takes).
        images: [N, C, H, W] float32 in the model's sample shape. Clean images in [-1, 1] with
            ``add_noise=True`` (SDEdit: noised to t with Philox eps, stream 1, sample k); already-noisy
            images with ``add_noise=False``: x_t itself when the level is given as t, or x0 + sigma z.
        t: the noise level as a timestep in 0..T-1; or ``sigma=``: pixel-space noise std (units of the
            [-1, 1] range), mapped to the t whose sqrt((1 - ab) / ab) is closest (x then scaled by sqrt(ab)).
        add_noise: True (SDEdit, the default: noise the image to t, then sample back with DDPM, a fresh image
            that keeps the input's layout) or False (the images are noisy already: restore them; the default
            sampler is then deterministic DDIM with at most RESTORE_STEPS = 50 steps, which follows the model's
            estimate of the clean image; DDPM would draw a posterior sample instead, which on the digits at
            t = 500 is classified correctly less often than the noisy input itself).
        options: a :class:`ddpm.SamplingOptions`, or its fields as keywords: steps (reverse steps N <= t + 1:
            the entries with timestep <= t respaced to N; None: all t + 1), sampler / eta / clip / seed (as for
            :func:`ddpm.reverse`; image k draws the noise of sample k), device, threads.
    Returns:
        [N, C, H, W] float32 on the CPU, in the data range [-1, 1] (exactly so with ``clip=1``).
    """
    return denoise_run(engine, images, t, **kwargs).denoised


def _options(options: SamplingOptions | None, fields: dict[str, Any]) -> SamplingOptions:
    options = options or SamplingOptions()
    return options.replace(**fields) if fields else options


class SharedNoiseExecutor:
    """The fused step with every row drawing sample ``sample_offset``'s noise, so a row of interpolants shares
    its reverse noise as Ho et al. (Sec. 4.3) fix it; one batched model call per step, one kernel call per row
    (row r is then exactly what a batch of one at that offset computes)."""

    def bind(self, model: Callable[..., torch.Tensor], job: StepJob):
        x, h, plan, rows = job.x, job.history, job.plan, job.rows32
        call = model_call(
            model, job
        )  # classes, guidance (one 2N forward) and a learned variance, as ddpm.reverse
        dynamic = plan.clip if isinstance(plan.clip, DynamicThreshold) else None
        clip = math.inf if dynamic is not None else plan.clip

        def step(i: int) -> torch.Tensor:
            m, v, u = call(i, x)
            row = rows[i]
            for r in range(x.shape[0]):
                one = slice(r, r + 1)
                kw: dict[str, Any] = {} if h is None else {"history": h[one]}
                if v is not None:
                    kw["variance"] = v[one]
                if u is not None:
                    kw.update(uncond=u[one], guidance=plan.guidance)
                if dynamic is not None:
                    kw["thresholds"] = dynamic_thresholds(
                        x[one], m[one], row[COEF_P], row[COEF_Q], dynamic, uncond=kw.get("uncond"),
                        guidance=kw.get("guidance", 1.0),
                    )  # fmt: skip
                fused_step_raw(x[one], m[one], row, clip, plan.seed, i, job.sample_offset, x[one], **kw)
            return x

        return step


def interpolate(
    engine: str | os.PathLike | Any,
    a: torch.Tensor,
    b: torch.Tensor,
    t: int,
    n: int,
    options: SamplingOptions | None = None,
    *,
    encode: str = "noise",
    **fields: Any,
) -> torch.Tensor:
    """n images from A to B: both encoded at timestep t, mixed with weights w = 0, 1/(n-1), ..., 1, decoded.

    encode="noise" (Ho et al. 2020, Sec. 4.3): x_t of A and B with the same eps, (1 - w) x_t^A + w x_t^B, then
    the reverse process (the options' sampler, default ddpm) with the same reverse noise in every row: the ends are
    ``denoise(engine, A, t, seed=seed)`` and the same for B. encode="ddim" (Song et al. 2021): DDIM encoding
    to t (t = T-1: x_T), ``slerp``, DDIM eta = 0 decoding: the ends reconstruct A and B. ``options`` (or its
    fields as keywords: steps, sampler, clip, seed, device, threads) as in :func:`denoise`. Returns [n, C, H, W] float32 on the CPU in [-1, 1].
    """
    if encode not in ENCODINGS:
        raise InvalidArgumentError(f"encode must be one of {', '.join(ENCODINGS)}, got {encode!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise InvalidArgumentError(f"n must be an integer >= 2 (the images from A to B), got {n!r}")
    opts = _options(options, fields)
    if encode == "ddim" and opts.sampler not in (None, Sampler.DDIM):
        raise InvalidArgumentError(
            f"encode='ddim' decodes with DDIM eta = 0, the inverse of its encoding; got sampler {str(opts.sampler)!r}"
        )
    weights = np.linspace(0.0, 1.0, int(n)).tolist()
    with _session(engine, opts) as (backend, shape, base):
        ends = torch.cat([check_images(a, shape, name="a"), check_images(b, shape, name="b")])
        if ends.shape[0] != 2:
            raise InvalidArgumentError(f"a and b must be one image each, got {ends.shape[0]} images")
        schedule, start = start_schedule(base, check_timestep(base, t), opts.steps)
        default = Sampler.DDPM if encode == "noise" else Sampler.DDIM
        plan = _conditional_plan(schedule, opts.replace(sampler=opts.sampler or default), backend.meta)
        y = _class_rows(opts, backend.meta, 2, backend.device)  # the classes of A and B
        if encode == "noise":
            eps = forward_noise(opts.seed, (1, *shape)).expand(2, *shape)  # one eps for both (sample 0's)
            xt = q_sample(base, ends, torch.full((2,), int(schedule.timesteps[start])), eps)
            w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * len(shape)))
            rows = (
                None if y is None else y[:1].expand(len(weights)).contiguous()
            )  # A's class for the whole row
            return _reverse(backend, (1.0 - w) * xt[0] + w * xt[1], plan, start, SharedNoiseExecutor(), rows)
        lat = ddim_encode(
            backend, ends.to(backend.device), schedule, prediction=plan.prediction, stop=start, y=y
        )
        rows = None if y is None else y[:1].expand(len(weights)).contiguous()
        return _reverse(backend, slerp(lat[0], lat[1], weights), plan, start, "fused", rows)


def invert(
    engine: str | os.PathLike | Any,
    images: torch.Tensor,
    *,
    steps: int = 100,
    t: int | None = None,
    device: str | torch.device = "auto",
    threads: int | None = None,
) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021): the latents the deterministic eta = 0 ODE maps the images to.

    Args:
        images: [N, C, H, W] float32 in [-1, 1].
        steps: ODE steps N <= t + 1 over the entries with timestep <= t, respaced (as for :func:`denoise`).
        t: where to stop; None: T-1, the latent x_T.
    Returns:
        x_t [N, C, H, W] float32 on the CPU (a latent: roughly N(0, I) at t = T-1, not in [-1, 1]).
        ``denoise(engine, latents, t, add_noise=False, steps=steps, sampler="ddim")`` decodes it.
    """
    with _session(engine, SamplingOptions(device=device, threads=threads)) as (backend, shape, base):
        x = check_images(images, shape)
        t = base.num_timesteps - 1 if t is None else check_timestep(base, t)
        schedule, start = start_schedule(base, t, steps)
        prediction = backend.meta["prediction"]
        return ddim_encode(backend, x.to(backend.device), schedule, prediction=prediction, stop=start).to(
            "cpu"
        )
