"""`ddpm bench`: per-stage latency of engines against eager PyTorch (see runtime/bench.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        engine: Annotated[
            list[Path], typer.Option(help="checkpoint / ONNX / TensorRT engine; repeat for several")
        ],
        batch: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,64",
        steps: Annotated[int | None, typer.Option(help="loop length (default: the model's T)")] = None,
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
        threads: Annotated[int | None, typer.Option(help="CPU threads for torch and onnxruntime")] = None,
        json_out: Annotated[Path | None, typer.Option("--json", help="write every figure as JSON")] = None,
        md_out: Annotated[Path | None, typer.Option("--md", help="write the markdown table")] = None,
        plot: Annotated[Path | None, typer.Option(help="bar plot of speed-ups (PNG)")] = None,
    ) -> None:
        """Latency per stage (forward, update, loop), samples/s and peak memory vs eager PyTorch, with floors."""
        import json

        from .bench import BenchConfig, parse_batches, plot_report, render_markdown, run_bench
        from ddpm.cliutil import invocation
        from ddpm.errors import InvalidArgumentError
        from ddpm.io import check_writable, write_text_atomic

        if steps is not None and steps < 1:
            raise InvalidArgumentError(f"--steps must be an integer >= 1, got {steps}")
        if repeats < 3:
            raise InvalidArgumentError(f"--repeats must be >= 3, got {repeats}")
        for p, what in ((json_out, "--json"), (md_out, "--md"), (plot, "--plot")):
            if p is not None:
                check_writable(p, what=what)
        cfg = BenchConfig(
            engines=list(engine),
            batches=parse_batches(batch),
            steps=steps,
            device=device,
            ckpt=ckpt,
            repeats=repeats,
            loop_budget_s=loop_budget,
            cuda_graph=cuda_graph,
            threads=threads,
            command=invocation(),
        )
        report = run_bench(cfg, log=lambda s: typer.echo(s, err=True))
        md = render_markdown(report)
        typer.echo(md)
        if json_out is not None:
            write_text_atomic(json_out, json.dumps(report, indent=2, default=str) + "\n")
        if md_out is not None:
            write_text_atomic(md_out, md)
        if plot is not None:
            plot_report(report, plot)
