"""``ddpm export``, ``ddpm info`` and ``ddpm import``. Only typer and the standard library load with this module: the library
functions are reached through ``ddpm.export``'s lazy names when a command runs, so torch, onnx and tensorrt
load then and ``ddpm --help`` stays fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

import ddpm.export as api

__all__ = ["register"]


def export_cmd(
    out: Annotated[
        Path,
        typer.Option(help="unet.onnx (ONNX) or unet.trt / .engine / .plan (TensorRT engine + .json sidecar)"),
    ],
    ckpt: Annotated[
        Path | None,
        typer.Option(
            help="checkpoint (.safetensors from `ddpm train`, or its run folder), or a diffusers folder"
        ),
    ] = None,
    onnx: Annotated[
        Path | None, typer.Option(help="TensorRT: build from this fp32 ONNX export instead of --ckpt")
    ] = None,
    opset: Annotated[
        int, typer.Option(help="ONNX opset (18: GroupNorm/attention as TensorRT parses them)")
    ] = 18,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="ONNX: half-precision weights, norms kept fp32")
    ] = False,
    batch: Annotated[
        str | None,
        typer.Option(
            help="ONNX: parity batch sizes (default 1,7); TensorRT: profile MIN,OPT,MAX (default 1,64,256)"
        ),
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="TensorRT: fp32 | tf32 | fp16 | bf16 (default fp32)")
    ] = None,
    timing_cache: Annotated[
        Path | None,
        typer.Option(help="TensorRT: timing cache file, read if present and saved after the build"),
    ] = None,
    version_compatible: Annotated[
        bool,
        typer.Option("--version-compatible", help="TensorRT: engine runs on later TensorRT 10.x too"),
    ] = False,
    hardware_compat: Annotated[
        str | None,
        typer.Option(help="TensorRT: 'ampere+' = engine runs on any GPU of compute capability >= 8.0"),
    ] = None,
) -> None:
    """Export a checkpoint to ONNX or a TensorRT engine; parity against PyTorch is checked before writing."""
    report = api.export(
        ckpt, out, onnx=onnx, opset=opset, fp16=fp16, batch=batch, precision=precision,
        timing_cache=timing_cache, version_compatible=version_compatible, hardware_compat=hardware_compat,
        log=typer.echo,
    )  # fmt: skip
    worst = max(report.parity, key=lambda r: r.max_rel)
    batches = ", ".join(str(b) for b in sorted({r.batch for r in report.parity}))
    typer.echo(
        f"ok: {report.out} ({report.kind}, {report.precision}) passes parity: worst max rel err "
        f"{worst.max_rel:.2e} <= {worst.tol:.0e} over batch {batches} ({report.seconds:.1f} s)"
    )


def info_cmd(
    file: Annotated[
        Path,
        typer.Argument(help="a checkpoint (.safetensors), ONNX file, TensorRT engine or diffusers folder"),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Print an artifact's metadata (weights / engine hashes verified) as a table or JSON."""
    info = api.describe(file)
    typer.echo(json.dumps(info, indent=2, sort_keys=True) if json_out else api.format_table(info))


def import_cmd(
    folder: Annotated[
        Path,
        typer.Argument(
            help="a diffusers folder: a pipeline (model_index.json, unet/, scheduler/) or a model folder "
            "(config.json + diffusion_pytorch_model.safetensors / .bin)"
        ),
    ],
    out: Annotated[Path, typer.Option(help="the checkpoint to write (.safetensors)")],
    scheduler_config: Annotated[
        Path | None,
        typer.Option(
            help="scheduler_config.json for a model folder without one beside it (or in ../scheduler/)"
        ),
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="ema | main; default: the EMA weights when the folder holds both")
    ] = None,
) -> None:
    """Convert a diffusers DDPM folder into a checkpoint (native network, complete metadata; no diffusers needed
    to run, export or inspect it afterwards)."""
    report = api.import_diffusers(
        folder, out, scheduler_config=scheduler_config, weights=weights, log=typer.echo
    )
    meta, src = report.meta, report.meta["source"]
    rec = meta.get("sampling", {})
    typer.echo(
        f"ok: wrote {report.out}: unet2d {meta['sample_shape']}, {report.params / 1e6:.2f}M parameters "
        f"({src['weights_kind']} weights), prediction {meta['prediction']}, variance {meta.get('variance')}, "
        f"schedule {meta['schedule']['kind']}; recommended {rec.get('sampler')} {rec.get('steps')} steps "
        f"({report.seconds:.1f} s)"
    )


def register(app: typer.Typer) -> None:
    """Add ``ddpm export``, ``ddpm info`` and ``ddpm import`` to the CLI."""
    app.command("export")(export_cmd)
    app.command("info")(info_cmd)
    app.command("import")(import_cmd)
