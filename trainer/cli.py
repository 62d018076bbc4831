"""`ddpm train`. Only typer/stdlib at module level: torch is imported inside the commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]


def train_cmd(
    data: Annotated[str, typer.Option(help="swissroll | digits | mnist:DIR | cifar10:DIR | folder:DIR")],
    out: Annotated[Path, typer.Option(help="run directory; the checkpoint is OUT/model.safetensors")],
    model: Annotated[
        str | None, typer.Option(help="preset: tiny | mnist | cifar10 | mlp [per dataset]")
    ] = None,
    iters: Annotated[int | None, typer.Option(help="total training steps [per dataset]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch size [per dataset]")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW peak learning rate [per dataset]")] = None,
    warmup: Annotated[int, typer.Option(help="linear LR warmup steps")] = 200,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.0,
    grad_clip: Annotated[float, typer.Option(help="clip the gradient norm to this")] = 1.0,
    ema_decay: Annotated[float | None, typer.Option(help="EMA decay of the weights [per dataset]")] = None,
    image_size: Annotated[
        int | None, typer.Option(help="resize images to SxS (folder: centre-crop; default 32)")
    ] = None,
    timesteps: Annotated[int, typer.Option(help="T, diffusion steps of the training schedule")] = 1000,
    schedule: Annotated[str, typer.Option(help="linear | cosine")] = "linear",
    prediction: Annotated[str, typer.Option(help="what the network predicts: eps | x0 | v")] = "eps",
    dropout: Annotated[float | None, typer.Option(help="override the preset's dropout")] = None,
    flip: Annotated[
        bool | None, typer.Option("--flip/--no-flip", help="random horizontal flips [on for cifar10/folder]")
    ] = None,
    save_every: Annotated[
        int, typer.Option(help="also save checkpoint, samples and loss every N steps (0: at the end)")
    ] = 0,
    sample_steps: Annotated[int, typer.Option(help="respaced DDPM steps of the preview sample grid")] = 50,
    num_samples: Annotated[
        int | None,
        typer.Option(help="preview samples: images in the grid [64] or points in the scatter [1000]"),
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
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
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
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        image_size=image_size,
        timesteps=timesteps,
        schedule=schedule,
        prediction=prediction,
        dropout=dropout,
        flip=flip,
        save_every=save_every,
        num_samples=num_samples,
        sample_steps=sample_steps,
        seed=seed,
        device=device,
        threads=threads,
        resume=resume,
        overwrite=overwrite,
        progress=not quiet,
    )
    ckpt = train(cfg, dist_backend=dist_backend)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone wrote the run and reports it
        return
    typer.echo(f"checkpoint: {ckpt}")
    typer.echo(f"samples:    {out / 'samples.png'}")
    typer.echo(f"loss:       {out / 'loss.csv'}, {out / 'loss.png'}")


def register(app: typer.Typer) -> None:
    """Add `train` to the `ddpm` app (`ddpm info` lives in the export CLI and reads checkpoints too)."""
    app.command("train")(train_cmd)
