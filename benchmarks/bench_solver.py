"""DPM-Solver++(2M) against 1000-step DDPM: quality and end-to-end speed, side by side in one run.

    python benchmarks/bench_solver.py --digits DIR --swissroll DIR [--cifar10 DIR] \
        --json benchmarks/solver_cpu.json --md benchmarks/solver_cpu.md

Each DIR holds ``model.safetensors`` (from ``ddpm train``) and ``model.onnx`` (its ``ddpm export``).

Quality (through the ONNX path, onnxruntime + the fused kernel, same seed and sample count for every sampler):
    swiss roll: energy distance of N points to held-out data (and the data-vs-data floor as the scale);
    digits:     mean confidence and class coverage of a classifier trained on the real digits.
Speed (digits at batch 64; the CIFAR-10 preset at batch 1 and 64 when given):
    eager - the eager PyTorch 1000-step DDPM loop (the checkpoint in torch, separate update ops + randn_like);
    ours  - ``ddpm.sample(onnx, ..., sampler=S, steps=N)``: backend open + x_T + N steps, as ``ddpm run`` does.
Both timed in this process, alternating, median of --repeats. The CIFAR-10 eager loop would take over an hour at
batch 64, so it is timed over --cifar-eager-steps steps and scaled to 1000 (its per-step cost is constant:
the same network call and update every step); the JSON marks it ``scaled_from_steps``.
Take the figures on a quiet machine: eager torch on CPU slows down many times when its threads compete.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import ddpm
from ddpm.bench.baseline import EagerScheduler, eager_loop
from ddpm.build_facts import build_facts
from ddpm.evaluation.metrics import digits_classifier_check, swissroll_energy_check
from ddpm.io import write_text_atomic
from ddpm.metadata import schedule_from_meta
from ddpm.noise import initial_noise

# (sampler, steps, spacing); None = the sampler's default (uniform for ddpm/ddim, trailing for dpm++)
SOLVERS = [
    ("ddpm", 1000, None),
    ("dpm++2m", 20, None),
    ("dpm++2m-sde", 20, None),
    ("dpm++2m", 10, None),
    ("dpm++2m", 20, "uniform"),
    ("ddim", 20, None),
]


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def quality(run: Path, kind: str, n: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for sampler, steps, spacing in SOLVERS:
        t0 = time.perf_counter()
        x = ddpm.sample(
            run / "model.onnx", n, steps=steps, sampler=sampler, batch=min(n, 500), seed=seed, spacing=spacing
        )
        spacing = spacing or ddpm.Sampler.parse(sampler).default_spacing.value
        seconds = time.perf_counter() - t0
        if kind == "swissroll":
            m = swissroll_energy_check(x)
            metric = {"energy_distance": m["sample_vs_data"], "data_vs_data": m["data_vs_data"]}
        else:
            m = digits_classifier_check(x)
            metric = {"confidence": m["mean_confidence"], "classes": m["classes_present"]}
        rows.append(
            {"model": kind, "sampler": sampler, "steps": steps, "spacing": spacing, "samples": n,
             "seconds": seconds, **metric}
        )  # fmt: skip
        print(f"quality {kind} {sampler}-{steps} ({spacing}): {metric} ({seconds:.1f} s)", flush=True)
    return rows


def speed(run: Path, batch: int, repeats: int, eager_steps: int | None, sampler: str, steps: int) -> dict:
    model, meta = ddpm.load_model(run / "model.safetensors")
    schedule = schedule_from_meta(meta)
    sched = EagerScheduler(schedule)
    shape = (batch, *meta["sample_shape"])
    k = len(schedule) if eager_steps is None else eager_steps
    indices = list(range(len(schedule) - 1, len(schedule) - 1 - k, -1))

    def eager() -> None:
        eager_loop(model, sched, initial_noise(0, shape), indices)

    def ours() -> None:
        ddpm.sample(run / "model.onnx", batch, steps=steps, sampler=sampler, batch=batch, seed=0)

    eager()  # warm-up: allocator, thread pools
    ours()
    t_eager, all_eager, t_ours, all_ours = [], [], [], []
    for _ in range(repeats):  # alternate, so drift on the machine hits both
        m, ts = _timed(eager, 1)
        all_eager += ts
        m, ts = _timed(ours, 1)
        all_ours += ts
    t_eager = statistics.median(all_eager) * len(schedule) / k
    t_ours = statistics.median(all_ours)
    row = {
        "model": run.name,
        "batch": batch,
        "eager_ddpm_1000_s": t_eager,
        "eager_spread_s": [min(all_eager) * len(schedule) / k, max(all_eager) * len(schedule) / k],
        "ours": f"onnxruntime + fused, {sampler} {steps} steps",
        "ours_s": t_ours,
        "ours_spread_s": [min(all_ours), max(all_ours)],
        "speedup": t_eager / t_ours,
        "scaled_from_steps": None if eager_steps is None else k,
    }
    print(
        f"speed {run.name} b{batch}: eager {t_eager:.2f} s, ours {t_ours:.3f} s, {row['speedup']:.1f}x",
        flush=True,
    )
    return row


def render(report: dict[str, Any]) -> str:
    lines = [
        "# DPM-Solver++(2M) vs 1000-step DDPM (CPU)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; load average before/after: {report['load_before']} / {report['load_after']}",
        "",
        "## Quality (ONNX path, same seed and sample count per sampler)",
        "",
        "| model | sampler | steps | spacing | samples | metric | value | scale | seconds |",
        "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in report["quality"]:
        if r["model"] == "swissroll":
            metric, value, scale = (
                "energy distance",
                f"{r['energy_distance']:.5f}",
                f"{r['data_vs_data']:.5f} (data vs data)",
            )
        else:
            metric, value, scale = (
                "classifier confidence",
                f"{r['confidence']:.3f}",
                f"{r['classes']} of 10 classes",
            )
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['spacing']} | {r['samples']} | {metric} | {value} | "
            f"{scale} | "
            f"{r['seconds']:.2f} |"
        )
    lines += [
        "",
        "## Speed, end to end (median; spread = min..max)",
        "",
        "| model | batch | eager torch DDPM-1000 | ours | ours time | speed-up | target |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in report["speed"]:
        scaled = f" (timed over {r['scaled_from_steps']} steps, scaled)" if r["scaled_from_steps"] else ""
        target = ""
        if r["model"] == "digits" and r["batch"] == 64:
            target = ">= 40x: " + ("met" if r["speedup"] >= 40 else "MISSED")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['eager_ddpm_1000_s']:.2f} s{scaled} | {r['ours']} | "
            f"{r['ours_s']:.3f} s ({r['ours_spread_s'][0]:.3f}..{r['ours_spread_s'][1]:.3f}) | "
            f"{r['speedup']:.1f}x | {target} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", type=Path, required=True)
    ap.add_argument("--swissroll", type=Path, required=True)
    ap.add_argument("--cifar10", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--digits-samples", type=int, default=500)
    ap.add_argument("--swissroll-points", type=int, default=2000)
    ap.add_argument("--cifar-eager-steps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    load_before = [round(v, 2) for v in os.getloadavg()]
    report: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, ddpm._C {build_facts().get('cpu_simd', '?')}",
        "load_before": load_before,
        "quality": quality(args.swissroll, "swissroll", args.swissroll_points, seed=0)
        + quality(args.digits, "digits", args.digits_samples, seed=0),
        "speed": [speed(args.digits, 64, args.repeats, None, "dpm++2m", 20)],
    }
    if args.cifar10 is not None:
        for b in (1, 64):
            report["speed"].append(
                speed(args.cifar10, b, 1 if b == 64 else args.repeats, args.cifar_eager_steps, "dpm++2m", 20)
            )
    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
    md = render(report)
    print(md)
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    if args.md:
        write_text_atomic(args.md, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
