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
a function of the seed. :class:`TrajectoryRecorder` is the ``ddpm run --trajectory`` observer.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddpm.diffusion import q_sample
from ddpm.errors import InvalidArgumentError
from ddpm.forward import (
    check_timestep,
    ddim_encode,
    forward_noise,
    scale_pixel_noise,
    slerp,
    start_schedule,
    timestep_for_sigma,
)
from ddpm.images import save_image_table
from ddpm.kernels import fused_step_raw
from ddpm.loop import FiniteWatch, ReversePlan, StepJob, run_reverse
from ddpm.metadata import schedule_from_meta
from ddpm.schedule import COEF_P, COEF_Q, Sampler

from .sampling import _open

__all__ = [
    "image_shape",
    "check_images",
    "DenoiseResult",
    "denoise_run",
    "denoise",
    "interpolate",
    "invert",
    "SharedNoiseExecutor",
    "TrajectoryRecorder",
]

ENCODINGS = ("noise", "ddim")
_RANGE_SLACK = 1e-3  # clean images may overshoot [-1, 1] by rounding (a PNG round trip: 0.5/127.5)


def image_shape(meta: dict[str, Any], *, source: str = "the engine") -> tuple[int, int, int]:
    """The model's sample shape (C, H, W); InvalidArgumentError for a model of vectors (the 2-D MLP)."""
    shape = tuple(int(s) for s in meta["sample_shape"])
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise InvalidArgumentError(
            f"{source} models samples of shape {list(shape)}, not images [C, H, W] with C = 1 or 3; "
            "image-in commands need an image model"
        )
    return shape  # type: ignore[return-value]


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
def _session(engine: Any, device: Any, threads: int | None):
    """The backend, its image shape and training schedule; on CUDA, its stream made current."""
    with _open(engine, device=device, threads=threads) as backend:
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
    backend: Any, x: torch.Tensor, plan: ReversePlan, start: int, kernel: Any = "fused"
) -> torch.Tensor:
    """ddpm's one loop from entry ``start`` to the sample, with the NaN/Inf watch; the result on the CPU."""
    x = x.to(backend.device)
    watch = FiniteWatch(plan.schedule, x.shape[0], device=backend.device, start=start)
    return run_reverse(backend, x, plan, start=start, kernel=kernel, on_step=watch).to("cpu")


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


def denoise_run(
    engine: str | os.PathLike | Any,
    images: torch.Tensor,
    t: int | None = None,
    *,
    sigma: float | None = None,
    add_noise: bool = True,
    steps: int | None = None,
    sampler: Sampler | str = "ddpm",
    eta: float = 0.0,
    clip: float | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    threads: int | None = None,
) -> DenoiseResult:
    """:func:`denoise` with the noisy input and the run's facts (what ``ddpm denoise`` draws)."""
    if (t is None) == (sigma is None):
        raise InvalidArgumentError(
            "give the noise level as exactly one of t (a timestep) or sigma (pixel space)"
        )
    with _session(engine, device, threads) as (backend, shape, base):
        x = check_images(images, shape, clean=add_noise)
        t = timestep_for_sigma(base, sigma) if sigma is not None else check_timestep(base, t)
        schedule, start = start_schedule(base, t, steps)
        t_start = int(schedule.timesteps[start])
        if add_noise:  # SDEdit: q_sample to the start timestep, image k with eps of sample k
            eps = forward_noise(seed, x.shape)
            x_t = q_sample(base, x, torch.full((x.shape[0],), t_start), eps)
        else:  # x is x_t already; a pixel-space sigma means x = x_t / sqrt(ab_t)
            x_t = scale_pixel_noise(base, x, t) if sigma is not None else x
        plan = ReversePlan.parse(
            schedule, prediction=backend.meta["prediction"], sampler=sampler, eta=eta, clip=clip, seed=seed
        )
        out = _reverse(backend, x_t, plan, start)
        return DenoiseResult(x, x_t, out, t_start, start + 1, getattr(backend, "description", ""))


