"""`ddpm bench`: latency per stage (model forward, step update, full loop) of each engine against eager PyTorch.

For every engine and batch size, in one process and on one device (runtime/bench_stages.py):

    forward   the engine's backend vs the same network in eager torch           (floor: FLOPs / matmul rate)
    update    the fused kernel vs ddpm.step (torch reference) vs the eager DDPM update (separate ops + randn_like)
                                                                                  (floor: 12 B/element / copy bandwidth)
    loop      ddpm.reverse (backend + fused step, --sampler) vs the eager DDPM loop
                                                                                  (floor: steps x both floors)

Every row carries its speed-up over the eager baseline of its stage and how far it is from its floor. A loop
of --steps that would exceed the time budget is timed over fewer steps (a respaced schedule, same per-step work)
and scaled up; the report says so (``loop_steps_timed``). The report's tables and plot: runtime/bench_report.py.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddpm.artifacts import read_metadata
from ddpm.build_facts import build_facts
from ddpm.cliutil import parse_int_list
from ddpm.errors import ArtifactError, InvalidArgumentError

from .backends import open_backend, resolve_device
from .bench_report import plot_report, render_markdown
from .bench_stages import FUSED_TABLE, Case, bench_case, eager_model
from .floors import DeviceRates, measure_rates
from .sampling import SamplingPlan

__all__ = ["BenchConfig", "run_bench", "parse_batches", "render_markdown", "plot_report", "TARGETS"]

# The performance targets of docs/design.md: (stage, device type, sample shape incl. batch or None for any) -> minimum ratio.
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
    batches: batch sizes.  steps: loop length (None = the model's T).  sampler: the engine loop's sampler
        (any name ddpm.Sampler accepts); the eager baseline is always the DDPM loop.
    ckpt: checkpoint for the eager baseline when an engine is not itself a checkpoint; without it the baseline
        is the same architecture (from the engine's metadata) with random weights — the latency is the same.
    repeats: timed calls per forward measurement (>= 3: a median and a p90 of fewer mean little).
    loop_budget_s: time one loop measurement may take before it is timed over fewer steps and scaled.
    """

    engines: list[Path]
    batches: list[int] = field(default_factory=lambda: [1, 64])
    steps: int | None = None
    sampler: str = "ddpm"
    device: str = "auto"
    ckpt: Path | None = None
    repeats: int = 20
    loop_budget_s: float = 20.0
    cuda_graph: bool = False
    threads: int | None = None
    seed: int = 0
    command: str = ""

    def check(self) -> None:
        """Every option, and every engine's metadata with --steps/--sampler, before minutes of measuring."""
        if not self.engines:
            raise InvalidArgumentError("give at least one --engine")
        for e in self.engines:
            if not Path(e).is_file():
                raise ArtifactError(f"engine file {str(e)!r} does not exist")
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise InvalidArgumentError(f"--steps must be an integer >= 1, got {self.steps}")
        if self.repeats < 3:
            raise InvalidArgumentError(f"--repeats must be >= 3, got {self.repeats}")
        if not self.loop_budget_s > 0:
            raise InvalidArgumentError(f"--loop-budget must be > 0 seconds, got {self.loop_budget_s}")
        if self.ckpt is not None and not Path(self.ckpt).is_file():
            raise ArtifactError(f"--ckpt file {str(self.ckpt)!r} does not exist")
        parse_int_list(self.batches, option="--batch")
        for e in self.engines:
            SamplingPlan.create(read_metadata(e), steps=self.steps, sampler=self.sampler, seed=self.seed)


def parse_batches(text: str) -> list[int]:
    """'1,64' -> [1, 64] (``ddpm.cliutil.parse_int_list`` for ``--batch``)."""
    return parse_int_list(text, option="--batch")


def _machine(device: torch.device) -> dict[str, Any]:
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


def _bench_engine(
    cfg: BenchConfig, engine: Path, dev: torch.device, rates: DeviceRates, log: Callable[[str], Any]
) -> list[dict[str, Any]]:
    """Open the engine and its eager twin once, then measure every batch size."""
    t0 = time.perf_counter()
    with open_backend(engine, device=dev, threads=cfg.threads) as backend:
        load_s = time.perf_counter() - t0
        plan = SamplingPlan.create(backend.meta, steps=cfg.steps, sampler=cfg.sampler, seed=cfg.seed)
        t0 = time.perf_counter()
        model, weights = eager_model(engine, backend.meta, cfg.ckpt, dev)
        eager_load_s = time.perf_counter() - t0
        results = []
        for batch in cfg.batches:
            log(f"bench {engine.name} batch {batch} on {dev} ...")
            res = bench_case(Case(cfg, backend, model, plan, dev, batch, rates))
            results.append(
                {
                    "engine": str(engine),
                    "backend": backend.name,
                    "backend_description": backend.description,
                    "device": str(dev),
                    "baseline_weights": weights,
                    "setup_s": {"backend_load": load_s, "eager_model_load": eager_load_s},
                    **res,
                }
            )
    return results


def _targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each TARGETS entry checked against every result it applies to."""
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


def run_bench(cfg: BenchConfig, *, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Measure every engine x batch; returns the JSON-able report (render it with render_markdown)."""
    cfg.check()
    dev = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log(f"measuring {dev} copy bandwidth and matmul rate ...")
    rates = measure_rates(dev)
    results = [r for engine in cfg.engines for r in _bench_engine(cfg, Path(engine), dev, rates, log)]
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
            "sampler": cfg.sampler,
            "device": str(dev),
            "repeats": cfg.repeats,
            "loop_budget_s": cfg.loop_budget_s,
            "cuda_graph": cfg.cuda_graph,
            "threads": torch.get_num_threads(),
        },
        "results": results,
        "targets": _targets(results),
    }
