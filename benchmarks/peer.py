"""The peer, side by side: diffusers' own sampling loop against `ddpm` on the same network, steps, batch and threads.

    python benchmarks/peer.py --out runs/peer --md benchmarks/peer_cpu.md --json benchmarks/peer_cpu.json

The network is the google/ddpm-cifar10-32 geometry (diffusers' UNet2DModel, 35.7M parameters, random weights:
latency does not depend on them), written as a pipeline folder with DDPMPipeline.save_pretrained, then
`ddpm export --ckpt FOLDER --out cifar10.onnx` once. Measured in one process, interleaved (diffusers, then each
ddpm variant, then diffusers again; the diffusers figure is the median of its runs):

- diffusers: ``UNet2DModel.from_pretrained(folder/unet)`` and its scheduler (DDPMScheduler for DDPM-1000,
  DPMSolverMultistepScheduler(dpmsolver++, order 2) for 20 steps), eager, ``torch.no_grad``: the loop a user
  writes (``for t in scheduler.timesteps: x = scheduler.step(unet(x, t).sample, t, x).prev_sample``).
- ddpm: ``ddpm.sample``'s loop (``sample_batch``: the backend's forward + the fused kernel) for every runtime x
  precision this CPU runs: the folder itself in torch (fp32, bf16 autocast where the CPU has native bf16), the
  ONNX export in onnxruntime fp32 and OpenVINO fp32 / bf16. Same x_T, same number of network calls.

Loop times exclude opening the model and its first (warm-up) call (reported apart as setup). DDPM-1000 is timed
over its first --k steps and scaled by 1000 / k (every step costs the same network call and update); DPM-Solver++ runs all 20. The samples of
both sides agree to ~1e-5 relative (tests/test_diffusers_sampling.py), so the quality is the same by construction;
these are speed figures of random weights. The CPU, its bf16 flags, the threads and the load are in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

CIFAR10 = {  # google/ddpm-cifar10-32's unet/config.json
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6, "norm_num_groups": 32, "attention_head_dim": None,
}  # fmt: skip


def _cpu() -> tuple[str, list[str]]:
    text = open("/proc/cpuinfo").read()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return name, [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def _folder(out: Path) -> tuple[Path, Path]:
    import diffusers

    from ddpm.cli import main

    folder, onnx = out / "ddpm-cifar10-32-random", out / "cifar10.onnx"
    if not (folder / "model_index.json").exists():
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(**CIFAR10)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        diffusers.DDPMPipeline(
            unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000)
        ).save_pretrained(folder)
    if not onnx.exists():
        assert main(["export", "--ckpt", str(folder), "--out", str(onnx)]) == 0
    return folder, onnx


def _diffusers_loop(
    folder: Path, sampler: str, steps: int, k: int, batch: int, seed: int
) -> tuple[float, float]:
    """(setup s, loop s for k steps) of diffusers' own loop."""
    import diffusers

    t0 = time.perf_counter()
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    if sampler == "ddpm":
        sched = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    else:
        sched = diffusers.DPMSolverMultistepScheduler.from_pretrained(
            folder / "scheduler", algorithm_type="dpmsolver++", solver_order=2
        )
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    with torch.no_grad():
        unet(x, sched.timesteps[0])  # warm-up call: counted in setup, as on the ddpm side
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for t in sched.timesteps[:k]:
            x = sched.step(unet(x, t).sample, t, x, generator=g).prev_sample
        loop = time.perf_counter() - t0
    return setup, loop


