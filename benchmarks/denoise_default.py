"""`ddpm denoise --noisy` with its defaults against the old default (stochastic DDPM over all t+1 steps), on the
300 digits held out from the digits classifier: classifier accuracy and MSE to the clean digit, beside the noisy
input's and the Bayes ceiling (the best any function of x_t can do).

    python benchmarks/denoise_default.py --ckpt runs/acc/digits/model.safetensors --md benchmarks/denoise_cpu.md

The digits model is `ddpm train --data digits --seed 0` (the README's table); the noise is seed 0 throughout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ddpm.evaluation.metrics import _digits_classifier
from ddpm.metadata import schedule_from_meta
from ddpm.runtime.backends import open_backend
from ddpm.runtime.img2img import denoise_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_img2img import _bayes_accuracy  # noqa: E402  (the ceiling's one implementation)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--t", default="300,500")
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    clf, x_test, y_test = _digits_classifier()
    x = torch.from_numpy(x_test.reshape(-1, 1, 8, 8).astype(np.float32))

    def acc(images: torch.Tensor) -> float:
        return float((clf.predict(images.clamp(-1, 1).reshape(len(images), -1).numpy()) == y_test).mean())

    def mse(images: torch.Tensor) -> float:
        return float((images.clamp(-1, 1) - x).pow(2).mean())

    rows = []
    with open_backend(args.ckpt, device="cpu", threads=1) as b:
        ab = schedule_from_meta(b.meta).alphas_cumprod
        for t in (int(v) for v in args.t.split(",")):
            noisy = denoise_run(
                b, x, t, seed=0, steps=1, sampler="ddim"
            ).noisy  # x_t of seed 0 (SDEdit's eps)
            default = denoise_run(b, noisy, t, add_noise=False, seed=0)
            ddpm_all = denoise_run(b, noisy, t, add_noise=False, seed=0, sampler="ddpm")
            best = _bayes_accuracy(noisy, float(ab[t]), y_test)
            rows.append((t, acc(noisy), acc(default.denoised), acc(ddpm_all.denoised), best, mse(noisy),
                         mse(default.denoised), mse(ddpm_all.denoised), default.steps, ddpm_all.steps))  # fmt: skip
            print(rows[-1])
    lines = [
        "# `ddpm denoise --noisy`: the default (DDIM, <= 50 steps) against stochastic DDPM over all t+1 steps",
        "",
        f"`python benchmarks/denoise_default.py {' '.join(sys.argv[1:])}`; 300 held-out digits, noise seed 0.",
        "",
        "| t | accuracy: noisy x_t | default (ddim) | ddpm, all t+1 steps | Bayes ceiling | MSE: noisy | default | ddpm |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t, an, ad, ap_, best, mn, md, mp, _, _ in rows:
        lines.append(
            f"| {t} | {an:.3f} | {ad:.3f} | {ap_:.3f} | {best:.3f} | {mn:.3f} | {md:.3f} | {mp:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md is not None:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
