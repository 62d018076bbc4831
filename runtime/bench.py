"""`ddpm bench`: latency per stage (model forward, step update, full loop) of each engine against eager PyTorch.

For every engine and batch size, in one process and on one device:

    forward   the engine's backend vs the same network in eager torch           (floor: FLOPs / matmul rate)
    update    the fused kernel vs ddpm.step (torch reference) vs the seeds' update (separate ops + randn_like)
                                                                                  (floor: 12 B/element / copy bandwidth)
    loop      sample_batch (backend + fused step) vs the seeds' eager loop      (floor: steps x both floors)

Every row carries its speed-up over the eager baseline of its stage and how far it is from its floor. A loop
of --steps that would exceed the time budget is timed over fewer steps (a respaced schedule, same per-step work)
and scaled up; the report says so (``loop_steps_timed``).
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.errors import ArtifactError, InvalidArgumentError
from .floors import DeviceRates, count_flops, measure_rates
from .timing import Timing, peak_memory_bytes, peak_memory_reset, sync, time_fn

__all__ = ["BenchConfig", "run_bench", "parse_batches", "render_markdown", "plot_report", "TARGETS"]

# DESIGN.md's performance targets: (stage, device type, sample shape incl. batch or None for any) -> minimum ratio.
TARGETS = [
    {
        "name": "fused update vs eager, CPU, 64x3x32x32",
        "stage": "update",
        "device": "cpu",
        "shape": [64, 3, 32, 32],
        "min": 5.0,
    },
    {
        "name": "fused update vs eager, CPU, 1x1x28x28",
        "stage": "update",
        "device": "cpu",
        "shape": [1, 1, 28, 28],
        "min": 10.0,
    },
    {
        "name": "end-to-end onnxruntime+fused vs eager, CPU",
        "stage": "loop",
        "device": "cpu",
        "backend": "onnxruntime",
        "min": 2.0,
    },
    {
        "name": "fused update vs eager, GPU, batch 1",
        "stage": "update",
        "device": "cuda",
        "batch": 1,
        "min": 10.0,
    },
    {
        "name": "end-to-end CUDA-graph loop vs eager, GPU, batch 1",
        "stage": "loop",
        "device": "cuda",
        "batch": 1,
        "cuda_graph": True,
        "min": 5.0,
    },
]


@dataclass
class BenchConfig:
    """What to measure.

    engines: checkpoints / ONNX files / TensorRT engines (all of one model family or not: each is baselined
        against its own architecture).
    batches: batch sizes.  steps: loop length (None = the model's T).
    ckpt: checkpoint for the eager baseline when an engine is not itself a checkpoint; without it the baseline
        is the same architecture (from the engine's metadata) with random weights — the latency is the same.
    loop_budget_s: time one loop measurement may take before it is timed over fewer steps and scaled.
    """

    engines: list[Path]
    batches: list[int] = field(default_factory=lambda: [1, 64])
    steps: int | None = None
    device: str = "auto"
    ckpt: Path | None = None
    repeats: int = 20
    loop_budget_s: float = 20.0
    cuda_graph: bool = False
    threads: int | None = None
    seed: int = 0
    command: str = ""


def parse_batches(text: str) -> list[int]:
    """'1,64' -> [1, 64]; anything but a comma-separated list of positive integers is an error."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise InvalidArgumentError(
            f"--batch must be a comma-separated list of positive integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise InvalidArgumentError(
            f"--batch must be a comma-separated list of positive integers, got {text!r}"
        )
    return values


def _machine(device: torch.device) -> dict[str, Any]:
    from ddpm.build_facts import build_facts

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **build_facts(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = p.name
        info["compute_capability"] = f"{p.major}.{p.minor}"
    return info


def _eager_model(engine: Path, meta: dict[str, Any], ckpt: Path | None, device: torch.device):
    """The baseline network in eager torch, and where its weights came from."""
    from ddpm.checkpoint import load_model  # lazy: runtime depends on trainer only here
    from ddpm.models import build_model

    from ddpm.artifacts import artifact_kind

    src = engine if artifact_kind(engine) == "checkpoint" else ckpt
    if src is not None:
        model, _ = load_model(src, device=device)
        return model.eval(), f"checkpoint {src.name}"
    torch.manual_seed(0)
    return build_model(meta["model"]).to(device).eval(), "same architecture, random weights"


FUSED_TABLE = "fused kernel (step table)"


def _table_stepper(
    plan: Any, seed: int, x: torch.Tensor, m: torch.Tensor, out: torch.Tensor, dev: torch.device
):
    """The update as the sampling loops run it: a step table (row + Philox step index from the table's counter),
    HostStepTable bound once on CPU, DeviceStepTable on CUDA. The counter runs down and wraps."""
    from ddpm.kernels import DeviceStepTable, HostStepTable

    steps = plan.steps
    if dev.type == "cuda":
        table = DeviceStepTable(plan.table, plan.clip, seed, 0, dev)

        def run(k: int) -> torch.Tensor:
            if k % steps == 0:
                table.set_counter(steps - 1)
            return table.step(x, m, out)

        return run
    table = HostStepTable(plan.table, plan.clip, seed)
    bound = table.bind(x, m, out)

    def run_cpu(k: int) -> torch.Tensor:
        if k % steps == 0:
            table.set_counter(steps - 1)
        return bound()

    return run_cpu


def _row(stage: str, impl: str, t: Timing, floor_s: float | None, **extra: Any) -> dict[str, Any]:
    r = {"stage": stage, "impl": impl, **t.as_dict(), "floor_s": floor_s}
    r["x_floor"] = t.median / floor_s if floor_s else None
    r.update(extra)
    return r


def _bench_one(
    cfg: BenchConfig, engine: Path, batch: int, dev: torch.device, rates: DeviceRates
) -> dict[str, Any]:
    from . import baseline
    from .backends import open_backend
    from ddpm.kernels import fused_step_raw
    from .sampling import SamplingPlan, sample_batch
    from ddpm.diffusion import step as reference_step

    peak_memory_reset(dev)
    t0 = time.perf_counter()
    backend = open_backend(engine, device=dev, threads=cfg.threads)
    load_s = time.perf_counter() - t0
    with backend:
        meta = backend.meta
        shape = (batch, *meta["sample_shape"])
        numel = math.prod(shape)
        plan = SamplingPlan.create(meta, steps=cfg.steps, seed=cfg.seed)
        steps = plan.steps
        t0 = time.perf_counter()
        model, weights = _eager_model(engine, meta, cfg.ckpt, dev)
        eager_load_s = time.perf_counter() - t0

        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        xs = [torch.randn(shape, generator=gen).to(dev) for _ in range(4)]  # rotating inputs
        ts = [torch.randint(0, len(plan.schedule), (batch,), generator=gen).to(dev) for _ in range(4)]
        ts = [torch.from_numpy(plan.schedule.timesteps.copy()).to(dev)[t] for t in ts]
        flops = count_flops(model, xs[0], ts[0])
        fwd_floor = rates.model_floor(flops) if flops else None
        upd_floor = rates.update_floor(numel)
        rows: list[dict[str, Any]] = []

        # ---- forward ----
        with torch.inference_mode():
            eager_fwd = time_fn(lambda k: model(xs[k % 4], ts[k % 4]), device=dev, repeats=cfg.repeats)
        eng_fwd = time_fn(lambda k: backend(xs[k % 4], ts[k % 4]), device=dev, repeats=cfg.repeats)
        rows.append(
            _row("forward", "eager torch (baseline)", eager_fwd, fwd_floor, speedup=1.0, baseline=True)
        )
        rows.append(
            _row("forward", backend.name, eng_fwd, fwd_floor, speedup=eager_fwd.median / eng_fwd.median)
        )

        # ---- update (a middle step, sigma > 0) ----
        i = steps // 2 if steps > 1 else 0
        seed_sched = baseline.SeedScheduler(plan.schedule, dev)
        ms = [torch.randn(shape, generator=gen).to(dev) for _ in range(4)]
        out = torch.empty(shape, device=dev)
        row32 = plan.rows32[i]
        eager_upd = time_fn(
            lambda k: baseline.eager_update(seed_sched, i, xs[k % 4], ms[k % 4]),
            device=dev,
            repeats=cfg.repeats * 5,
        )
        ref_upd = time_fn(
            lambda k: reference_step(
                plan.schedule,
                i,
                xs[k % 4],
                ms[k % 4],
                torch.randn_like(xs[k % 4]),
                prediction=plan.prediction,
            ),
            device=dev,
            repeats=cfg.repeats * 5,
        )
        raw_upd = time_fn(
            lambda k: fused_step_raw(xs[k % 4], ms[k % 4], row32, plan.clip, cfg.seed, i, 0, out),
            device=dev,
            repeats=cfg.repeats * 5,
        )
        table_upd = time_fn(
            _table_stepper(plan, cfg.seed, xs[0], ms[0], out, dev), device=dev, repeats=cfg.repeats * 5
        )
        rows.append(
            _row("update", "eager seeds update (baseline)", eager_upd, upd_floor, speedup=1.0, baseline=True)
        )
        rows.append(
            _row(
                "update",
                "ddpm.step (torch reference)",
                ref_upd,
                upd_floor,
                speedup=eager_upd.median / ref_upd.median,
            )
        )
        rows.append(
            _row(
                "update",
                "fused kernel (fused_step_raw)",
                raw_upd,
                upd_floor,
                speedup=eager_upd.median / raw_upd.median,
            )
        )
        rows.append(
            _row("update", FUSED_TABLE, table_upd, upd_floor, speedup=eager_upd.median / table_upd.median)
        )

        # ---- loop: time k <= steps steps, scale to steps ----
        per_step = max(eager_fwd.median + eager_upd.median, eng_fwd.median + raw_upd.median)
        k = int(min(steps, max(2, cfg.loop_budget_s / per_step / 4)))  # 2 loops x (warm-up + timed)
        kplan = plan if k == steps else SamplingPlan.create(meta, steps=k, seed=cfg.seed)
        scale = steps / k
        x0 = xs[0]
        graph = cfg.cuda_graph and dev.type == "cuda" and getattr(backend, "capturable", False)

        def engine_loop(_k: int) -> torch.Tensor:
            with torch.inference_mode():
                if graph:
                    from .sampling_graph import sample_batch_graph

                    return sample_batch_graph(backend, kplan, batch)
                return sample_batch(backend, kplan, batch)

        def eager_loop(_k: int) -> torch.Tensor:
            return baseline.eager_loop(model, seed_sched_k, x0, range(k - 1, -1, -1))

        seed_sched_k = baseline.SeedScheduler(kplan.schedule, dev)
        reps = 3 if per_step * k < cfg.loop_budget_s / 6 else 1
        # one untimed loop each first: allocator growth, oneDNN/ORT first-call work are setup, not per-step cost
        eager_l = time_fn(eager_loop, device=dev, warmup=1, repeats=reps)
        eng_l = time_fn(engine_loop, device=dev, warmup=1, repeats=reps)
        loop_floor = steps * ((fwd_floor or 0.0) + upd_floor)
        scaled = {
            n: Timing(t.median * scale, t.p90 * scale, t.mean * scale, t.repeats)
            for n, t in (("eager", eager_l), ("engine", eng_l))
        }
        rows.append(
            _row(
                "loop",
                "eager torch + seeds update (baseline)",
                scaled["eager"],
                loop_floor,
                speedup=1.0,
                baseline=True,
            )
        )
        impl = f"{backend.name} + fused" + (" (CUDA graph)" if graph else "")
        rows.append(
            _row(
                "loop",
                impl,
                scaled["engine"],
                loop_floor,
                speedup=scaled["eager"].median / scaled["engine"].median,
                cuda_graph=graph,
            )
        )
        sync(dev)
        peak = peak_memory_bytes(dev)

    return {
        "engine": str(engine),
        "backend": backend.name,
        "backend_description": backend.description,
        "device": str(dev),
        "batch": batch,
        "shape": list(shape),
        "steps": steps,
        "loop_steps_timed": k,
        "baseline_weights": weights,
        "model_flops": flops,
        "setup_s": {"backend_load": load_s, "eager_model_load": eager_load_s},
        "peak_memory_bytes": peak,
        "samples_per_s": batch / scaled["engine"].median,
        "eager_samples_per_s": batch / scaled["eager"].median,
        "rows": rows,
    }


def _targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for tg in TARGETS:
        for res in results:
            dev = torch.device(res["device"]).type
            if dev != tg["device"] or ("shape" in tg and res["shape"] != tg["shape"]):
                continue
            if "batch" in tg and res["batch"] != tg["batch"]:
                continue
            if "backend" in tg and res["backend"] != tg["backend"]:
                continue
            for row in res["rows"]:
                if row["stage"] != tg["stage"] or row.get("baseline"):
                    continue
                if tg["stage"] == "update" and row["impl"] != FUSED_TABLE:
                    continue
                if tg.get("cuda_graph") and not row.get("cuda_graph"):
                    continue
                out.append(
                    {
                        "target": tg["name"],
                        "engine": res["engine"],
                        "batch": res["batch"],
                        "min_ratio": tg["min"],
                        "measured_ratio": row["speedup"],
                        "met": row["speedup"] >= tg["min"],
                    }
                )
    return out


def run_bench(cfg: BenchConfig, *, log=print) -> dict[str, Any]:
    """Measure every engine x batch; returns the JSON-able report."""
    from .backends import resolve_device

    if not cfg.engines:
        raise InvalidArgumentError("give at least one --engine")
    for e in cfg.engines:
        if not Path(e).is_file():
            raise ArtifactError(f"engine file {str(e)!r} does not exist")
    if cfg.steps is not None and (isinstance(cfg.steps, bool) or cfg.steps < 1):
        raise InvalidArgumentError(f"--steps must be an integer >= 1, got {cfg.steps}")
    if cfg.ckpt is not None and not Path(cfg.ckpt).is_file():
        raise ArtifactError(f"--ckpt file {str(cfg.ckpt)!r} does not exist")
    from ddpm.artifacts import read_metadata
    from .sampling import SamplingPlan

    for e in cfg.engines:  # validate every engine's metadata and --steps before minutes of measuring
        SamplingPlan.create(read_metadata(e), steps=cfg.steps, seed=cfg.seed)
    dev = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log(f"measuring {dev} copy bandwidth and matmul rate ...")
    rates = measure_rates(dev)
    results = []
    for engine in cfg.engines:
        for b in cfg.batches:
            log(f"bench {Path(engine).name} batch {b} on {dev} ...")
            results.append(_bench_one(cfg, Path(engine), b, dev, rates))
    return {
        "command": cfg.command,
        "machine": _machine(dev),
        "rates": {
            "copy_bandwidth_GBps": rates.copy_bandwidth / 1e9,
            "matmul_GFLOPps": rates.matmul_flops / 1e9,
        },
        "config": {
            "batches": cfg.batches,
            "steps": cfg.steps,
            "device": str(dev),
            "repeats": cfg.repeats,
            "loop_budget_s": cfg.loop_budget_s,
            "cuda_graph": cfg.cuda_graph,
            "threads": torch.get_num_threads(),
        },
        "results": results,
        "targets": _targets(results),
    }


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.1f} µs"
    return f"{s * 1e9:.0f} ns"


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m.get('gpu') or m['cpu']} ({m['cores']} cores, torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}, torch threads {report['config']['threads']}); copy bandwidth "
        f"{report['rates']['copy_bandwidth_GBps']:.1f} GB/s, matmul {report['rates']['matmul_GFLOPps']:.0f} GFLOP/s",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    lines.append("| engine | batch | stage | impl | median | p90 | floor | x floor | speed-up vs eager |")
    lines.append("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for res in report["results"]:
        name = Path(res["engine"]).name
        for r in res["rows"]:
            note = ""
            if r["stage"] == "loop" and res["loop_steps_timed"] != res["steps"]:
                note = f" ({res['steps']} steps, timed over {res['loop_steps_timed']})"
            xf = f"{r['x_floor']:.1f}" if r["x_floor"] else "-"
            lines.append(
                f"| {name} | {res['batch']} | {r['stage']}{note} | {r['impl']} | {_fmt_s(r['median_s'])} | "
                f"{_fmt_s(r['p90_s'])} | {_fmt_s(r['floor_s'])} | {xf} | {r['speedup']:.2f}x |"
            )
    lines.append("")
    lines.append("| engine | batch | setup: backend load | samples/s | eager samples/s | peak memory |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for res in report["results"]:
        peak = f"{res['peak_memory_bytes'] / 2**20:.0f} MiB" if res["peak_memory_bytes"] else "-"
        lines.append(
            f"| {Path(res['engine']).name} | {res['batch']} | {_fmt_s(res['setup_s']['backend_load'])} | "
            f"{res['samples_per_s']:.3g} | {res['eager_samples_per_s']:.3g} | {peak} |"
        )
    if report["targets"]:
        lines += [
            "",
            "| target | engine | batch | required | measured | met |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for t in report["targets"]:
            lines.append(
                f"| {t['target']} | {Path(t['engine']).name} | {t['batch']} | >= {t['min_ratio']:.0f}x | "
                f"{t['measured_ratio']:.2f}x | {'yes' if t['met'] else '**no**'} |"
            )
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Bars per stage: speed-up over eager for every engine x batch (log scale), written atomically."""
    from ddpm.images import new_figure, save_figure

    labels: list[str] = []
    groups: dict[str, list[float]] = {}
    for j, res in enumerate(report["results"]):
        labels.append(f"{Path(res['engine']).name}\nbatch {res['batch']}")
        for r in res["rows"]:
            if r.get("baseline"):
                continue
            # forward/loop rows are named after the backend; one bar series per stage keeps engines comparable
            key = f"{r['stage']}: {r['impl']}" if r["stage"] == "update" else f"{r['stage']}: engine"
            groups.setdefault(key, [math.nan] * len(report["results"]))[j] = r["speedup"]
    fig, ax = new_figure((max(6, 2.2 * len(labels)), 4), dpi=120)
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(labels))
    for j, (name, vals) in enumerate(groups.items()):
        ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("speed-up over eager PyTorch")
    ax.set_title(f"ddpm bench on {report['machine'].get('gpu') or report['machine']['cpu']}", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path, what="--plot")