def _ddpm_loop(engine: Path, runtime: str | None, precision: str, sampler: str, steps: int, k: int, batch: int,
               seed: int, threads: int, compile: bool = False) -> tuple[float, float, str]:  # fmt: skip
    """(setup s, loop s for k steps, backend description) of ddpm's loop: the backend + the fused kernel."""
    from ddpm.loop import FiniteWatch, run_reverse
    from ddpm.noise import initial_noise
    from ddpm.options import SamplingOptions
    from ddpm.runtime.sampling import SamplingPlan, open_engine

    opts = SamplingOptions(sampler=sampler, steps=steps, seed=seed, device="cpu", threads=threads, runtime=runtime,
                           precision=precision, compile=compile)  # fmt: skip
    t0 = time.perf_counter()
    with open_engine(engine, opts) as backend:
        plan = SamplingPlan.for_artifact(backend.meta, opts)
        x = initial_noise(seed, (batch, 3, 32, 32))
        with torch.no_grad():
            # warm-up call, counted in setup (OpenVINO compiles per batch size, torch.compile on its first call)
            backend(x, torch.zeros(batch, dtype=torch.int64))
            setup = time.perf_counter() - t0
            t0 = time.perf_counter()
            watch = FiniteWatch(plan.schedule, batch, device=backend.device, stop=steps - k)
            run_reverse(backend, x, plan, stop=steps - k, on_step=watch)
            loop = time.perf_counter() - t0
        return setup, loop, backend.description


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/peer"))
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--k", type=int, default=10, help="DDPM-1000 steps timed (scaled to 1000)")
    ap.add_argument("--repeats", type=int, default=2, help="diffusers runs per case (median)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--samplers", default="dpm++2m-20,ddpm-1000", help="SAMPLER-STEPS, comma-separated")
    ap.add_argument("--compile", action="store_true", help="also the folder through torch.compile (inductor)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    from ddpm.precision import cpu_has_bf16

    folder, onnx = _folder(args.out)
    variants = [
        (folder, None, "fp32", False),
        (onnx, "onnxruntime", "fp32", False),
        (onnx, "openvino", "fp32", False),
    ]
    if args.compile:
        variants.append((folder, None, "fp32", True))
    if cpu_has_bf16():
        variants += [(folder, None, "bf16", False), (onnx, "openvino", "bf16", False)]
    cpu, flags = _cpu()
    load0 = os.getloadavg()
    rows = []
    cases = [(name, int(n)) for name, n in (c.rsplit("-", 1) for c in args.samplers.split(","))]
    for sampler, steps in cases:
        k = steps if steps <= 20 else args.k
        scale = steps / k
        for batch in (int(b) for b in args.batches.split(",")):
            theirs, ours = [], []

            def diffusers_run(
                r: int, sampler=sampler, steps=steps, k=k, batch=batch, scale=scale, theirs=theirs
            ):
                setup, loop = _diffusers_loop(folder, sampler, steps, k, batch, seed=r)
                print(f"{sampler}-{steps} batch {batch}: diffusers {loop * scale:.2f} s (setup {setup:.2f} s)",
                      flush=True)  # fmt: skip
                theirs.append(loop * scale)
                return setup

            their_setup = diffusers_run(0)
            for j, (engine, runtime, precision, compiled) in enumerate(variants):
                if args.repeats > 1 and j == len(variants) // 2:  # interleaved: drift shows in the spread
                    diffusers_run(1)
                setup, loop, desc = _ddpm_loop(
                    engine, runtime, precision, sampler, steps, k, batch, 0, args.threads, compiled
                )
                name = (
                    f"ddpm {runtime or 'torch'}{' compiled' if compiled else ''} {precision} + fused kernel"
                )
                ours.append({"sampler": sampler, "steps": steps, "batch": batch, "who": name, "loop_s": loop * scale,
                             "setup_s": setup, "timed_steps": k, "backend": desc})  # fmt: skip
                print(f"  {name}: {loop * scale:.2f} s (setup {setup:.2f} s)", flush=True)
            for r in range(2, args.repeats):
                diffusers_run(r)
            base = statistics.median(theirs)
            rows.append({"sampler": sampler, "steps": steps, "batch": batch,
                         "who": "diffusers (UNet2DModel + scheduler, eager fp32)", "loop_s": base,
                         "setup_s": their_setup, "speedup": 1.0, "timed_steps": k, "runs": theirs})  # fmt: skip
            rows += [{**o, "speedup": base / o["loop_s"]} for o in ours]
    load1 = os.getloadavg()
    report = {"command": "python " + " ".join(sys.argv), "cpu": cpu, "cpu_flags": flags, "threads": args.threads,
              "torch": torch.__version__, "loadavg_before": load0, "loadavg_after": load1, "rows": rows}  # fmt: skip
    lines = [
        "# diffusers' own loop vs `ddpm` on the same network (google/ddpm-cifar10-32 geometry, random weights)",
        "",
        f"`{report['command']}`",
        "",
        f"CPU: {cpu} ({', '.join(flags)}), {args.threads} threads for every runtime and for diffusers; torch "
        f"{torch.__version__}; load average before {load0[0]:.2f}, after {load1[0]:.2f}. Loop seconds for the whole "
        "sampling run (DDPM-1000 timed over its first "
        f"{args.k} steps and scaled by {1000 // args.k}); setup (opening the model) apart. Speed-up: diffusers' "
        "loop time / this row's. Setup includes the first (warm-up) network call: OpenVINO and torch.compile "
        "compile there. Samples agree to ~1e-5 relative between the two (tests/test_diffusers_sampling.py).",
        "",
        "| sampler | batch | who | loop | speed-up | setup |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['sampler']}-{r['steps']} | {r['batch']} | {r['who']} | {r['loop_s']:.2f} s | "
                     f"{r['speedup']:.2f}x | {r['setup_s']:.2f} s |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
