"""``ddpm run``: sample from an exported engine (or a checkpoint) and write a PNG and/or an npz.

The command parses its options, calls one library function (:func:`ddpm.runtime.sampling.sample_run`: the
artifact opened once, the plan built once, the one reverse loop) and writes what it returns.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ddpm.errors import InvalidArgumentError
from ddpm.io import atomic_path, check_writable

__all__ = ["register", "run_command", "save_npz"]


def save_npz(samples, path: str | os.PathLike) -> Path:
    """Write samples as ``arr_0`` in an npz, atomically: uint8 [M, H, W, C] for images (improved-diffusion /
    guided-diffusion's layout, what FID tools read), float32 [M, D] for vectors such as 2-D points."""
    import numpy as np

    from ddpm.images import to_uint8_nhwc  # numpy at import: kept out of `ddpm --help`

    arr = to_uint8_nhwc(samples) if samples.dim() == 4 else samples.detach().to("cpu").float().numpy()
    with atomic_path(path, what="--npz") as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, arr_0=np.ascontiguousarray(arr))
    return Path(path)


class _Progress:
    """A rich progress bar on stderr with steps/s, started once the run's length is known (``start``)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar, self.task = enabled, None, None

    def start(self, total: int) -> None:
        if not self.enabled:
            return
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

        self.bar = Progress(
            TextColumn("sampling"),
            BarColumn(),
            MofNCompleteColumn(),
            StepRate(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task("sampling", total=total)
        self.bar.start()

    def advance(self, k: int) -> None:  # host-side bookkeeping only: no device sync
        if self.bar is not None:
            self.bar.advance(self.task, k)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _check_outputs(out: Path | None, npz: Path | None) -> Path | None:
    """The output paths, checked before the (long) run: no sampling only to fail at the write."""
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
    return out


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
    """The body of ``ddpm run``: check the outputs, call :func:`sample_run`, write what it returns."""
    # torch (and numpy) load here, not at module import: `ddpm --help` stays fast
    from ddpm.images import save_samples_png

    from .sampling import sample_run

    out = _check_outputs(out, npz)
    # the options' own names in the message (the library says num_samples / batch)
    if num_samples < 1:
        raise InvalidArgumentError(f"--num-samples must be >= 1, got {num_samples}")
    if batch < 1:
        raise InvalidArgumentError(f"--batch must be >= 1, got {batch}")
    bar = _Progress(progress)

    def on_start(backend, plan) -> None:
        meta = backend.meta
        typer.echo(f"backend: {backend.name} on {backend.device} [{backend.description}]")
        typer.echo(
            f"model: {meta['model']['arch']} {meta['sample_shape']} trained on {meta['dataset']!r} "
            f"(step {meta['step']}); sampling {plan.sampler} {plan.steps}/"
            f"{meta['schedule'].get('timesteps', '?')} steps, prediction {plan.prediction}"
        )
        bar.start(-(-num_samples // batch) * plan.steps)

    try:
        result = sample_run(
            engine,
            num_samples,
            steps=steps,
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
            on_start=on_start,
            on_step=bar.advance,
        )
    finally:
        bar.stop()
    title = f"{result.samples.shape[0]} samples, {result.steps} steps"
    if out is not None:
        save_samples_png(result.samples, out, title=title)
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
        sampler: Annotated[
            str, typer.Option(help="ddpm | ddim | dpm++2m | dpm++2m-sde (any name ddpm.Sampler accepts)")
        ] = "ddpm",
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
        """Sample: x_T from Philox, then m = backend(x, t) and x = fused step(...) for every step (ddpm.reverse)."""
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
