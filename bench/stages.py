"""The three measured stages of ``ddpm bench`` for one engine x batch size: forward, update, loop.

Each stage times the engine's way against the eager-PyTorch baseline of bench/baseline.py and returns its
report rows (median, p10, p90, the CPU share this process got while timed, floor, speed-up over the stage's
baseline). The engine's loop is the project's one reverse loop (``ddpm.reverse``, via runtime/sampling.py) with
the sampler asked for; the baseline loop stays the DDPM loop of separate torch ops + randn, on purpose outside
``ddpm.reverse``.

:func:`bench_variant` adds the other runtime x precision pairs of the same case (OpenVINO fp32/bf16 beside
onnxruntime, torch bf16 autocast beside torch fp32, eager torch bf16 beside the eager baseline): forward and loop
only, on the same inputs and the same k timed steps, each against the same fp32 eager baselines.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm.artifacts import artifact_kind
from ddpm.checkpoint import load_model
from ddpm.diffusion import step as reference_step
from ddpm.kernels import DeviceStepTable, HostStepTable, fused_step_raw
from ddpm.models import build_model
from ddpm.precision import Precision
from ddpm.runtime.sampling import SamplingPlan, sample_batch
from ddpm.runtime.sampling_graph import CudaGraphExecutor
from ddpm.schedule import COEF_C, Sampler

from . import baseline
from .config import BenchConfig
from .floors import DeviceRates, count_flops
from .timing import Timing, peak_memory_bytes, peak_memory_reset, sync, time_fn

__all__ = ["FUSED_TABLE", "Case", "eager_model", "bench_case", "bench_variant", "autocast_twin"]

FUSED_TABLE = "fused kernel (step table)"
_ROTATE = 4  # rotating inputs, so no stage times a cache that already holds its one input


def eager_model(engine: Path, meta: dict[str, Any], ckpt: Path | None, device: torch.device):
    """The baseline network in eager torch, and where its weights came from."""
    src = engine if artifact_kind(engine) in ("checkpoint", "diffusers") else ckpt
    if src is not None:
        model, _ = load_model(src, device=device)
        return model.eval(), f"checkpoint {src.name}"
    torch.manual_seed(0)
    return build_model(meta["model"]).to(device).eval(), "same architecture, random weights"


@dataclass
class Case:
    """One engine x batch size: what every stage shares."""

    cfg: BenchConfig
    backend: Any
    model: torch.nn.Module
    plan: SamplingPlan
    dev: torch.device
    batch: int
    rates: DeviceRates

    def __post_init__(self) -> None:
        self.shape = (self.batch, *self.plan.sample_shape)
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        timesteps = torch.from_numpy(self.plan.schedule.timesteps.copy()).to(self.dev)
        self.xs = [torch.randn(self.shape, generator=gen).to(self.dev) for _ in range(_ROTATE)]
        idx = [torch.randint(0, self.plan.steps, (self.batch,), generator=gen) for _ in range(_ROTATE)]
        self.ts = [timesteps[i.to(self.dev)] for i in idx]
        self.ms = [torch.randn(self.shape, generator=gen).to(self.dev) for _ in range(_ROTATE)]
        self.history = torch.zeros(self.shape, device=self.dev) if self.plan.table[:, COEF_C].any() else None
        # a learned-variance model's variance output, in its range [-1, 1] (the update's extra operand)
        learned = self.plan.learned_variance
        self.variance = torch.rand(self.shape, generator=gen).mul(2).sub(1).to(self.dev) if learned else None
        # a class-conditional model: the plan's classes for the batch's rows; guided: one forward of 2N rows
        self.y = self.plan.class_rows(0, self.batch, self.dev)
        self.uncond = torch.randn(self.shape, generator=gen).to(self.dev) if self.plan.guided else None
        self.engine = network_call(self.backend, self.plan, self.y, combine=False)
        self.eager = network_call(self.model, self.plan, self.y, combine=True)


def network_call(fn: Callable, plan: SamplingPlan, y: torch.Tensor | None, *, combine: bool) -> Callable:
    """``call(x, t)``: the network as a step of ``plan`` calls it. Unconditional: fn(x, t). Conditional: with the
    rows' classes. Guided: ONE forward of the 2N rows [x; x] with classes [y; null]; ``combine`` then forms
    m_u + S (m_c - m_u) in torch (the eager baseline; the engine's kernel does it in the update instead)."""
    if y is None:
        return fn
    if not plan.guided:
        labels = y if plan.guidance == 1.0 else torch.full_like(y, plan.null)
        return lambda x, t: fn(x, t, labels)
    both = torch.cat([y, torch.full_like(y, plan.null)])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        out = fn(torch.cat([x, x]), torch.cat([t, t]), both)
        return out[n:] + plan.guidance * (out[:n] - out[n:]) if combine else out

    return guided


def _row(stage: str, impl: str, t: Timing, floor_s: float | None, **extra: Any) -> dict[str, Any]:
    r = {"stage": stage, "impl": impl, **t.as_dict(), "floor_s": floor_s}
    r["x_floor"] = t.median / floor_s if floor_s else None
    r.update(extra)
    return r


def bench_forward(case: Case, floor_s: float | None) -> tuple[list[dict[str, Any]], Timing, Timing]:
    """The network alone: eager torch vs the engine's backend, on the same rotating (x, t)."""
    xs, ts, reps = case.xs, case.ts, case.cfg.repeats
    with torch.inference_mode():
        eager = time_fn(
            lambda k: case.eager(xs[k % _ROTATE], ts[k % _ROTATE]), device=case.dev, repeats=reps,
            what="the eager baseline's forward",
        )  # fmt: skip
    engine = time_fn(
        lambda k: case.engine(xs[k % _ROTATE], ts[k % _ROTATE]), device=case.dev, repeats=reps,
        what=f"the {case.backend.name} forward",
    )  # fmt: skip
    rows = [
        _row("forward", "eager torch (baseline)", eager, floor_s, speedup=1.0, baseline=True),
        _row("forward", case.backend.name, engine, floor_s, speedup=eager.median / engine.median),
    ]
    return rows, eager, engine


def _table_stepper(case: Case, x: torch.Tensor, m: torch.Tensor, out: torch.Tensor):
    """The update as the loops run it: a step table (row + Philox step index from the table's counter),
    HostStepTable bound once on CPU, DeviceStepTable on CUDA. The counter runs down and wraps."""
    plan, steps = case.plan, case.plan.steps
    kw = _operands(case)
    if case.dev.type == "cuda":
        table = DeviceStepTable(plan.table, plan.clip, plan.seed, 0, case.dev)

        def run(k: int) -> torch.Tensor:
            if k % steps == 0:
                table.set_counter(steps - 1)
            return table.step(x, m, out, **kw)

        return run
    host = HostStepTable(plan.table, plan.clip, plan.seed)
    bound = host.bind(x, m, out, **kw)

    def run_cpu(k: int) -> torch.Tensor:
        if k % steps == 0:
            host.set_counter(steps - 1)
        return bound()

    return run_cpu


def _operands(case: Case) -> dict[str, Any]:
    """The fused step's optional operands for this case: history, the learned variance, the guidance half."""
    kw: dict[str, Any] = {} if case.history is None else {"history": case.history}
    if case.variance is not None:
        kw["variance"] = case.variance
    if case.uncond is not None:
        kw.update(uncond=case.uncond, guidance=case.plan.guidance)
    return kw


def bench_update(case: Case, floor_s: float) -> tuple[list[dict[str, Any]], Timing, Timing]:
    """One middle step (sigma > 0 for the stochastic samplers): the baseline's separate ops + randn_like vs
    ddpm.step vs the fused kernel, per call and from a step table."""
    plan, dev, xs, ms = case.plan, case.dev, case.xs, case.ms
    i = plan.steps // 2 if plan.steps > 1 else 0
    reps = case.cfg.repeats * 5
    seed_sched = baseline.EagerScheduler(plan.schedule, dev)
    out = torch.empty(case.shape, device=dev)
    kw = _operands(case)
    var = {} if case.variance is None else {"variance_output": case.variance}
    u, s = case.uncond, plan.guidance

    def guided(m: torch.Tensor) -> torch.Tensor:  # the torch paths form the guided output themselves
        return m if u is None else u + s * (m - u)

    opts = {
        "prediction": plan.prediction,
        "sampler": plan.sampler,
        "variance": plan.variance,
        "eta": plan.eta,
    }

    def reference(k: int) -> torch.Tensor:
        x, m = xs[k % _ROTATE], ms[k % _ROTATE]
        return reference_step(
            plan.schedule, i, x, guided(m), torch.randn_like(x), clip=plan.clip_or_none, **opts,
            **{k: v for k, v in kw.items() if k == "history"}, **var,
        )  # fmt: skip

    def fused(k: int) -> torch.Tensor:
        x, m = xs[k % _ROTATE], ms[k % _ROTATE]
        return fused_step_raw(x, m, plan.rows32[i], plan.clip, plan.seed, i, 0, out, **kw)

    eager = time_fn(
        lambda k: baseline.eager_update(seed_sched, i, xs[k % _ROTATE], guided(ms[k % _ROTATE])),
        device=dev,
        repeats=reps,
    )
    ref = time_fn(reference, device=dev, repeats=reps)
    raw = time_fn(fused, device=dev, repeats=reps)
    table = time_fn(_table_stepper(case, xs[0], ms[0], out), device=dev, repeats=reps)
    rows = [_row("update", "eager DDPM update (baseline)", eager, floor_s, speedup=1.0, baseline=True)]
    for impl, t in (
        ("ddpm.step (torch reference)", ref),
        ("fused kernel (fused_step_raw)", raw),
        (FUSED_TABLE, table),
    ):
        rows.append(_row("update", impl, t, floor_s, speedup=eager.median / t.median))
    return rows, eager, raw


def bench_loop(
    case: Case, per_step: float, floor_s: float
) -> tuple[list[dict[str, Any]], int, dict[str, Timing]]:
    """The whole loop, timed over k <= steps steps (a respaced schedule, same per-step work) and scaled to
    steps: the engine's ``ddpm.reverse`` loop vs the baseline's eager DDPM loop."""
    cfg, backend, dev, steps, batch = case.cfg, case.backend, case.dev, case.plan.steps, case.batch
    k = int(min(steps, max(2, cfg.loop_budget_s / per_step / 4)))  # 2 loops x (warm-up + timed)
    kplan = (
        case.plan if k == steps else SamplingPlan.for_artifact(backend.meta, cfg.sampling.replace(steps=k))
    )
    graph = cfg.cuda_graph and dev.type == "cuda" and getattr(backend, "capturable", False)
    executor = CudaGraphExecutor() if graph else None
    seed_sched = baseline.EagerScheduler(kplan.schedule, dev)
    x0 = case.xs[0]

    def engine_loop(_k: int) -> torch.Tensor:
        with torch.inference_mode():
            return sample_batch(backend, kplan, batch, executor=executor)

    def eager_loop(_k: int) -> torch.Tensor:
        return baseline.eager_loop(case.eager, seed_sched, x0, range(k - 1, -1, -1))

    reps = 3 if per_step * k < cfg.loop_budget_s / 6 else 1
    # one untimed loop each first: allocator growth, oneDNN/ORT first-call work are setup, not per-step cost
    timed = {
        "eager": time_fn(eager_loop, device=dev, warmup=1, repeats=reps),
        "engine": time_fn(engine_loop, device=dev, warmup=1, repeats=reps),
    }
    scale = steps / k
    scaled = {n: t.scaled(scale) for n, t in timed.items()}
    sampler = "" if case.plan.sampler is Sampler.DDPM else f" {case.plan.sampler}"
    impl = f"{backend.name} + fused{sampler}" + (" (CUDA graph)" if graph else "")
    rows = [
        _row(
            "loop",
            "eager torch + DDPM update (baseline)",
            scaled["eager"],
            floor_s,
            speedup=1.0,
            baseline=True,
        ),
        _row(
            "loop",
            impl,
            scaled["engine"],
            floor_s,
            speedup=scaled["eager"].median / scaled["engine"].median,
            cuda_graph=graph,
        ),
    ]
    return rows, k, scaled


def bench_case(case: Case) -> dict[str, Any]:
    """All three stages for one engine x batch size; the JSON-able result (floors from the device's rates)."""
    peak_memory_reset(case.dev)
    flops = count_flops(case.eager, case.xs[0], case.ts[0])
    fwd_floor = case.rates.model_floor(flops) if flops else None
    upd_floor = case.rates.update_floor(math.prod(case.shape))
    fwd_rows, eager_fwd, eng_fwd = bench_forward(case, fwd_floor)
    upd_rows, eager_upd, raw_upd = bench_update(case, upd_floor)
    per_step = max(eager_fwd.median + eager_upd.median, eng_fwd.median + raw_upd.median)
    loop_floor = case.plan.steps * ((fwd_floor or 0.0) + upd_floor)
    loop_rows, k, scaled = bench_loop(case, per_step, loop_floor)
    sync(case.dev)
    return {
        "batch": case.batch,
        "shape": list(case.shape),
        "steps": case.plan.steps,
        "sampler": str(case.plan.sampler),
        "loop_steps_timed": k,
        "model_flops": flops,
        "peak_memory_bytes": peak_memory_bytes(case.dev),
        "samples_per_s": case.batch / scaled["engine"].median,
        "eager_samples_per_s": case.batch / scaled["eager"].median,
        "rows": fwd_rows + upd_rows + loop_rows,
    }


def autocast_twin(model: torch.nn.Module, precision: Precision, device: torch.device) -> Callable:
    """Eager torch at a reduced precision: a channels-last copy of the baseline model under ``torch.autocast``,
    its output cast back to float32 (what a plain PyTorch user gets from two lines of autocast)."""
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)  # the fp32 baseline keeps its layout
    dtype = torch.bfloat16 if precision is Precision.BF16 else torch.float16

    @torch.inference_mode()
    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype):
            out = twin(x, t)
        return out.to(torch.float32, memory_format=torch.contiguous_format)

    return forward


