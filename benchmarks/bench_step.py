"""Time the fused step (noise included) against the eager PyTorch DDPM update (separate ops + randn_like), per step.

    python benchmarks/bench_step.py --json benchmarks/step_cpu.json --md benchmarks/step_cpu.md

Eager (separate ops, as typical DDPM sampling loops write it):
    x0 = (p * x + q * m).clamp(-c, c); mean = a * x + b * x0; x = mean + sigma * torch.randn_like(x)
Fused, the ways a loop can call it (all update x in place, noise drawn in-kernel):
    public - ddpm.fused_step(schedule, i, x, m, seed=seed, clip=c, out=x): the schedule's cached float32 table
    raw    - ddpm.kernels.fused_step_raw(x, m, row, c, seed, i, 0, out=x): tensors checked every call
    bound  - HostStepTable.bind(x, m, x)(): checked once, then one call per step (CPU)
    graph  - DeviceStepTable.step captured GRAPH_STEPS times in one CUDA graph, replay time / GRAPH_STEPS (CUDA)
Floor: 12 bytes per element (read x and m, write x) over the copy bandwidth measured here (a large
tensor copy, read + write bytes / time). Medians of --repeats timings, each the mean over enough calls to last
~--min-ms; warm-up calls are not timed. Threads: torch's and OpenMP's defaults, as users have them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

import ddpm
from ddpm import Schedule
from ddpm.bench.floors import UPDATE_BYTES_PER_ELEMENT, measure_copy_bandwidth
from ddpm.build_facts import build_facts
from ddpm.diffusion import step_coefficients
from ddpm.extension import cpu_extension, cuda_extension
from ddpm.io import write_text_atomic
from ddpm.kernels import DeviceStepTable, HostStepTable, fused_step_raw

SIZES = [(1, 1, 28, 28), (64, 1, 28, 28), (64, 3, 32, 32), (256, 3, 32, 32)]
SEED, CLIP = 1234, 1.0
SCHEDULE = Schedule.linear(1000)
STEP = 500  # a middle step: sigma > 0, so the noise is really drawn
GRAPH_STEPS = 50  # CUDA: steps per captured graph
# Acceptance targets (docs/design.md, "Performance"): speedup of the public ddpm.fused_step over eager, per shape.
TARGETS = {"cpu": {(1, 1, 28, 28): 10.0, (64, 3, 32, 32): 5.0}, "cuda": {(1, 1, 28, 28): 10.0}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fn: Callable[[], object], device: torch.device, repeats: int, min_ms: float) -> float:
    """Median over `repeats` of the mean time per call (us), each over enough calls to last ~min_ms."""
    for _ in range(3):
        fn()
    _sync(device)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_ms / 1e3 or calls < 3:  # calibrate the number of calls
        fn()
        calls += 1
    _sync(device)
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def bench_size(
    shape: tuple[int, ...], device: torch.device, bandwidth: float, repeats: int, min_ms: float
) -> dict:
    a, b, c, p, q, sigma = step_coefficients(SCHEDULE, STEP)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=gen)
    m = torch.randn(shape, device=device, generator=gen)
    state = {"x": x.clone()}

    def eager() -> None:
        xe = state["x"]
        x0 = (p * xe + q * m).clamp(-CLIP, CLIP)
        mean = a * xe + b * x0
        state["x"] = mean + sigma * torch.randn_like(xe)

    xf = x.clone()
    row = (a, b, c, p, q, sigma)
    row_result = {
        "device": device.type,
        "shape": list(shape),
        "numel": x.numel(),
        "eager_us": time_us(eager, device, repeats, min_ms),
        "fused_public_us": time_us(
            lambda: ddpm.fused_step(SCHEDULE, STEP, xf, m, seed=SEED, clip=CLIP, out=xf),
            device,
            repeats,
            min_ms,
        ),
        "fused_raw_us": time_us(
            lambda: fused_step_raw(xf, m, row, CLIP, SEED, STEP, 0, xf), device, repeats, min_ms
        ),
        "floor_us": UPDATE_BYTES_PER_ELEMENT * x.numel() / bandwidth * 1e6,
    }
    if device.type == "cpu":
        table = HostStepTable.from_schedule(SCHEDULE, seed=SEED, clip=CLIP)
        run = table.bind(xf, m, xf)

        left = [0]

        def bound() -> (
            None
        ):  # walks the whole table, as a sampling loop does, rewinding every len(SCHEDULE) calls
            if left[0] == 0:
                table.set_counter(len(SCHEDULE) - 1)
                left[0] = len(SCHEDULE)
            left[0] -= 1
            run()

        row_result["fused_bound_us"] = time_us(bound, device, repeats, min_ms)
    else:  # CUDA: K device-counter steps captured in one graph; per-step time = replay time / K (device time)
        table = DeviceStepTable.from_schedule(SCHEDULE, seed=SEED, clip=CLIP, device=device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            table.counter.fill_(STEP)  # rewind inside the graph: every replay runs rows STEP .. STEP-K+1
            for _ in range(GRAPH_STEPS):
                table.step(xf, m, xf)
        row_result["fused_graph_us"] = time_us(graph.replay, device, repeats, min_ms) / GRAPH_STEPS
    for key in ("fused_public_us", "fused_raw_us", "fused_bound_us", "fused_graph_us"):
        if key in row_result:
            row_result[key.replace("_us", "_speedup")] = row_result["eager_us"] / row_result[key]
            row_result[key.replace("_us", "_vs_floor")] = row_result[key] / row_result["floor_us"]
    return row_result


def verdicts(result: dict) -> list[str]:
    """One line per acceptance target: the public ddpm.fused_step's speedup over eager, met or missed."""
    lines = []
    for r in result["rows"]:
        target = TARGETS.get(r["device"], {}).get(tuple(r["shape"]))
        if target is not None:
            got = r["fused_public_speedup"]
            verdict = "met" if got >= target else "MISSED"
            shape = "x".join(map(str, r["shape"]))
            lines.append(
                f"- {r['device']} {shape}: ddpm.fused_step {got:.1f}x vs target >= {target:g}x: {verdict}"
            )
    return lines