def denoise(
    engine: str | os.PathLike | Any,
    images: torch.Tensor,
    t: int | None = None,
    *,
    sigma: float | None = None,
    add_noise: bool = True,
    steps: int | None = None,
    sampler: Sampler | str = "ddpm",
    eta: float = 0.0,
    clip: float | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    threads: int | None = None,
) -> torch.Tensor:
    """Denoise images with the reverse process started at timestep t.

    Args:
        engine: a checkpoint / ONNX / TensorRT path, or an open backend (anything :func:`ddpm.sample` takes).
        images: [N, C, H, W] float32 in the model's sample shape. Clean images in [-1, 1] with
            ``add_noise=True`` (SDEdit: noised to t with Philox eps, stream 1, sample k); already-noisy
            images with ``add_noise=False``: x_t itself when the level is given as t, or x0 + sigma z.
        t: the noise level as a timestep in 0..T-1; or ``sigma``: pixel-space noise std (units of the
            [-1, 1] range), mapped to the t whose sqrt((1 - ab) / ab) is closest (x then scaled by sqrt(ab)).
        steps: reverse steps N <= t + 1 (the entries with timestep <= t respaced to N); None: all t + 1.
        sampler / eta / clip / seed: as for :func:`ddpm.reverse`; image k draws the noise of sample k.
    Returns:
        [N, C, H, W] float32 on the CPU, in the data range [-1, 1] (exactly so with ``clip=1``).
    """
    return denoise_run(
        engine, images, t, sigma=sigma, add_noise=add_noise, steps=steps, sampler=sampler, eta=eta,
        clip=clip, seed=seed, device=device, threads=threads,
    ).denoised  # fmt: skip


class SharedNoiseExecutor:
    """The fused step with every row drawing sample ``sample_offset``'s noise, so a row of interpolants shares
    its reverse noise as Ho et al. (Sec. 4.3) fix it; one batched model call per step, one kernel call per row
    (row r is then exactly what a batch of one at that offset computes)."""

    def bind(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], job: StepJob):
        x, h, plan, rows = job.x, job.history, job.plan, job.rows32

        def step(i: int) -> torch.Tensor:
            m = model(x, job.t(i))
            for r in range(x.shape[0]):
                kw = {} if h is None else {"history": h[r : r + 1]}
                xr = x[r : r + 1]
                fused_step_raw(
                    xr, m[r : r + 1], rows[i], plan.clip, plan.seed, i, job.sample_offset, xr, **kw
                )
            return x

        return step


def interpolate(
    engine: str | os.PathLike | Any,
    a: torch.Tensor,
    b: torch.Tensor,
    t: int,
    n: int,
    *,
    encode: str = "noise",
    steps: int | None = None,
    sampler: Sampler | str | None = None,
    clip: float | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    threads: int | None = None,
) -> torch.Tensor:
    """n images from A to B: both encoded at timestep t, mixed with weights w = 0, 1/(n-1), ..., 1, decoded.

    encode="noise" (Ho et al. 2020, Sec. 4.3): x_t of A and B with the same eps, (1 - w) x_t^A + w x_t^B, then
    the reverse process (``sampler``, default ddpm) with the same reverse noise in every row: the ends are
    ``denoise(engine, A, t, seed=seed)`` and the same for B. encode="ddim" (Song et al. 2021): DDIM encoding
    to t (t = T-1: x_T), ``slerp``, DDIM eta = 0 decoding: the ends reconstruct A and B. ``steps`` as in
    :func:`denoise`. Returns [n, C, H, W] float32 on the CPU in [-1, 1].
    """
    if encode not in ENCODINGS:
        raise InvalidArgumentError(f"encode must be one of {', '.join(ENCODINGS)}, got {encode!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise InvalidArgumentError(f"n must be an integer >= 2 (the images from A to B), got {n!r}")
    if encode == "ddim" and sampler not in (None, "ddim", Sampler.DDIM):
        raise InvalidArgumentError(
            f"encode='ddim' decodes with DDIM eta = 0, the inverse of its encoding; got sampler {sampler!r}"
        )
    weights = np.linspace(0.0, 1.0, int(n)).tolist()
    with _session(engine, device, threads) as (backend, shape, base):
        ends = torch.cat([check_images(a, shape, name="a"), check_images(b, shape, name="b")])
        if ends.shape[0] != 2:
            raise InvalidArgumentError(f"a and b must be one image each, got {ends.shape[0]} images")
        schedule, start = start_schedule(base, check_timestep(base, t), steps)
        default = Sampler.DDPM if encode == "noise" else Sampler.DDIM
        plan = ReversePlan.parse(
            schedule, prediction=backend.meta["prediction"], sampler=sampler or default, clip=clip, seed=seed
        )
        if encode == "noise":
            eps = forward_noise(seed, (1, *shape)).expand(2, *shape)  # one eps for both (sample 0's)
            xt = q_sample(base, ends, torch.full((2,), int(schedule.timesteps[start])), eps)
            w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * len(shape)))
            return _reverse(backend, (1.0 - w) * xt[0] + w * xt[1], plan, start, SharedNoiseExecutor())
        lat = ddim_encode(backend, ends.to(backend.device), schedule, prediction=plan.prediction, stop=start)
        return _reverse(backend, slerp(lat[0], lat[1], weights), plan, start)


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
    with _session(engine, device, threads) as (backend, shape, base):
        x = check_images(images, shape)
        t = base.num_timesteps - 1 if t is None else check_timestep(base, t)
        schedule, start = start_schedule(base, t, steps)
        prediction = backend.meta["prediction"]
        return ddim_encode(backend, x.to(backend.device), schedule, prediction=prediction, stop=start).to(
            "cpu"
        )


