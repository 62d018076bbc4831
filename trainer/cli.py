"""`ddpm train`. Only typer/stdlib at module level: torch is imported inside the commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .presets import defaults_help, preset_rule

__all__ = ["register"]

RULE = preset_rule()
DEFAULTS = defaults_help()


def train_cmd(
    data: Annotated[str, typer.Option(help="swissroll | digits | mnist:DIR | cifar10:DIR | folder:DIR")],
    out: Annotated[Path, typer.Option(help="run directory; the checkpoint is OUT/model.safetensors")],
    model: Annotated[
        str | None,
        typer.Option(
            help=f"preset: tiny | small | mnist | cifar10 | mlp. Default from the data and device: {RULE}"
        ),
    ] = None,
    iters: Annotated[
        int | None, typer.Option(help="total training steps (default: the preset's, listed above)")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="batch size of one step, over all ranks (default: the preset's)")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW peak learning rate (default: the preset's)")] = None,
    warmup: Annotated[
        int | None, typer.Option(help="linear LR warm-up steps (default: min(200, iters/5))")
    ] = None,
    lr_schedule: Annotated[
        str, typer.Option(help="after warm-up: constant (Ho et al.) | cosine (decays to 0 at the last step)")
    ] = "constant",
    grad_accum: Annotated[
        int,
        typer.Option(
            help="split each batch into N micro-batches: the same step with 1/N of the activation memory"
        ),
    ] = 1,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.0,
    grad_clip: Annotated[float, typer.Option(help="clip the gradient norm to this")] = 1.0,
    ema_decay: Annotated[
        float | None,
        typer.Option(
            help="EMA decay of the weights (default: the preset's); ramped as min(decay, (1+k)/(10+k)) at step k"
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="resize images to SxS (folder: centre-crop; default: the images' own size, at most 64)"
        ),
    ] = None,
    timesteps: Annotated[int, typer.Option(help="T, diffusion steps of the training schedule")] = 1000,
    schedule: Annotated[str, typer.Option(help="linear | cosine")] = "linear",
    prediction: Annotated[str, typer.Option(help="what the network predicts: eps | x0 | v")] = "eps",
    dropout: Annotated[float | None, typer.Option(help="override the preset's dropout")] = None,
    cond: Annotated[
        str,
        typer.Option(
            help="class: a class-conditional model on the data's labels (digits, mnist:DIR with its label file, "
            "cifar10:DIR, folder:DIR with one sub-folder per class); none: unconditional"
        ),
    ] = "none",
    p_uncond: Annotated[
        float,
        typer.Option(
            help="with --cond class: label dropout, the share of labels replaced by the null class (what "
            "classifier-free guidance needs)"
        ),
    ] = 0.1,
    flip: Annotated[
        bool | None,
        typer.Option(
            "--flip/--no-flip", help="random horizontal flips (default: on for cifar10, off otherwise)"
        ),
    ] = None,
    save_every: Annotated[
        int, typer.Option(help="also save checkpoint, samples and loss every N steps (0: at the end)")
    ] = 0,
    sample_steps: Annotated[
        int, typer.Option(help="DPM-Solver++(2M) steps of the preview (recorded as `ddpm run`'s default)")
    ] = 20,
    num_samples: Annotated[
        int | None,
        typer.Option(
            "--preview-samples",
            "--num-samples",
            help="preview samples: images in the grid (default: up to 64, as many as fit ~15 s on this device) "
            "or points in the scatter [1000]; 0: no previews",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="seed of weights, batches and noise (CPU runs are reproducible)")
    ] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (bf16 autocast on cuda)")] = "auto",
    resume: Annotated[bool, typer.Option(help="continue exactly from OUT/train_state.pt")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="replace the run already in OUT (refused without this or --resume)")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch [torch's default]")] = None,
    progress: Annotated[
        bool,
        typer.Option(
            help="header, estimate and progress on stderr: a bar on a terminal, else a line every 10 s "
            "(DDPM_PROGRESS_INTERVAL)"
        ),
    ] = True,
    log_dir: Annotated[
        Path | None,
        typer.Option(help="TensorBoard: loss, lr, grad norm, sample grids (pip install tensorboard)"),
    ] = None,
    dist_backend: Annotated[
        str | None,
        typer.Option(help="under torchrun: nccl | gloo (default: nccl on cuda, gloo on cpu)"),
    ] = None,
) -> None:
    """Train a DDPM denoiser (Algorithm 1) and write OUT/model.safetensors, samples.png and loss.csv/png."""
    from .train import TrainConfig, train

    cfg = TrainConfig(
        data=data,
        out=out,
        model=model,
        iters=iters,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        lr_schedule=lr_schedule,
        grad_accum=grad_accum,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        image_size=image_size,
        timesteps=timesteps,
        schedule=schedule,
        prediction=prediction,
        dropout=dropout,
        cond=None if cond.strip().lower() == "none" else cond.strip().lower(),
        p_uncond=p_uncond,
        flip=flip,
        save_every=save_every,
        num_samples=num_samples,
        sample_steps=sample_steps,
        seed=seed,
        device=device,
        threads=threads,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        log_dir=log_dir,
    )
    ckpt = train(cfg, dist_backend=dist_backend)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone wrote the run and reports it
        return
    typer.echo(f"checkpoint: {ckpt}")
    typer.echo(f"samples:    {out / 'samples.png'}")
    typer.echo(f"loss:       {out / 'loss.csv'}, {out / 'loss.png'}")


train_cmd.__doc__ = (
    "Train a DDPM denoiser (Algorithm 1) and write OUT/model.safetensors, samples.png and loss.csv/png.\n\n"
    f"Presets and the defaults each brings (an option given here wins): {DEFAULTS}. "
    "The run prints every setting and where it came from, then the measured time per step with the estimated "
    "total time, memory and disk."
)


def register(app: typer.Typer) -> None:
    """Add `train` to the `ddpm` app (`ddpm info` lives in the export CLI and reads checkpoints too)."""
    app.command("train")(train_cmd)
