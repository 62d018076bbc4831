"""The quality-vs-latency frontier: samplers x step counts, each point (wall time for 64 samples, quality).

    python benchmarks/frontier.py --digits DIR --swissroll DIR --cache runs/frontier_quality.json \
        --json benchmarks/frontier_cpu.json --md benchmarks/frontier_cpu.md --plot benchmarks/frontier_cpu.png

Each DIR holds ``model.safetensors`` (``ddpm train``) and ``model.onnx`` (its ``ddpm export``).
Points: samplers ddpm, ddim, dpm++2m, dpm++2m-sde at 5, 10, 20, 50, 100 and 1000 steps (each sampler's default
spacing), through ``ddpm.sample`` on the ONNX file (onnxruntime CPU + the fused kernel), plus the eager PyTorch
1000-step DDPM loop (the checkpoint in torch, separate update ops + ``torch.randn_like``) as the baseline point.
- time: median wall time of ``ddpm.sample(onnx, 64, batch=64, ...)`` (backend open included, as ``ddpm run``),
  --repeats runs (one run for 1000-step points); the eager point times the loop on the same 64 x_T.
- quality: swiss roll -> energy distance of --points samples to held-out data (scale: data vs data);
  digits -> FD-classifier of --images samples (``ddpm eval``'s proxy Frechet distance; scale: real vs real at
  the same count), computed against a cached reference (``ddpm eval --save-ref``).
Quality does not depend on machine load, so it is cached in --cache and a later run only re-times; take the
timing pass on a quiet machine (eager torch on CPU slows down many times when its threads compete).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ddpm
from ddpm.bench.baseline import EagerScheduler, eager_loop
from ddpm.evaluation.evaluate import evaluate, evaluate_report
from ddpm.evaluation.metrics import swissroll_energy_check
from ddpm.images import new_figure, save_figure, to_uint8_nhwc
from ddpm.io import write_text_atomic
from ddpm.metadata import schedule_from_meta
from ddpm.noise import initial_noise

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde")
STEPS = (5, 10, 20, 50, 100, 1000)
TIMED = 64


def _eager_samples(run: Path, n: int, seed: int) -> torch.Tensor:
    model, meta = ddpm.load_model(run / "model.safetensors")
    schedule = schedule_from_meta(meta)
    torch.manual_seed(seed)
    x = initial_noise(seed, (n, *meta["sample_shape"]))
    return eager_loop(model, EagerScheduler(schedule), x, range(len(schedule) - 1, -1, -1))


class Quality:
    """The metric of one model's samples, with the reference prepared once."""

    def __init__(self, kind: str, cache_dir: Path) -> None:
        self.kind = kind
        self.ref = cache_dir / "frontier_digits_ref.npz"
        if kind == "digits" and not self.ref.exists():
            x = np.zeros((64, 8, 8, 1), np.uint8)  # any valid samples: this call only writes the reference
            evaluate_report(x, "digits", device="cpu", save_ref=self.ref)

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        if self.kind == "swissroll":
            e = swissroll_energy_check(x)
            return {"value": e["sample_vs_data"], "scale": e["data_vs_data"], "metric": "energy distance"}
        m = evaluate(to_uint8_nhwc(x), str(self.ref), device="cpu")["metrics"]["fd_classifier"]
        return {"value": m["value"], "scale": m["scale"], "metric": "FD-classifier"}


def quality_pass(kind: str, run: Path, n: int, cache: dict[str, Any], cache_path: Path | None) -> None:
    q = Quality(kind, (cache_path or Path("runs/x")).parent)
    points = [(s, k) for s in SAMPLERS for k in STEPS] + [("eager", 1000)]
    for sampler, steps in points:
        key = f"{kind}/{sampler}/{steps}/{n}"
        if key in cache:
            continue
        t0 = time.perf_counter()
        if sampler == "eager":
            x = _eager_samples(run, n, seed=0)
        else:
            x = ddpm.sample(run / "model.onnx", n, steps=steps, sampler=sampler, batch=min(n, 512), seed=0)
        cache[key] = q(x)
        print(f"quality {key}: {cache[key]} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if cache_path is not None:
            write_text_atomic(cache_path, json.dumps(cache, indent=1) + "\n")


def _median_time(fn, repeats: int) -> tuple[float, float, float]:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), max(ts)


