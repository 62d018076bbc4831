"""Peak memory of a split `ddpm run` (`--shard K/N`, and torchrun) as --num-samples grows 16x: bounded by the batch.

    python benchmarks/shard_memory.py --out runs/shard_memory --md benchmarks/shard_memory_cpu.md

A random-weight `tiny` UNet at 3x32x32 (12 KB float32 per sample, so 32768 samples are 400 MB of float32 and
100 MB of uint8 npz), exported to ONNX, one DDPM step per sample (the network is not what is measured), batch 256.
Each run is a fresh process; its peak RSS (and, for torchrun, the largest of its processes) comes from GNU time's
%M (wait4's ru_maxrss). If a process held its samples, RSS would grow by ~370 MB from the small run to the large
one; streamed batches keep it flat.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _model(out: Path) -> Path:
    import torch

    from ddpm.checkpoint import save_checkpoint
    from ddpm.export.pipeline import export
    from ddpm.models import build_model, preset_config
    from ddpm.schedule import Schedule

    torch.manual_seed(0)
    net = build_model(preset_config("tiny", in_channels=3, image_size=32))
    meta = {"schedule": Schedule.linear(1000).config, "prediction": "eps", "dataset": "random", "step": 0}
    ckpt = save_checkpoint(out / "tiny32.safetensors", net, meta)
    return export(ckpt, out / "tiny32.onnx").out


def _peak_kib(cmd: list[str]) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return int(r.stderr.strip().splitlines()[-1]), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/shard_memory"))
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--sizes", default="2048,32768")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    onnx = _model(args.out)
    run = [sys.executable, "-m", "ddpm", "run", "--engine", str(onnx), "--sampler", "ddpm", "--steps", "1",
           "--batch", "256", "--threads", "1", "--no-progress"]  # fmt: skip
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2"]
    env_note = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    rows = []
    for m in (int(v) for v in args.sizes.split(",")):
        shard, s1 = _peak_kib(
            [*run, "--num-samples", str(m), "--shard", "0/2", "--npz", str(args.out / f"s{m}.npz")]
        )
        full, s2 = _peak_kib([*torchrun, "-m", "ddpm", *run[3:], "--num-samples", str(m),
                              "--npz", str(args.out / f"t{m}.npz")])  # fmt: skip
        rows.append((m, shard, s1, full, s2))
        print(
            f"M={m}: --shard 0/2 peak {shard / 1024:.0f} MiB ({s1:.1f} s); torchrun x2 peak {full / 1024:.0f} MiB ({s2:.1f} s)"
        )
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), env_note
    )
    lines = [
        "# Peak memory of split sampling as --num-samples grows",
        "",
        f"`python benchmarks/shard_memory.py {' '.join(sys.argv[1:])}` on {cpu} ({os.cpu_count()} cores), CPU only.",
        "Random-weight `tiny` UNet at 3x32x32 (12 KB float32 per sample), ONNX, 1 DDPM step, batch 256, 1 thread.",
        "",
        "| --num-samples | samples as float32 | `--shard 0/2` peak RSS | torchrun (2 ranks) peak RSS of the largest process |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for m, shard, _, full, _ in rows:
        lines.append(
            f"| {m} | {m * 12288 / 2**20:.0f} MiB | {shard / 1024:.0f} MiB | {full / 1024:.0f} MiB |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md is not None:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