class _Recording:
    """A backend that shows each call's (x, m) to a :class:`TrajectoryRecorder`; everything else is the
    backend's. ``capturable`` is False: a CUDA graph would replay the call without this Python wrapper."""

    capturable = False

    def __init__(self, backend: Any, recorder: TrajectoryRecorder) -> None:
        self._backend, self._recorder = backend, recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = self._backend(x, t)
        self._recorder.see(x, m)
        return m


class TrajectoryRecorder:
    """``ddpm run --trajectory``: x_t and x0_hat = clip(p_i x + q_i m) (docs/design.md, "The step") at steps
    i = start, start - K, ..., and 0, for the first ``keep`` samples.

    It wraps the backend (:meth:`hook`, ``sample_run``'s ``model_hook``), so it sees the exact x and model
    output m of each step without another model call; the loop calls the model once per step, in the order
    i = start .. 0 (ddpm.loop.StepExecutor), so the call count gives i. Nothing is copied at other steps, and
    a run without --trajectory never creates it.
    """

    def __init__(self, every: int | None = None, keep: int = 4) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise InvalidArgumentError(f"--every must be an integer >= 1, got {every!r}")
        self.every, self.keep = every, keep
        self.plan: ReversePlan | None = None
        self.columns: list[int] = []
        self._calls = self._have = self._take = 0
        self._seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def hook(self, backend: Any, plan: ReversePlan) -> _Recording:
        image_shape(backend.meta, source="--trajectory: the engine")
        steps = plan.steps
        every = self.every or max(1, steps // 8)
        self.plan, self.columns = plan, sorted({*range(steps - 1, -1, -every), 0}, reverse=True)
        return _Recording(backend, self)

    def see(self, x: torch.Tensor, m: torch.Tensor) -> None:
        plan = self.plan
        assert plan is not None, "TrajectoryRecorder.hook must run first"
        steps = plan.steps
        if self._calls % steps == 0:  # a batch begins: its first rows until `keep` samples are held
            self._take = min(self.keep - self._have, x.shape[0])
            self._have += self._take
        i = steps - 1 - self._calls % steps
        self._calls += 1
        if self._take > 0 and i in self.columns:
            row = plan.rows32[i]
            x0_hat = row[COEF_P] * x[: self._take] + row[COEF_Q] * m[: self._take]
            if math.isfinite(plan.clip):
                x0_hat = x0_hat.clamp(-plan.clip, plan.clip)
            self._seen.setdefault(i, []).append((x[: self._take].clone(), x0_hat))

    def cells(self) -> tuple[torch.Tensor, list[str], list[str]]:
        """[2 k, columns, C, H, W]: rows sample 0 x_t, sample 0 x0_hat, sample 1 x_t, ...; and the labels."""
        if self.plan is None or not self._seen:
            raise InvalidArgumentError("the trajectory recorder saw no sampling run")
        cols = [[torch.cat([pair[j] for pair in self._seen[i]]).cpu() for j in (0, 1)] for i in self.columns]
        grid = torch.stack([torch.stack(c) for c in cols], dim=2)  # [2 (x_t, x0_hat), k, columns, ...]
        k = grid.shape[1]
        grid = grid.transpose(0, 1).reshape(2 * k, len(self.columns), *grid.shape[3:])
        ts = self.plan.schedule.timesteps
        labels = [f"t={int(ts[i])}" for i in self.columns]
        return grid, labels, [f"#{j} {what}" for j in range(k) for what in ("x_t", "x0_hat")]

    def save(self, path: str | os.PathLike) -> os.PathLike:
        grid, cols, rows = self.cells()
        title = f"trajectory: x_t before step and predicted x0, every {self._every_label()}"
        return save_image_table(grid, path, col_labels=cols, row_labels=rows, title=title)

    def _every_label(self) -> str:
        return f"{self.columns[0] - self.columns[1]} steps" if len(self.columns) > 1 else "step"
