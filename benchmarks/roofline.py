"""How close the peer's forward already is to this CPU's fp32 peak: the bound on any fp32 speed-up over diffusers.

    python benchmarks/roofline.py --out runs/peer --md benchmarks/roofline_cpu.md --json benchmarks/roofline_cpu.json

The network is benchmarks/peer.py's (the google/ddpm-cifar10-32 geometry, random weights; the same folder and
ONNX export, made there if missing). Measured in one process, threads as given (default: the usable cores):

- the forward's floating-point work, counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
  matrix products; normalisation, activations and softmax are not counted, so every rate below is a lower bound
  on the work done);
- the CPU's fp32 rates that bound any direct-convolution runtime: a 2048^3 matrix product and the network's
  most common convolution (128 -> 128 channels, 3x3, 32x32, this batch) in torch (oneDNN), best of the two;
- the same forward in diffusers (eager, as a user calls it), onnxruntime fp32 and OpenVINO fp32 (our export).

A DPM-Solver++ loop is 20 such forwards plus updates that cost well under 1% of them, so the loop speed-up of a
runtime over diffusers is at most (its forward rate) / (diffusers' forward rate), and every fp32 runtime that
computes the convolutions directly is bounded by peak / (diffusers' rate). Only an algorithm that does less
arithmetic (Winograd or FFT convolutions, or lower precision: bf16 where the CPU has it) can go past it.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import _cpu, _folder  # noqa: E402


def _median_s(fn, repeat: int) -> float:
    fn()
    fn()  # warm: allocators, kernel choice
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(out: Path, batch: int, threads: int, repeat: int) -> dict:
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm.runtime.backends import open_backend

    torch.set_num_threads(threads)
    folder, onnx = _folder(out)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    x, t = torch.randn(batch, 3, 32, 32), torch.full((batch,), 500, dtype=torch.int64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t)
    flops = counter.get_total_flops()
    rates: dict[str, float] = {}
    with torch.no_grad():
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        rates["peak: sgemm 2048^3 (torch)"] = 2 * 2048**3 / _median_s(lambda: a @ b, repeat)
        conv = torch.nn.Conv2d(128, 128, 3, padding=1).eval()
        xc = torch.randn(batch, 128, 32, 32)
        work = 2 * batch * 128 * 128 * 9 * 32 * 32
        rates["peak: conv 128->128 3x3 at 32x32 (torch)"] = work / _median_s(lambda: conv(xc), repeat)
        forward = {"diffusers UNet2DModel, eager fp32": _median_s(lambda: unet(x, t).sample, repeat)}
    for runtime in ("onnxruntime", "openvino"):
        with open_backend(onnx, device="cpu", runtime=runtime, threads=threads) as backend:
            forward[f"ddpm {runtime} fp32"] = _median_s(lambda backend=backend: backend(x, t), repeat)
    peak = max(v for k, v in rates.items() if k.startswith("peak"))
    base = forward["diffusers UNet2DModel, eager fp32"]
    name, flags = _cpu()
    return {
        "machine": {
            "cpu": name,
            "flags": flags,
            "threads": threads,
            "torch": torch.__version__,
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "command": "python " + " ".join(sys.argv),
        },
        "batch": batch,
        "forward_gflop": round(flops / 1e9, 2),
        "peak_gflops": {k: round(v / 1e9, 1) for k, v in rates.items()},
        "forward": {
            k: {
                "ms": round(1000 * s, 1),
                "gflops": round(flops / s / 1e9, 1),
                "of_peak": round(flops / s / peak, 3),
                "vs_diffusers": round(base / s, 3),
            }
            for k, s in forward.items()
        },
        "bound_vs_diffusers": round(peak / (flops / base), 3),
    }


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Roofline: the peer's network against this CPU's fp32 peak",
        "",
        f"`{m['command']}`",
        "",
        f"CPU: {m['cpu']} ({', '.join(m['flags'])}), {m['threads']} threads; torch {m['torch']}; load average "
        f"{m['load_average']}. Network: google/ddpm-cifar10-32 geometry, batch {r['batch']}: "
        f"{r['forward_gflop']} GFLOP per forward (convolutions and matrix products only).",
        "",
        "| what | ms | GFLOP/s | of peak | vs diffusers |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for k, v in r["peak_gflops"].items():
        lines.append(f"| {k} | | {v} | | |")
    for k, v in r["forward"].items():
        lines.append(
            f"| forward: {k} | {v['ms']} | {v['gflops']} | {v['of_peak']:.0%} | {v['vs_diffusers']}x |"
        )
    lines += [
        "",
        f"diffusers' eager forward already runs at {r['forward']['diffusers UNet2DModel, eager fp32']['of_peak']:.0%} "
        f"of the best fp32 rate measured here, so no fp32 runtime that computes the convolutions directly can "
        f"make its loop more than **{r['bound_vs_diffusers']}x** faster on this CPU (and only by running every "
        "layer, normalisations and attention included, at that peak). bf16 (where the CPU has it) halves the "
        "arithmetic's cost: benchmarks/peer_cpu.md.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/peer"), help="peer.py's folder (made if missing)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    args = p.parse_args()
    result = measure(args.out, args.batch, args.threads, args.repeat)
    text = markdown(result)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.md is not None:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
