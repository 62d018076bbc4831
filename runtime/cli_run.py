"""``ddpm run``: sample from an exported engine (or a checkpoint) and write a PNG and/or an npz.

Only typer and the standard library at module level: torch, onnxruntime and tensorrt load inside the command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register", "run_command", "save_npz"]


def save_npz(samples, path: str | os.PathLike) -> Path:
    """Write samples as ``arr_0`` in an npz, atomically: uint8 [M, H, W, C] for images (improved-diffusion /
    guided-diffusion's layout, what FID tools read), float32 [M, D] for vectors such as 2-D points."""
    import numpy as np

    from ddpm.images import to_uint8_nhwc
    from ddpm.io import atomic_path

    arr = to_uint8_nhwc(samples) if samples.dim() == 4 else samples.detach().to("cpu").float().numpy()
    with atomic_path(path, what="--npz") as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, arr_0=np.ascontiguousarray(arr))
    return Path(path)


def _progress(total: int, enabled: bool):
    """A rich progress bar on stderr with steps/s; returns (context manager, on_step callback)."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(), None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class StepRate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} steps/s" if task.speed else "")

    progress = Progress(
        TextColumn("sampling"),
        BarColumn(),
        MofNCompleteColumn(),
        StepRate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    task = progress.add_task("sampling", total=total)

    def on_step(k: int) -> None:  # host-side bookkeeping only: no device sync
        progress.advance(task, k)

    return progress, on_step


def run_command(
    engine: Path,
    *,
    steps: int | None,
    num_samples: int,
    batch: int,
    seed: int,
    sampler: str,
    eta: float,
    variance: str,
    clip: float | None,
    kernel: str,
    device: str,
    compile: bool,
    cuda_graph: bool,
    threads: int | None,
    out: Path | None,
    npz: Path | None,
    progress: bool,
) -> None:
    """The body of ``ddpm run`` (a library call the CLI and scripts share)."""
    from .backends import open_backend
    from ddpm.errors import InvalidArgumentError
    from ddpm.images import save_samples_png
    from ddpm.io import check_writable
    from .sampling import SamplingPlan, run_batches
    from ddpm.diffusion import check_clip

    # Everything checkable before the (long) run is checked first: no sampling only to fail at the write.
    if out is None and npz is None:
        out = Path("samples.png")
    if out is not None:
        if Path(out).suffix.lower() != ".png":
            raise InvalidArgumentError(f"--out {str(out)!r} must be a .png file (use --npz for arrays)")
        check_writable(out, what="--out")
    if npz is not None:
        if Path(npz).suffix.lower() != ".npz":
            raise InvalidArgumentError(f"--npz {str(npz)!r} must end in .npz")
        check_writable(npz, what="--npz")
    if num_samples < 1:
        raise InvalidArgumentError(f"--num-samples must be >= 1, got {num_samples}")
    if batch < 1:
        raise InvalidArgumentError(f"--batch must be >= 1, got {batch}")
    check_clip(clip)

    with open_backend(
        engine, device=device, compile=compile, threads=threads, cuda_graph=cuda_graph
    ) as backend:
        plan = SamplingPlan.create(
            backend.meta,
            steps=steps,
            sampler=sampler,
            eta=eta,
            variance=variance,
            clip=clip,
            seed=seed,
            kernel=kernel,
        )
        typer.echo(f"backend: {backend.name} on {backend.device} [{backend.description}]")
        typer.echo(
            f"model: {backend.meta['model']['arch']} {backend.meta['sample_shape']} trained on "
            f"{backend.meta['dataset']!r} (step {backend.meta['step']}); sampling {plan.sampler} "
            f"{plan.steps}/{backend.meta['schedule'].get('timesteps', '?')} steps, prediction {plan.prediction}"
        )
        batches = -(-num_samples // batch)
        bar, on_step = _progress(batches * plan.steps, progress)
        with bar:
            result = run_batches(backend, plan, num_samples, batch, cuda_graph=cuda_graph, on_step=on_step)
    if out is not None:
        save_samples_png(result.samples, out, title=f"{result.samples.shape[0]} samples, {plan.steps} steps")
        typer.echo(f"wrote {out}")
    if npz is not None:
        save_npz(result.samples, npz)
        typer.echo(f"wrote {npz}")
    typer.echo(result.summary())


def register(app: typer.Typer) -> None:
    """Add ``ddpm run`` to the CLI."""

    @app.command("run")
    def run_cmd(
        engine: Annotated[
            Path, typer.Option(help="unet.onnx, unet.trt (+ .json sidecar) or a .safetensors checkpoint")
        ],
        steps: Annotated[int | None, typer.Option(help="sampling steps N <= T (respaced); default T")] = None,
        num_samples: Annotated[int, typer.Option(help="how many samples M")] = 64,
        batch: Annotated[int, typer.Option(help="samples per batch B (ceil(M/B) batches)")] = 64,
        seed: Annotated[
            int, typer.Option(help="Philox seed: sample k is the same for any --batch/backend")
        ] = 0,
        sampler: Annotated[str, typer.Option(help="ddpm | ddim")] = "ddpm",
        eta: Annotated[float, typer.Option(help="DDIM eta (0 = deterministic, 1 = DDPM-like)")] = 0.0,
        variance: Annotated[
            str, typer.Option(help="DDPM variance: fixed_small | fixed_large")
        ] = "fixed_small",
        clip: Annotated[
            float | None, typer.Option(help="clip predicted x0 to [-C, C] (default: no clipping)")
        ] = None,
        kernel: Annotated[
            str, typer.Option(help="fused (C++/CUDA kernel) | reference (plain torch step)")
        ] = "fused",
        device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
        compile: Annotated[
            bool, typer.Option("--compile", help="torch backend: torch.compile the model")
        ] = False,
        cuda_graph: Annotated[
            bool, typer.Option("--cuda-graph", help="GPU: replay one captured step")
        ] = False,
        threads: Annotated[
            int | None, typer.Option(help="CPU inference threads (default: all available)")
        ] = None,
        out: Annotated[
            Path | None, typer.Option(help="PNG: image grid / 2-D scatter (default samples.png unless --npz)")
        ] = None,
        npz: Annotated[
            Path | None, typer.Option(help="npz with arr_0: uint8 NHWC images / float32 [M, D]")
        ] = None,
        progress: Annotated[bool, typer.Option(help="show a progress bar on stderr")] = True,
    ) -> None:
        """Sample: x_T from Philox, then m = backend(x, t) and x = fused_step(...) for every step."""
        run_command(
            engine,
            steps=steps,
            num_samples=num_samples,
            batch=batch,
            seed=seed,
            sampler=sampler,
            eta=eta,
            variance=variance,
            clip=clip,
            kernel=kernel,
            device=device,
            compile=compile,
            cuda_graph=cuda_graph,
            threads=threads,
            out=out,
            npz=npz,
            progress=progress and sys.stderr is not None,
        )