def markdown(result: dict) -> str:
    lines = [
        "# Fused step vs eager PyTorch update (per step, noise included)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}; torch {result['torch']} with {result['torch_threads']} threads; "
        f"ddpm._C {result['facts'].get('_C', '?')}; SIMD variant `{result['simd']}`; "
        f"load average at start {result['load_average']}.",
        "",
        "| device | shape | eager us | ddpm.fused_step us | speedup | fused raw us | speedup "
        "| fused bound (CPU) / graph (CUDA) us | speedup | floor us | best / floor |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        key = "fused_bound" if "fused_bound_us" in r else "fused_graph"
        best = min(r["fused_public_us"], r["fused_raw_us"], r[f"{key}_us"])
        lines.append(
            f"| {r['device']} | {'x'.join(map(str, r['shape']))} | {r['eager_us']:.1f} | "
            f"{r['fused_public_us']:.1f} | {r['fused_public_speedup']:.1f}x | {r['fused_raw_us']:.1f} | "
            f"{r['fused_raw_speedup']:.1f}x | {r[f'{key}_us']:.1f} | {r[f'{key}_speedup']:.1f}x | "
            f"{r['floor_us']:.2f} | {best / r['floor_us']:.1f} |"
        )
    lines += [
        "",
        "Targets (the public `ddpm.fused_step` over eager):",
        *verdicts(result),
        "",
        "Copy bandwidth (floor = 12 bytes/element over it): "
        + ", ".join(f"{k}: {v / 1e9:.1f} GB/s" for k, v in result["bandwidth_Bps"].items()),
        "",
        "Eager: `x0 = (p*x + q*m).clamp(-c, c); mean = a*x + b*x0; x = mean + sigma*torch.randn_like(x)`. "
        "ddpm.fused_step: `ddpm.fused_step(schedule, i, x, m, seed=s, clip=c, out=x)` (the schedule's float32 "
        "table cached on first use). Fused raw: `fused_step_raw(x, m, row, c, seed, i, 0, out=x)` (tensors checked "
        "every call). Fused bound: `HostStepTable.bind(x, m, x)()` (checked once). Fused graph (CUDA): "
        f"{GRAPH_STEPS} `DeviceStepTable.step` calls captured in one CUDA graph, replay time / {GRAPH_STEPS}. "
        f"Medians of {result['repeats']} timings; warm-up excluded; all rows of a shape timed in one run. "
        "GPU targets: >= 10x at batch 1, within 2x of the floor at 256x3x32x32.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--md", help="write a markdown table here")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-ms", type=float, default=20.0, help="each timing lasts at least this long")
    ap.add_argument(
        "--devices", default="auto", help="cpu, cuda, or auto (cpu, plus cuda when a GPU is visible)"
    )
    args = ap.parse_args(argv)

    if cpu_extension() is None:
        print("bench_step: ddpm._C is not built; nothing to benchmark (pip install -e .)", file=sys.stderr)
        return 2
    devices = ["cpu", "cuda"] if args.devices == "auto" else args.devices.split(",")
    devices = [
        d for d in devices if d != "cuda" or (torch.cuda.is_available() and cuda_extension() is not None)
    ]
    result = {
        "command": "python "
        + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "simd": cpu_extension().simd_target(),
        "facts": build_facts(),
        "repeats": args.repeats,
        "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "schedule_step": STEP,
        "bandwidth_Bps": {},
        "rows": [],
    }
    for name in devices:
        device = torch.device(name)
        bw = measure_copy_bandwidth(device)
        result["bandwidth_Bps"][name] = bw
        if name == "cuda":
            result["gpu"] = torch.cuda.get_device_name(device)
        for shape in SIZES:
            row = bench_size(shape, device, bw, args.repeats, args.min_ms)
            result["rows"].append(row)
            fused = ", ".join(
                f"{k} {row[f'fused_{k}_us']:8.1f} us ({row[f'fused_{k}_speedup']:5.1f}x)"
                for k in ("public", "raw", "bound", "graph")
                if f"fused_{k}_us" in row
            )
            print(
                f"{name:4s} {'x'.join(map(str, shape)):>11s}: eager {row['eager_us']:9.1f} us, {fused}, "
                f"floor {row['floor_us']:7.2f} us",
                flush=True,
            )
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2, default=str) + "\n")
    print("\n".join(verdicts(result)))
    if args.md:
        write_text_atomic(args.md, markdown(result))
    return 0 if all(math.isfinite(r["fused_raw_us"]) for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
