"""``ddpm run``: sample from an exported engine (or a checkpoint) and write a PNG and/or an npz.

The command parses its options, calls one library function (:func:`ddpm.runtime.sampling.sample_run`: the
artifact opened once, the plan built once, the one reverse loop) and writes what it returns.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ddpm.errors import InvalidArgumentError
from ddpm.io import check_writable

if TYPE_CHECKING:
    from ddpm.options import SamplingOptions

__all__ = ["register", "run_command"]


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


def _trajectory_recorder(path: Path | None, every: int | None, cuda_graph: bool):
    """``--trajectory``'s recorder (runtime/trajectory.py), checked before the run; None when the option is off."""
    if path is None:
        if every is not None:
            raise InvalidArgumentError("--every applies to --trajectory PNG only")
        return None
    if Path(path).suffix.lower() != ".png":
        raise InvalidArgumentError(f"--trajectory {str(path)!r} must be a .png file")
    if cuda_graph:  # a replayed graph never calls the Python wrapper that records x and the model output
        raise InvalidArgumentError(
            "--trajectory records every step in Python; it cannot be combined with --cuda-graph"
        )
    check_writable(path, what="--trajectory")
    from .trajectory import TrajectoryRecorder

    return TrajectoryRecorder(every)


def run_command(
    engine: Path,
    options: SamplingOptions,
    *,
    num_samples: int,
    out: Path | None,
    npz: Path | None,
    progress: bool,
    trajectory: Path | None = None,
    every: int | None = None,
    shard: str | None = None,
) -> None:
    """The body of ``ddpm run``: check the outputs, call :func:`sample_run`, write what it returns."""
    # torch (and numpy) load here, not at module import: `ddpm --help` stays fast
    from ddpm.images import save_samples_png

    from .sample_sink import SampleSink, class_extras
    from .sampling import sample_run

    out = _check_outputs(out, npz)
    recorder = _trajectory_recorder(trajectory, every, options.cuda_graph)
    if shard is not None or os.environ.get("WORLD_SIZE", "1") != "1":  # one shard, or torchrun's ranks
        if recorder is not None:
            raise InvalidArgumentError(
                "--trajectory records a single process's run; not with --shard/torchrun"
            )
        from .shard_run import Outputs, run_split

        run_split(engine, shard, num_samples, options, Outputs(npz, out, typer.echo))
        return
    bar = _Progress(progress)

    def on_start(backend, plan, taken) -> None:
        meta = backend.meta
        typer.echo(f"backend: {backend.name} on {backend.device} [{backend.description}]")
        typer.echo(
            f"model: {meta['model']['arch']} {meta['sample_shape']} trained on {meta['dataset']!r} "
            f"(step {meta['step']}); sampling {plan.sampler} {plan.steps}/"
            f"{meta['schedule'].get('timesteps', '?')} steps "
            f"({plan.schedule.config.get('spacing', 'uniform')} spacing), prediction {plan.prediction}"
        )
        if plan.classes is not None:
            cond = backend.meta.get("classes") or {}
            names = cond.get("names") or []
            shown_classes = ",".join(names[c] if c < len(names) else str(c) for c in plan.classes[:16])
            more = ", ..." if len(plan.classes) > 16 else ""
            typer.echo(
                f"classes: {shown_classes}{more} (cycled over the samples), guidance {plan.guidance:g}"
                + (" (one forward of 2N rows per step)" if plan.guided else "")
            )
        if taken:
            shown = " ".join(
                f"--{k} {'inf' if v is None else f'{v:g}' if isinstance(v, float) else v}"
                for k, v in taken.items()
            )
            typer.echo(
                f"defaults from the model (what its training previews used): {shown}; pass them to override"
            )
        sink.open(
            tuple(plan.sample_shape),
            str(getattr(backend, "precision", "fp32")),
            extras=class_extras(plan, 0, num_samples),
        )
        bar.start(-(-num_samples // options.batch) * plan.steps)

    # Batches stream into the npz and the PNG keeps the first few: memory is one batch, not --num-samples.
    # The ExitStack commits the npz only once everything succeeded; on any error its temp file is removed.
    with contextlib.ExitStack() as stack:
        sink = SampleSink(stack, npz, num_samples, png=out is not None)
        try:
            result = sample_run(
                engine,
                num_samples,
                options,
                on_start=on_start,
                on_step=bar.advance,
                model_hook=None if recorder is None else recorder.hook,
                on_batch=sink,
            )
        finally:
            bar.stop()
        shown = sink.preview()
        if out is not None:
            save_samples_png(shown, out, title=f"{shown.shape[0]} samples, {result.steps} steps")
            typer.echo(f"wrote {out}")
    if npz is not None:
        typer.echo(f"wrote {npz}")
    if recorder is not None:
        recorder.save(trajectory)
        typer.echo(f"wrote {trajectory}")
    typer.echo(result.summary())


def register(app: typer.Typer) -> None:
    """Add ``ddpm run`` to the CLI."""

    @app.command("run")
    def run_cmd(
        engine: Annotated[
            Path, typer.Option(help="unet.onnx, unet.trt (+ .json sidecar) or a .safetensors checkpoint")
        ],
        steps: Annotated[
            int | None,
            typer.Option(
                help="sampling steps N <= T (respaced); default: the model's recommendation, else T"
            ),
        ] = None,
        num_samples: Annotated[int, typer.Option(help="how many samples M")] = 64,
        batch: Annotated[int, typer.Option(help="samples per batch B (ceil(M/B) batches)")] = 64,
        seed: Annotated[
            int, typer.Option(help="Philox seed: sample k is the same for any --batch/backend")
        ] = 0,
        sampler: Annotated[
            str | None,
            typer.Option(
                help="ddpm | ddim | dpm++2m | dpm++2m-sde. Measured (benchmarks/solver_cpu.md): dpm++2m at "
                "--steps 20 matches 1000-step ddpm (digits classifier confidence 0.889 vs 0.889; swiss roll at "
                "the data floor) with 50x fewer network calls; at 10 steps quality starts to drop (swiss-roll energy distance "
                "0.0025 vs the floor's -0.001). ddpm at 1000 steps is the reference; dpm++2m-sde (20+ steps) when "
                "stochastic sampling is wanted. Default: the model's recommendation (what its training "
                "previews used, in its metadata), else ddpm."
            ),
        ] = None,
        spacing: Annotated[
            str | None,
            typer.Option(
                help="which --steps timesteps: uniform (keeps 0 and T-1) | trailing | logsnr; default uniform "
                "for ddpm/ddim, trailing for dpm++2m/dpm++2m-sde"
            ),
        ] = None,
        eta: Annotated[float, typer.Option(help="DDIM eta (0 = deterministic, 1 = DDPM-like)")] = 0.0,
        variance: Annotated[
            str | None,
            typer.Option(
                help="DDPM variance: fixed_small | fixed_large | learned_range (models that output it); "
                "default: the model's own"
            ),
        ] = None,
        clip: Annotated[
            str | None,
            typer.Option(
                help="clip predicted x0 to [-C, C]; inf: no clipping; dynamic:RATIO[:MAX]: Imagen's dynamic "
                "thresholding (per sample s = max(1, quantile(|x0|, RATIO)), x0 -> clip(x0, -s, s) / s; helps strong "
                "--guidance). Default: the model's recommendation, 1 for images trained by ddpm, else none"
            ),
        ] = None,
        class_: Annotated[
            str | None,
            typer.Option(
                "--class",
                help="class-conditional models: the class of every sample, or a list cycled over the samples "
                "(sample k gets the (k mod n)-th): numbers or the model's class names, e.g. 7 or 0,1,2 or cat,dog "
                "(`ddpm info` lists them). Default: the null class (unconditional samples)",
            ),
        ] = None,
        class_names: Annotated[
            str | None,
            typer.Option(help="the same as --class, by the model's class names only (e.g. airplane,cat)"),
        ] = None,
        guidance: Annotated[
            float | None,
            typer.Option(
                help="classifier-free guidance scale S: m = m_u + S (m_c - m_u) (diffusers' convention; 1 = plain "
                "conditional, 0 = unconditional). One forward of 2N rows per step, the guidance fused into the "
                "step kernel. Needs a model trained with label dropout (`ddpm train --cond class`)"
            ),
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
        runtime: Annotated[
            str | None, typer.Option(help="ONNX files: onnxruntime (default) | openvino (CPU, fp32/bf16)")
        ] = None,
        precision: Annotated[
            str | None,
            typer.Option(help="network arithmetic: fp32 | bf16 | fp16 (default: the artifact's own, fp32)"),
        ] = None,
        out: Annotated[
            Path | None, typer.Option(help="PNG: image grid / 2-D scatter (default samples.png unless --npz)")
        ] = None,
        npz: Annotated[
            Path | None, typer.Option(help="npz with arr_0: uint8 NHWC images / float32 [M, D]")
        ] = None,
        trajectory: Annotated[
            Path | None,
            typer.Option(help="PNG: x_t and predicted x0 every --every steps for the first 4 samples"),
        ] = None,
        every: Annotated[
            int | None, typer.Option(help="--trajectory column spacing in steps (default: steps // 8)")
        ] = None,
        progress: Annotated[bool, typer.Option(help="show a progress bar on stderr")] = True,
        shard: Annotated[
            str | None,
            typer.Option(
                help="K/N: only shard K of N (a contiguous sample range) into --npz; see ddpm merge"
            ),
        ] = None,
    ) -> None:
        """Sample: x_T from Philox, then m = backend(x, t) and x = fused step(...) for every step (ddpm.reverse)."""
        from ddpm.options import OptionError, SamplingOptions, check_num_samples, cli_classes

        try:
            check_num_samples(num_samples)
        except OptionError as e:
            raise e.for_cli() from None
        options = SamplingOptions.from_cli(
            steps=steps, batch=batch, seed=seed, sampler=sampler, eta=eta, variance=variance, clip=clip,
            kernel=kernel, device=device, compile=compile, cuda_graph=cuda_graph, threads=threads,
            runtime=runtime, precision=precision, spacing=spacing, recommended=True,
            classes=cli_classes(class_, class_names), guidance=guidance,
        )  # fmt: skip
        run_command(
            engine,
            options,
            num_samples=num_samples,
            out=out,
            npz=npz,
            progress=progress and sys.stderr is not None,
            trajectory=trajectory,
            every=every,
            shard=shard,
        )
