"""`ddpm bench`: latency per stage (model forward, step update, full loop) of each engine against eager PyTorch.

For every engine and batch size, in one process and on one device (bench/stages.py):

    forward   the engine's backend vs the same network in eager torch           (floor: FLOPs / matmul rate)
    update    the fused kernel vs ddpm.step (torch reference) vs the eager DDPM update (separate ops + randn_like)
                                                                                  (floor: 12 B/element / copy bandwidth)
    loop      ddpm.reverse (backend + fused step, --sampler) vs the eager DDPM loop
                                                                                  (floor: steps x both floors)

Every runtime x precision that can run the engine here is measured in the same run (an ONNX file on CPU:
onnxruntime fp32, OpenVINO fp32, OpenVINO bf16; a checkpoint: torch fp32, torch bf16 autocast), beside eager
torch fp32 (the baseline) and eager torch bf16; the fastest forward and loop rows are marked. bf16 rows appear
only on a CPU with native bf16 (ddpm.precision). The first pair (onnxruntime fp32 / torch fp32) is the engine's
own result; the others are extra forward and loop rows of it (bench/stages.py, ``bench_variant``).

Every row carries its median, p10 and p90, the CPU share this process got while it was timed, its speed-up over
the eager baseline of its stage and how far it is from its floor. A loop of --steps that would exceed the time
budget is timed over fewer steps (a respaced schedule, same per-step work) and scaled up; the report says so
(``loop_steps_timed``). The targets' met/missed verdict is withheld when the machine was busy, with the reasons
(bench/trust.py). The report's tables and plot: bench/report.py.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ddpm.artifacts import artifact_kind
from ddpm.build_facts import build_facts
from ddpm.cliutil import parse_int_list
from ddpm.devices import default_cpu_threads
from ddpm.errors import InvalidArgumentError, MissingDependencyError, SamplingError
from ddpm.extension import cpu_extension
from ddpm.precision import Precision, cpu_has_bf16, parse_precision
from ddpm.runtime.backends import RUNTIMES, resolve_device
from ddpm.runtime.backends.openvino_backend import import_openvino
from ddpm.runtime.sampling import SamplingPlan, open_engine

from .config import BenchConfig
from .floors import DeviceRates, measure_rates
from .report import plot_report, render_markdown
from .stages import Case, autocast_twin, bench_case, bench_variant, eager_model
from .trust import TARGETS, MachineClock, assess, check_targets, verdict_line

__all__ = [
    "BenchConfig",
    "run_bench",
    "parse_batches",
    "render_markdown",
    "plot_report",
    "verdict_line",
    "TARGETS",
]

# Environment variables that set thread counts behind the runtimes' backs: recorded when set.
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
)


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
        "cpu_native_bf16": cpu_has_bf16(),
        **build_facts(),
    }
    try:
        info["openvino"] = import_openvino().__version__.split("-")[0]
    except MissingDependencyError:
        info["openvino"] = "not installed"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = p.name
        info["compute_capability"] = f"{p.major}.{p.minor}"
    return info


def _default_precisions(runtime: str, dev: torch.device) -> list[Precision | None]:
    """What each runtime can compute in on this device (None: the artifact's own, for files that fix it)."""
    bf16 = [Precision.BF16] if dev.type == "cuda" or cpu_has_bf16() else []
    if runtime == "torch":
        return [Precision.FP32, *bf16, *([Precision.FP16] if dev.type == "cuda" else [])]
    if runtime == "openvino":
        return [Precision.FP32, *bf16] if dev.type == "cpu" else []
    if runtime == "onnxruntime" and dev.type == "cpu":
        return [Precision.FP32]
    return [None]  # onnxruntime on CUDA, TensorRT: the file's precision


def variants(cfg: BenchConfig, engine: Path, dev: torch.device, log: Callable[[str], Any]) -> list[tuple]:
    """(runtime, precision) pairs to measure for one engine, the artifact's default runtime first. Explicitly
    asked pairs are kept even when unsupported, so that open_backend refuses them with its one line."""
    out: list[tuple[str, Precision | None]] = []
    for runtime in RUNTIMES[artifact_kind(engine)]:
        if cfg.runtimes is not None and runtime not in cfg.runtimes:
            continue
        if runtime == "openvino" and cfg.runtimes is None:
            try:
                import_openvino()
            except MissingDependencyError as e:
                log(f"skipping openvino: {e}")
                continue
        if cfg.precisions is not None:
            out += [(runtime, parse_precision(p)) for p in cfg.precisions]
        else:
            out += [(runtime, p) for p in _default_precisions(runtime, dev)]
    if not out:
        raise InvalidArgumentError(f"no runtime x precision asked for can run {engine.name} on {dev}")
    return out


def _eager_twins(pairs: list[tuple], dev: torch.device) -> list[Precision]:
    """Reduced precisions to run eager torch in too: those the engines run in, where torch autocast can."""
    reduced = {p for _, p in pairs if p is not None and p.reduced}
    if dev.type == "cpu":
        reduced.discard(Precision.FP16)
        if not cpu_has_bf16():
            reduced.discard(Precision.BF16)
    return sorted(reduced, key=lambda p: p.value)


def _mark_fastest(rows: list[dict[str, Any]]) -> None:
    for stage in ("forward", "loop"):
        mine = [r for r in rows if r["stage"] == stage]
        if mine:
            min(mine, key=lambda r: r["median_s"])["fastest"] = True


def _open_all(cfg: BenchConfig, engine: Path, dev: torch.device, pairs: list[tuple], opened: list) -> float:
    """Open every pair into ``opened`` (the caller closes them); the seconds the first one took to open."""
    load_s = 0.0
    for runtime, precision in pairs:
        t0 = time.perf_counter()
        # the same opener as ddpm run, with the run's options
        options = cfg.sampling.replace(
            device=str(dev), threads=cfg.threads, runtime=runtime, precision=precision
        )
        opened.append(open_engine(engine, options).__enter__())
        load_s = load_s or time.perf_counter() - t0
    return load_s


def _bench_batch(case: Case, opened: list, twins: list, log: Callable[[str], Any]) -> dict[str, Any]:
    """bench_case for the first backend, then forward + loop rows of every other one and of the eager twins."""
    backend = opened[0]
    res = bench_case(case)
    for r in res["rows"]:
        if r["stage"] != "update":
            tags = ("eager torch", "fp32") if r.get("baseline") else (backend.name, str(backend.precision))
            r["runtime"], r["precision"] = tags
    for other in opened[1:]:
        log(f"  {other.name} {other.precision} ...")
        res["rows"] += bench_variant(case, res, other, runtime=other.name, precision=str(other.precision))
    for precision, twin in twins:
        log(f"  eager torch {precision} ...")
        res["rows"] += bench_variant(
            case, res, twin, runtime="eager torch", precision=str(precision), eager=True
        )
    _mark_fastest(res["rows"])
    return res


def _bench_engine(
    cfg: BenchConfig, engine: Path, dev: torch.device, rates: DeviceRates, log: Callable[[str], Any]
) -> list[dict[str, Any]]:
    """Open every runtime x precision of the engine and its eager twins once, then measure every batch size."""
    pairs = variants(cfg, engine, dev, log)
    opened: list[Any] = []
    try:
        load_s = _open_all(cfg, engine, dev, pairs, opened)
        backend = opened[0]
        plan = SamplingPlan.for_artifact(backend.meta, cfg.sampling)
        t0 = time.perf_counter()
        model, weights = eager_model(engine, backend.meta, cfg.ckpt, dev)
        eager_load_s = time.perf_counter() - t0
        twins = [(p, autocast_twin(model, p, dev)) for p in _eager_twins(pairs, dev)]
        described = [
            {"runtime": b.name, "precision": str(b.precision), "description": b.description} for b in opened
        ]
        results = []
        for batch in cfg.batches:
            log(f"bench {engine.name} batch {batch} on {dev} ...")
            try:
                res = _bench_batch(Case(cfg, backend, model, plan, dev, batch, rates), opened, twins, log)
            except SamplingError as e:
                raise SamplingError(f"{engine}: batch {batch}: {e}") from None
            results.append(
                {
                    "engine": str(engine),
                    "backend": backend.name,
                    "backend_description": backend.description,
                    "precision": str(backend.precision),
                    "variants": described,
                    "device": str(dev),
                    "baseline_weights": weights,
                    "setup_s": {"backend_load": load_s, "eager_model_load": eager_load_s},
                    **res,
                }
            )
    finally:
        for b in reversed(opened):
            b.close()
    return results


def _threads(cfg: BenchConfig, asked: int | None, results: list[dict[str, Any]], dev: torch.device) -> dict:
    """Every thread setting the run used: one count for all of them unless --threads said otherwise."""
    runtimes = {v["runtime"] for res in results for v in res["variants"]}
    cpu_ext = cpu_extension()
    out: dict[str, Any] = {
        "asked": asked,
        "usable_cores": default_cpu_threads(),
        "machine_cores": os.cpu_count(),
        "torch_intra_op": torch.get_num_threads(),
        "torch_interop": torch.get_num_interop_threads(),
        "fused_kernel_openmp": cpu_ext.build_info()["max_threads"] if cpu_ext is not None else None,
    }
    if dev.type == "cpu":
        if "onnxruntime" in runtimes:
            out |= {"onnxruntime_intra_op": cfg.threads, "onnxruntime_inter_op": 1}
        if "openvino" in runtimes:
            out["openvino"] = cfg.threads
        if "torch" in runtimes:
            out["torch_backend"] = cfg.threads
    out["env"] = {k: os.environ[k] for k in _THREAD_ENV if k in os.environ}
    return out


def run_bench(cfg: BenchConfig, *, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Measure every engine x batch; returns the JSON-able report (render it with render_markdown).

    Every CPU runtime and the eager baseline run on the same thread count (--threads, default the cores this
    process may use): torch's default can be the machine's cores, oversubscribing a container's share, and a
    baseline on other threads than the engine compares runtimes and thread counts at once."""
    cfg.check()
    dev = resolve_device(cfg.device)
    asked, saved = cfg.threads, torch.get_num_threads()
    cfg = replace(cfg, threads=cfg.threads or default_cpu_threads())
    torch.set_num_threads(cfg.threads)
    try:
        before = MachineClock.now()
        log(f"measuring {dev} copy bandwidth and matmul rate ...")
        rates = measure_rates(dev)
        results = [r for engine in cfg.engines for r in _bench_engine(cfg, Path(engine), dev, rates, log)]
        after = MachineClock.now()
        threads = _threads(cfg, asked, results, dev)
        machine = _machine(dev)
    finally:
        torch.set_num_threads(saved)
    targets = check_targets(results)
    report = {
        "command": cfg.command,
        "machine": machine,
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
            "threads": cfg.threads,
            "runtimes": cfg.runtimes,
            "precisions": cfg.precisions,
        },
        "threads": threads,
        "results": results,
        "targets": targets,
    }
    return report | assess(results, targets, before, after, own_threads=cfg.threads)
