"""`ddpm bench`: per-stage latency of engines against eager PyTorch (see bench/run.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ddpm.cliutil import invocation, parse_int_list
from ddpm.io import check_writable, write_text_atomic


def _names(text: str | None) -> list[str] | None:
    """'openvino, onnxruntime' -> ['openvino', 'onnxruntime']; None stays None (every one available)."""
    if text is None:
        return None
    return [n.strip().lower() for n in text.split(",") if n.strip()]


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        engine: Annotated[
            list[Path], typer.Option(help="checkpoint / ONNX / TensorRT engine; repeat for several")
        ],
        batch: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,64",
        steps: Annotated[int | None, typer.Option(help="loop length (default: the model's T)")] = None,
        sampler: Annotated[
            str,
            typer.Option(
                help="the engine loop's sampler: ddpm | ddim | dpm++2m | dpm++2m-sde (baseline: DDPM)"
            ),
        ] = "ddpm",
        device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
        ckpt: Annotated[
            Path | None,
            typer.Option(
                help="checkpoint for the eager baseline (default: the engine's "
                "architecture with random weights)"
            ),
        ] = None,
        repeats: Annotated[int, typer.Option(help="timed repeats per forward measurement")] = 20,
        loop_budget: Annotated[
            float,
            typer.Option(
                help="seconds a loop measurement may take before it is timed over fewer steps and scaled"
            ),
        ] = 20.0,
        cuda_graph: Annotated[
            bool, typer.Option("--cuda-graph", help="GPU: replay the loop as one CUDA graph")
        ] = False,
        threads: Annotated[
            int | None,
            typer.Option(
                help="CPU threads for every runtime and the eager baseline (default: the cores this process may use)"
            ),
        ] = None,
        runtime: Annotated[
            str | None,
            typer.Option(
                help="comma-separated runtimes to compare (default: every one that runs the engine)"
            ),
        ] = None,
        precision: Annotated[
            str | None,
            typer.Option(
                help="comma-separated precisions fp32,bf16,fp16 (default: every one supported here)"
            ),
        ] = None,
        json_out: Annotated[Path | None, typer.Option("--json", help="write every figure as JSON")] = None,
        md_out: Annotated[Path | None, typer.Option("--md", help="write the markdown table")] = None,
        plot: Annotated[Path | None, typer.Option(help="bar plot of speed-ups (PNG)")] = None,
        progress: Annotated[bool, typer.Option(help="say on stderr what is being measured")] = True,
        class_: Annotated[
            str | None,
            typer.Option("--class", help="class-conditional engines: the classes, as for ddpm run"),
        ] = None,
        guidance: Annotated[
            float | None,
            typer.Option(
                help="classifier-free guidance scale S: every stage runs the guided (2N-row) forward"
            ),
        ] = None,
    ) -> None:
        """Latency per stage (forward, update, loop), samples/s and peak memory vs eager PyTorch, with floors;
        the targets' verdict is withheld when the machine was too busy to trust."""
        # torch loads with the bench modules, here and not at import: `ddpm --help` stays fast
        from .config import BenchConfig
        from .run import plot_report, render_markdown, run_bench, verdict_line

        for p, what in ((json_out, "--json"), (md_out, "--md"), (plot, "--plot")):
            if p is not None:
                check_writable(p, what=what)
        cfg = BenchConfig(
            engines=list(engine),
            batches=parse_int_list(batch, option="--batch"),
            steps=steps,
            sampler=sampler,
            device=device,
            ckpt=ckpt,
            repeats=repeats,
            loop_budget_s=loop_budget,
            cuda_graph=cuda_graph,
            threads=threads,
            command=invocation(),
            runtimes=_names(runtime),
            precisions=_names(precision),
            classes=class_,
            guidance=guidance,
        )
        report = run_bench(cfg, log=lambda s: typer.echo(s, err=True) if progress else None)
        md = render_markdown(report)
        typer.echo(md)
        typer.echo(verdict_line(report), err=True)  # also where a script piping stdout away still sees it
        if json_out is not None:
            write_text_atomic(json_out, json.dumps(report, indent=2, default=str) + "\n")
        if md_out is not None:
            write_text_atomic(md_out, md)
        if plot is not None:
            plot_report(report, plot)
