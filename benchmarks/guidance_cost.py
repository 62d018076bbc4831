"""What classifier-free guidance costs per sampling step on the ONNX path: one step of `ddpm run` guided (ONE
forward of the 2N rows [x; x] with classes [y; null], the guidance fused into the step kernel) against the same
step unguided (N rows, plain conditional), at the same batch, same model, same runtime and threads.

    python benchmarks/guidance_cost.py --engine runs/digits-cond/model.onnx --md benchmarks/guidance_cpu.md

A step is timed as the loop runs it: the backend's forward, then ``fused_step_raw`` in place on x. Median of
--repeats timed steps after warm-up, the two variants interleaved. The bound the issue sets: guided <= 2.1x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ddpm.executors import model_call
from ddpm.kernels import fused_step_raw
from ddpm.loop import _job
from ddpm.options import SamplingOptions
from ddpm.runtime.sampling import SamplingPlan, open_engine


def _step_time(backend, plan: SamplingPlan, batch: int, repeats: int) -> float:
    x = torch.randn(batch, *plan.sample_shape)
    job = _job(backend, x, plan, 0, None, 0, plan.class_rows(0, batch))
    call, i = model_call(backend, job), plan.steps // 2
    row, kw = job.rows32[i], {} if job.history is None else {"history": job.history}

    def step() -> None:
        m, v, u = call(i, job.x)
        extra = dict(kw, variance=v)
        if u is not None:
            extra.update(uncond=u, guidance=plan.guidance)
        fused_step_raw(job.x, m, row, plan.clip, plan.seed, i, 0, job.x, **extra)

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", type=Path, required=True)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per batch (median of medians)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    base = SamplingOptions(sampler="dpm++2m", steps=20, classes=(3,), device="cpu", threads=args.threads)
    rows = []
    load0 = os.getloadavg()[0]
    with open_engine(args.engine, base) as backend, torch.inference_mode():
        plain = SamplingPlan.for_artifact(backend.meta, base)
        guided = SamplingPlan.for_artifact(backend.meta, base.replace(guidance=args.guidance))
        for batch in (int(b) for b in args.batches.split(",")):
            a, b = [], []
            for _ in range(args.rounds):
                a.append(_step_time(backend, plain, batch, args.repeats))
                b.append(_step_time(backend, guided, batch, args.repeats))
            ta, tb = statistics.median(a), statistics.median(b)
            rows.append((batch, ta, tb, tb / ta))
            print(
                f"batch {batch}: unguided {ta * 1e3:.3f} ms, guided {tb * 1e3:.3f} ms, ratio {tb / ta:.2f}x"
            )
    load1 = os.getloadavg()[0]
    lines = [
        "# Cost of classifier-free guidance per step, ONNX path (onnxruntime CPU + fused kernel)",
        "",
        f"`python benchmarks/guidance_cost.py {' '.join(sys.argv[1:])}`",
        "",
        f"{cpu}, {args.threads} threads, {backend.description}; load average {load0:.2f} before, {load1:.2f} "
        f"after. A step = the forward + the fused update (dpm++2m, middle step), median of {args.repeats} steps, "
        f"{args.rounds} interleaved rounds. Guided: S = {args.guidance:g}, ONE forward of 2N rows, the guidance "
        "in the kernel. Bound: <= 2.1x.",
        "",
        "| batch N | unguided step | guided step | ratio |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {n} | {a * 1e3:.3f} ms | {b * 1e3:.3f} ms | {r:.2f}x |" for n, a, b, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
