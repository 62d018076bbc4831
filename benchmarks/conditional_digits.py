"""A class-conditional digits model: does it draw the class it is asked for, with and without guidance, and does its
unconditional path (the null class) still draw digits as well as an unconditional model?

    python benchmarks/conditional_digits.py --ckpt runs/digits-cond/model.safetensors \
        --uncond runs/digits/model.safetensors --md benchmarks/conditional_cpu.md --png docs/img/cond_grid.png

Samples: DPM-Solver++(2M), 20 steps, clip 1, the fused kernel, 300 per setting (30 per class, classes 0..9 cycled
over the samples), seeds 0 and 1. Scored by the digits classifier (a logistic regression on the real digits,
ddpm.evaluation.metrics): class accuracy = the share classified as the class asked for; confidence = the mean
largest class probability (0.95 on held-out real digits, 0.60 on noise). The grid: 8 samples of each class at the
largest guidance, one row per class.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import ddpm
from ddpm.evaluation.metrics import _digits_classifier, digits_classifier_check
from ddpm.images import save_image_table

N = 300


def _sample(ckpt: Path, seed: int, **kw) -> torch.Tensor:
    return ddpm.sample(ckpt, N, sampler="dpm++2m", steps=20, seed=seed, clip=1.0, device="cpu", **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--uncond", type=Path, required=True)
    ap.add_argument("--guidance", default="1,3")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    clf, _, _ = _digits_classifier()
    asked = np.arange(N) % 10
    lines = [
        "# Class-conditional digits: class accuracy by guidance, and the unconditional path",
        "",
        f"`python benchmarks/conditional_digits.py {' '.join(sys.argv[1:])}`",
        "",
        "DPM-Solver++(2M) 20 steps, clip 1, 300 samples per setting (30 per class), seeds 0 and 1; the digits "
        "classifier of ddpm.evaluation.metrics.",
        "",
        "| sampling | seed | class accuracy | lowest class | per class | confidence |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in (float(v) for v in args.guidance.split(",")):
        for seed in (0, 1):
            x = _sample(args.ckpt, seed, classes=range(10), guidance=s)
            pred = clf.predict(x.clamp(-1, 1).reshape(N, -1).numpy())
            per = [float((pred[asked == k] == k).mean()) for k in range(10)]
            conf = digits_classifier_check(x)["mean_confidence"]
            acc = float((pred == asked).mean())
            lines.append(f"| classes 0..9, guidance {s:g} | {seed} | {acc:.3f} | {min(per):.2f} | "
                         f"{' '.join(f'{p:.2f}' for p in per)} | {conf:.3f} |")  # fmt: skip
            print(lines[-1], flush=True)
    for name, ckpt in (("the null class (no --class)", args.ckpt), ("the unconditional model", args.uncond)):
        for seed in (0, 1):
            r = digits_classifier_check(_sample(ckpt, seed))
            lines.append(f"| {name} | {seed} | | | {r['classes_present']} classes present | "
                         f"{r['mean_confidence']:.3f} |")  # fmt: skip
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.md:
        args.md.write_text(text)
    if args.png:
        s = float(args.guidance.split(",")[-1])
        classes = [k for k in range(10) for _ in range(8)]  # 8 samples of each class, in order
        x = ddpm.sample(args.ckpt, 80, sampler="dpm++2m", steps=20, seed=0, clip=1.0, device="cpu",
                        classes=classes, guidance=s)  # fmt: skip
        save_image_table(x.reshape(10, 8, *x.shape[1:]), args.png, row_labels=[str(k) for k in range(10)],
                         title=f"--class k, --guidance {s:g}: 8 samples per class")  # fmt: skip


if __name__ == "__main__":
    main()
