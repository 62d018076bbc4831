"""Runtime x precision on CPU: end-to-end 1000-step DDPM speed against eager PyTorch fp32, and bf16's quality.

    python benchmarks/bench_precision.py --cifar10 runs/acc/cifar10 --digits runs/acc/digits \
        --swissroll runs/acc/swissroll --threads 1 --json benchmarks/precision_cpu.json --md benchmarks/precision_cpu.md

Each DIR holds ``model.safetensors`` and ``model.onnx`` (its ``ddpm export``).

Speed, per model and batch size (1000-step DDPM, CPU):
    eager fp32  - bench/baseline.py's ``eager_loop``: the checkpoint in eager torch, separate update ops + randn
    ours        - ``ddpm.sample(backend, ...)`` for every runtime x precision that runs here: onnxruntime fp32,
                  OpenVINO fp32 / bf16 (the ONNX file), torch fp32 / bf16 autocast (the checkpoint); backends are
                  opened once (compilation is setup, reported apart), as ``ddpm run`` opens one per run.
    A loop that would exceed --budget seconds is timed over k < 1000 steps (a respaced schedule: the same
    network call and update every step) and scaled to 1000; the table says so ("timed over k").
Quality, OpenVINO bf16 against OpenVINO fp32 (same seed, same samples, 1000 steps):
    swiss roll: energy distance to held-out data; bf16 passes within 1.5x of fp32's.
    digits:     classifier mean confidence within 0.02 of fp32's, all 10 classes present.
    per step:   relative error (norm) of the bf16 model output against fp32's on the fp32 trajectory's states.
Take the figures on a quiet machine: eager torch on CPU slows down many times when its threads compete
(the load average before and after is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

import ddpm
from ddpm.bench.baseline import EagerScheduler, eager_loop
from ddpm.bench.run import _machine as bench_machine
from ddpm.bench.timing import time_fn
from ddpm.evaluation.metrics import digits_classifier_check, swissroll_energy_check
from ddpm.io import write_text_atomic
from ddpm.loop import run_reverse
from ddpm.noise import initial_noise
from ddpm.options import SamplingOptions
from ddpm.precision import cpu_has_bf16
from ddpm.runtime.backends import open_backend
from ddpm.runtime.sampling import SamplingPlan

STEPS = 1000
SWISS_BF16_MAX_RATIO = 1.5  # bf16 energy distance / fp32's
DIGITS_MAX_CONFIDENCE_DROP = 0.02


def _pairs() -> list[tuple[str, str, str]]:
    """(artifact file, runtime, precision) to time; bf16 only where this CPU runs it natively."""
    pairs = [("model.onnx", "onnxruntime", "fp32"), ("model.onnx", "openvino", "fp32")]
    if cpu_has_bf16():
        pairs.append(("model.onnx", "openvino", "bf16"))
    pairs.append(("model.safetensors", "torch", "fp32"))
    if cpu_has_bf16():
        pairs.append(("model.safetensors", "torch", "bf16"))
    return pairs


def _k_steps(per_step: float, budget: float) -> int:
    """Steps to time so one loop takes about ``budget`` seconds: 2..1000."""
    return int(min(STEPS, max(2, budget / max(per_step, 1e-9))))


def _eager(folder: Path, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    model, meta = ddpm.load_model(folder / "model.safetensors", device="cpu")
    model.eval()
    x = torch.randn(batch, *meta["sample_shape"])
    t = torch.full((batch,), 500, dtype=torch.int64)
    with torch.inference_mode():
        fwd = time_fn(lambda _k: model(x, t), repeats=3, warmup=1)
    k = _k_steps(fwd.median, args.budget)
    plan = SamplingPlan.for_artifact(meta, SamplingOptions(steps=k))
    sched = EagerScheduler(plan.schedule)
    loop = time_fn(
        lambda _k: eager_loop(model, sched, x, range(k - 1, -1, -1)), warmup=1, repeats=args.repeats
    )
    return {"runtime": "eager torch", "precision": "fp32", "steps_timed": k, **_scaled(loop, k)}


def _scaled(t: Any, k: int) -> dict[str, float]:
    s = STEPS / k
    return {"seconds": t.median * s, "p90_seconds": t.p90 * s, "repeats": t.repeats}


def _ours(
    folder: Path, batch: int, file: str, runtime: str, precision: str, args: argparse.Namespace
) -> dict:
    opts = {"device": "cpu", "threads": args.threads, "runtime": runtime, "precision": precision}
    setup = time_fn(lambda _k: open_backend(folder / file, **opts).close(), warmup=0, repeats=1)
    with open_backend(folder / file, **opts) as backend:
        x = torch.randn(batch, *backend.sample_shape)
        t = torch.full((batch,), 500, dtype=torch.int64)
        fwd = time_fn(lambda _k: backend(x, t), repeats=3, warmup=1)
        k = _k_steps(fwd.median, args.budget)
        loop = time_fn(
            lambda _k: ddpm.sample(backend, batch, steps=k, batch=batch, precision=precision),
            warmup=1,
            repeats=args.repeats,
        )
        desc = backend.description
    return {
        "runtime": runtime,
        "precision": precision,
        "description": desc,
        "setup_seconds": setup.median,
        "forward_seconds": fwd.median,
        "steps_timed": k,
        **_scaled(loop, k),
    }


def speed(name: str, folder: Path, args: argparse.Namespace, log) -> list[dict[str, Any]]:
    rows = []
    for batch in args.batches:
        log(f"{name} batch {batch}: eager torch fp32 ...")
        eager = _eager(folder, batch, args)
        group = [eager]
        for file, runtime, precision in _pairs():
            log(f"{name} batch {batch}: {runtime} {precision} ...")
            group.append(_ours(folder, batch, file, runtime, precision, args))
        for r in group:
            r.update(model=name, batch=batch, speedup=eager["seconds"] / r["seconds"])
        ours = [r for r in group if r is not eager]
        min(ours, key=lambda r: r["seconds"])["fastest"] = True
        rows += group
    return rows


def _sample(onnx: Path, n: int, precision: str, args: argparse.Namespace) -> torch.Tensor:
    return ddpm.sample(
        onnx, n, steps=args.quality_steps, batch=min(n, 500), seed=0, device="cpu",
        threads=args.threads, runtime="openvino", precision=precision,
    )  # fmt: skip


def step_errors(onnx: Path, n: int, args: argparse.Namespace) -> list[dict[str, float]]:
    """bf16 vs fp32 model output, relative error (norm), on the states of the fp32 trajectory."""
    opts = {"device": "cpu", "threads": args.threads, "runtime": "openvino"}
    with (
        open_backend(onnx, precision="fp32", **opts) as f32,
        open_backend(onnx, precision="bf16", **opts) as b16,
    ):
        plan = SamplingPlan.for_artifact(f32.meta, SamplingOptions(steps=args.quality_steps))
        every = max(1, plan.steps // 10)
        states: dict[int, torch.Tensor] = {}

        def keep(i: int, x: torch.Tensor) -> None:
            if i > 0 and (i - 1) % every == 0:
                states[i - 1] = x.clone()  # the input of step i - 1

        x = initial_noise(0, (n, *plan.sample_shape))
        states[plan.steps - 1] = x.clone()
        run_reverse(f32, x, plan, on_step=keep)
        out = []
        for i in sorted(states, reverse=True):
            t = torch.full((n,), int(plan.schedule.timesteps[i]), dtype=torch.int64)
            a = f32(states[i], t).clone()
            b = b16(states[i], t)
            out.append({"step": i, "t": int(t[0]), "rel_err": float((b - a).norm() / a.norm())})
    return out


def quality(args: argparse.Namespace, log) -> dict[str, Any]:
    res: dict[str, Any] = {"steps": args.quality_steps}
    if args.swissroll:
        onnx = args.swissroll / "model.onnx"
        log("swiss roll quality ...")
        e = {p: swissroll_energy_check(_sample(onnx, args.swiss_samples, p, args)) for p in ("fp32", "bf16")}
        ratio = e["bf16"]["sample_vs_data"] / e["fp32"]["sample_vs_data"]
        res["swissroll"] = {
            "samples": args.swiss_samples, "fp32": e["fp32"], "bf16": e["bf16"], "ratio": ratio,
            "pass": ratio <= SWISS_BF16_MAX_RATIO, "step_rel_err": step_errors(onnx, 256, args),
        }  # fmt: skip
    if args.digits:
        onnx = args.digits / "model.onnx"
        log("digits quality ...")
        d = {p: digits_classifier_check(_sample(onnx, args.digit_samples, p, args)) for p in ("fp32", "bf16")}
        drop = d["fp32"]["mean_confidence"] - d["bf16"]["mean_confidence"]
        res["digits"] = {
            "samples": args.digit_samples, "fp32": d["fp32"], "bf16": d["bf16"], "confidence_drop": drop,
            "pass": abs(drop) <= DIGITS_MAX_CONFIDENCE_DROP and d["bf16"]["classes_present"] == 10,
            "step_rel_err": step_errors(onnx, 64, args),
        }  # fmt: skip
    return res


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']} ({m['cores']} cores, native bf16 {m['cpu_native_bf16']}), torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}, openvino {m['openvino']}, {report['threads']} thread(s); load average "
        f"{m['load_before']} before, {m['load_after']} after",
        "",
        f"Command: `{report['command']}`",
        "",
        f"End to end, {STEPS}-step DDPM on CPU (loops timed over k steps and scaled to {STEPS} where k < {STEPS}):",
        "",
        "| model | batch | runtime | precision | seconds | p90 | timed over | speed-up vs eager fp32 |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report["speed"]:
        name = f"**{r['runtime']}** (fastest)" if r.get("fastest") else r["runtime"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {name} | {r['precision']} | {r['seconds']:.2f} | "
            f"{r['p90_seconds']:.2f} | {r['steps_timed']} | {r['speedup']:.2f}x |"
        )
    q = report["quality"]
    lines += ["", f"Quality, OpenVINO bf16 vs fp32, {q['steps']} steps, seed 0:", ""]
    if "swissroll" in q:
        s = q["swissroll"]
        lines.append(
            f"- swiss roll ({s['samples']} points): energy distance fp32 {s['fp32']['sample_vs_data']:.6g}, bf16 "
            f"{s['bf16']['sample_vs_data']:.6g} (ratio {s['ratio']:.3f}, pass <= {SWISS_BF16_MAX_RATIO}: "
            f"{'yes' if s['pass'] else '**no**'}; data-vs-data floor {s['fp32']['data_vs_data']:.5f})"
        )
    if "digits" in q:
        d = q["digits"]
        lines.append(
            f"- digits ({d['samples']} samples): confidence fp32 {d['fp32']['mean_confidence']:.5f}, bf16 "
            f"{d['bf16']['mean_confidence']:.5f}, classes {d['bf16']['classes_present']}/10 (pass: drop <= "
            f"{DIGITS_MAX_CONFIDENCE_DROP} and 10 classes: {'yes' if d['pass'] else '**no**'})"
        )
    for key in ("swissroll", "digits"):
        if key in q:
            errs = ", ".join(f"t={e['t']}: {e['rel_err']:.2%}" for e in q[key]["step_rel_err"])
            lines.append(f"- {key}: per-step model output relative error bf16 vs fp32: {errs}")
    return "\n".join(lines) + "\n"


def _machine() -> dict[str, Any]:
    info = bench_machine(torch.device("cpu"))
    info["load_before"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar10", type=Path)
    ap.add_argument("--digits", type=Path)
    ap.add_argument("--swissroll", type=Path)
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 64])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--budget", type=float, default=60.0, help="seconds one timed loop may take before scaling"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quality-steps", type=int, default=STEPS)
    ap.add_argument("--swiss-samples", type=int, default=2000)
    ap.add_argument("--digit-samples", type=int, default=1000)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    machine = _machine()
    speed_rows = []
    for name, folder in (("cifar10", args.cifar10), ("digits", args.digits)):
        if folder is not None:
            speed_rows += speed(name, folder, args, log)
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine,
        "threads": torch.get_num_threads(),
        "speed": speed_rows,
        "quality": {"steps": args.quality_steps} if args.skip_quality else quality(args, log),
    }
    machine["load_after"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    machine["platform"] = platform.platform()
    md = render(report)
    print(md)
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2, default=str) + "\n")
    if args.md:
        write_text_atomic(args.md, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