def bench_variant(
    case: Case, result: dict[str, Any], fn: Callable, *, runtime: str, precision: str, eager: bool = False
) -> list[dict[str, Any]]:
    """Forward and loop rows of one more runtime x precision on ``case``, beside ``result`` (bench_case's):
    the same rotating inputs, the same k timed loop steps scaled to ``steps``, speed-ups over the same fp32
    eager baselines. ``eager``: ``fn`` is an eager model, looped by the eager DDPM loop; otherwise a backend,
    looped by ``ddpm.reverse`` with the fused step. Floors are fp32 floors: a bf16 row may beat one."""
    xs, ts, dev, cfg = case.xs, case.ts, case.dev, case.cfg
    base = {r["stage"]: r for r in result["rows"] if r.get("baseline")}
    call = network_call(fn, case.plan, case.y, combine=eager)
    fwd = time_fn(lambda k: call(xs[k % _ROTATE], ts[k % _ROTATE]), device=dev, repeats=cfg.repeats)
    k, steps = result["loop_steps_timed"], result["steps"]
    kplan = (
        case.plan
        if k == steps
        else SamplingPlan.for_artifact(case.backend.meta, cfg.sampling.replace(steps=k))
    )
    sched = baseline.EagerScheduler(kplan.schedule, dev)

    def loop_fn(_k: int) -> torch.Tensor:
        if eager:
            return baseline.eager_loop(call, sched, xs[0], range(k - 1, -1, -1))
        return sample_batch(fn, kplan, case.batch)

    sampler = "" if kplan.sampler is Sampler.DDPM else f" {kplan.sampler}"
    impl = f"eager torch {precision} + DDPM update" if eager else f"{runtime} {precision} + fused{sampler}"
    reps = 3 if fwd.median * k < cfg.loop_budget_s / 6 else 1
    with torch.inference_mode():
        loop = time_fn(loop_fn, device=dev, warmup=1, repeats=reps)
    loop = loop.scaled(steps / k)
    tags = {"runtime": "eager torch" if eager else runtime, "precision": precision}
    fwd_name = f"eager torch {precision}" if eager else f"{runtime} {precision}"
    return [
        _row(
            "forward",
            fwd_name,
            fwd,
            base["forward"]["floor_s"],
            speedup=base["forward"]["median_s"] / fwd.median,
            **tags,
        ),
        _row(
            "loop",
            impl,
            loop,
            base["loop"]["floor_s"],
            speedup=base["loop"]["median_s"] / loop.median,
            **tags,
        ),
    ]