def timing_pass(kind: str, run: Path, repeats: int) -> dict[str, tuple[float, float, float]]:
    out = {}
    ddpm.sample(run / "model.onnx", TIMED, steps=5, batch=TIMED)  # warm-up: thread pools, allocator
    for sampler in SAMPLERS:
        for steps in STEPS:

            def go(sampler=sampler, steps=steps):
                ddpm.sample(run / "model.onnx", TIMED, steps=steps, sampler=sampler, batch=TIMED, seed=0)

            out[f"{sampler}/{steps}"] = _median_time(go, 1 if steps >= 1000 else repeats)
            print(f"time {kind} {sampler}-{steps}: {out[f'{sampler}/{steps}'][0]:.3f} s", flush=True)
    out["eager/1000"] = _median_time(lambda: _eager_samples(run, TIMED, 0), 1)
    print(f"time {kind} eager-1000: {out['eager/1000'][0]:.2f} s", flush=True)
    return out


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Quality vs latency (CPU)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; load average before/after timing: {report['load']}",
        "",
        "Time: wall time for 64 samples (batch 64, median; 1000-step points one run). Quality: swiss roll = energy",
        "distance to held-out data (lower is better; scale = data vs data), digits = FD-classifier (lower is",
        "better; scale = real vs real at the same count). Eager = PyTorch 1000-step DDPM loop, the baseline.",
        "",
        "| model | sampler | steps | time (s) | quality | scale | speed-up vs eager |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in report["points"]:
        lines.append(
            f"| {p['model']} | {p['sampler']} | {p['steps']} | {p['seconds']:.3f} | {p['quality']:.4g} | "
            f"{p['scale']:.4g} | {p['speedup']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    models = sorted({p["model"] for p in report["points"]})
    fig, first = new_figure(figsize=(6.0 * len(models), 4.6))
    fig.delaxes(first)  # one panel per model below
    for j, model in enumerate(models):
        ax = fig.add_subplot(1, len(models), j + 1)
        pts = [p for p in report["points"] if p["model"] == model]
        for sampler in SAMPLERS:
            s = [p for p in pts if p["sampler"] == sampler]
            ax.plot([p["seconds"] for p in s], [p["quality"] for p in s], "o-", label=sampler)
            for p in s:
                ax.annotate(str(p["steps"]), (p["seconds"], p["quality"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        e = next(p for p in pts if p["sampler"] == "eager")
        ax.plot([e["seconds"]], [e["quality"]], "k*", markersize=12, label="eager torch DDPM-1000")
        ax.axhline(e["scale"], color="grey", lw=0.8, ls="--", label="scale (data vs data / real vs real)")
        metric = pts[0]["metric"]
        ax.set_xscale("log")
        if metric == "FD-classifier":
            ax.set_yscale("log")
        else:  # energy distance scatters around zero at the data floor: linear near 0, log beyond
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("wall time for 64 samples (s, log scale)")
        ax.set_ylabel(f"{metric} (lower is better)")
        ax.set_title(f"{model}: quality vs latency, CPU (numbers = steps)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", type=Path, required=True)
    ap.add_argument("--swissroll", type=Path, required=True)
    ap.add_argument("--images", type=int, default=256, help="digits samples per quality point")
    ap.add_argument("--points", type=int, default=2000, help="swiss-roll samples per quality point")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, help="JSON cache of the quality pass")
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
    runs = {"swissroll": (args.swissroll, args.points), "digits": (args.digits, args.images)}
    for kind, (run, n) in runs.items():
        quality_pass(kind, run, n, cache, args.cache)
    if args.quality_only:
        return 0
    load0 = os.getloadavg()[0]
    times = {kind: timing_pass(kind, run, args.repeats) for kind, (run, _) in runs.items()}
    points = []
    for kind, (_, n) in runs.items():
        eager_s = times[kind]["eager/1000"][0]
        for key, (med, lo, hi) in times[kind].items():
            sampler, steps = key.split("/")
            q = cache[f"{kind}/{sampler}/{steps}/{n}"]
            points.append({"model": kind, "sampler": sampler, "steps": int(steps), "seconds": med,
                           "spread": [lo, hi], "quality": q["value"], "scale": q["scale"], "metric": q["metric"],
                           "samples_for_quality": n, "speedup": eager_s / med})  # fmt: skip
    report = {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "machine": f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "points": points,
    }
    md = render(report)
    print(md)
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=1) + "\n")
    if args.md:
        write_text_atomic(args.md, md)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
