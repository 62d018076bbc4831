"""A new user's first run on their own images, measured: 200 16x16 PNGs in a folder, `ddpm train --data
folder:DIR --iters 300` with no --model, stderr on a pipe (as under nohup/CI).

Records the preset the run picked, its header, the estimate it printed, the wall time, the longest gap between
two progress lines, the file modes of the run folder, and the samples' digits-classifier confidence (each 16x16
sample averaged to 8x8 grey; the same figure for the real PNGs and for noise gives the scale).

    python benchmarks/first_hour.py --out runs/first_hour --md benchmarks/first_hour_cpu.md \
        --png benchmarks/first_hour_samples.png

Run it on a quiet machine: the time is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def write_pngs(folder: Path, n: int = 200, size: int = 16, seed: int = 0) -> None:
    """n of the 8x8 sklearn digits, upscaled (bicubic) to size x size RGB PNGs: a stand-in for a user's folder."""
    from sklearn.datasets import load_digits

    d = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(np.random.default_rng(seed).choice(len(d.images), n, replace=False)):
        a = (d.images[i] / 16 * 255).astype(np.uint8)
        Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(
            folder / f"{k:03d}.png"
        )


def confidence(x: torch.Tensor) -> float:
    from ddpm.evaluation.metrics import digits_classifier_check

    g8 = F.interpolate(x.mean(1, keepdim=True), size=(8, 8), mode="area")
    return float(digits_classifier_check(g8)["mean_confidence"])


def noise_confidence() -> float:
    from ddpm.evaluation.metrics import digits_classifier_check

    return float(digits_classifier_check(torch.zeros(256, 1, 8, 8))["noise_mean_confidence"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/first_hour"))
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    data, run = args.out / "pngs", args.out / "run"
    write_pngs(data)
    load = os.getloadavg()
    cmd = [sys.executable, "-m", "ddpm.cli", "train", "--data", f"folder:{data}", "--out", str(run)]
    cmd += ["--iters", str(args.iters)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    stamps, lines = [], []
    for line in proc.stderr:  # a pipe: the run logs plain lines
        stamps.append(time.monotonic() - t0)
        lines.append(line.rstrip("\n"))
    proc.wait()
    wall = time.monotonic() - t0
    if proc.returncode:
        sys.exit(f"train failed ({proc.returncode}):\n" + "\n".join(lines[-20:]))
    progress = [s for s, line in zip(stamps, lines, strict=True) if line.startswith("step ")]
    gaps = np.diff([0.0, *progress]) if progress else np.array([wall])

    import ddpm
    from ddpm.trainer.data import load_dataset

    torch.set_num_threads(1)
    samples = ddpm.sample(run / "model.safetensors", 256, steps=50, clip=1.0, device="cpu")
    real = load_dataset(f"folder:{data}").batch(torch.arange(200))
    modes = sorted({oct(p.stat().st_mode & 0o777) for p in run.rglob("*") if p.is_file()})
    header = [line for line in lines if not line.startswith("step ")]
    facts = {
        "command": " ".join(["ddpm", *cmd[3:]]),
        "wall_seconds": round(wall, 1),
        "load_average_before": [round(v, 2) for v in load],
        "progress_lines": len(progress),
        "longest_gap_between_progress_lines_s": round(float(gaps.max()), 1),
        "file_modes": modes,
        # noise: the metric's own reference, uniform noise 8x8 images
        "confidence": {"samples": confidence(samples), "real": confidence(real), "noise": noise_confidence()},
        "stderr_header": header,
    }
    print(json.dumps(facts, indent=2))
    if args.png:
        shutil.copyfile(run / "samples.png", args.png)
    if args.md:
        c = facts["confidence"]
        args.md.write_text(
            "# First run on a folder of 200 16x16 PNGs (CPU)\n\n"
            f"Command: `python benchmarks/first_hour.py --out {args.out} --md {args.md}"
            + (f" --png {args.png}" if args.png else "")
            + "`\n\n"
            f"It runs `{facts['command']}` with stderr on a pipe. Load average before: {load[0]:.2f}, "
            f"{load[1]:.2f}, {load[2]:.2f} on {os.cpu_count()} cores.\n\n"
            f"- wall time, 300 steps + preview + saving: **{wall:.0f} s**\n"
            f"- progress lines: {len(progress)}, longest gap {gaps.max():.1f} s\n"
            f"- file modes in the run folder: {', '.join(modes)}\n"
            f"- digits-classifier confidence (16x16 -> 8x8 grey): samples {c['samples']:.3f}, the real PNGs "
            f"{c['real']:.3f}, uniform-noise 8x8 images {c['noise']:.3f}\n\n"
            "What the run printed before its progress lines:\n\n```\n" + "\n".join(header) + "\n```\n"
        )


if __name__ == "__main__":
    main()
