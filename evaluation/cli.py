"""`ddpm eval`: sample quality of an npz against a reference dataset or cached reference statistics.

Only typer and the standard library at module level: ``ddpm --help`` must not import torch, so the library
(``evaluate.py``, which needs torch) is imported inside the command, as ``ddpm train`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from .evaluate import EvalReport

__all__ = ["register", "render_markdown", "render_table"]


def _title(report: EvalReport) -> str:
    s, r = report.samples, report.reference
    space = f"; feature space: {r['feature_space']}" if r.get("feature_space") else ""
    return f"{s['count']} samples {s['shape']} vs {r['ref']} ({r['count']} reference items){space}"


def _rows(report: EvalReport) -> list[tuple[str, str, str, str]]:
    return [(m.name, f"{m.value:.4g}", f"{m.scale:.4g} ± {m.spread:.2g}", m.meaning) for m in report.metrics]


def _num(v: float | None, spread: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if spread is None else f"{v:.4g} ± {spread:.2g}"


_CLASS_HEAD = (
    "class",
    "samples",
    "accuracy",
    "(real)",
    "confidence",
    "(real)",
    "FD-classifier",
    "(real ± std)",
)
_CLASS_NOTE = (
    "per class: the classifier's accuracy and confidence on the samples asked for the class, and FD-classifier "
    "to the reference images of that class; (real): the same for as many reference images of the class"
)


def _class_rows(report: EvalReport) -> list[tuple[str, ...]]:
    return [
        (f"{r['class']} {r['name']}" if r["name"] != str(r["class"]) else r["name"], str(r["count"]),
         _num(r["accuracy"]), _num(r["accuracy_scale"]), _num(r["confidence"]), _num(r["confidence_scale"]),
         _num(r["fd"]), _num(r["fd_scale"], r["fd_spread"]))
        for r in report.per_class
    ]  # fmt: skip


def render_table(report: EvalReport) -> str:
    """Plain-text table: metric, value, scale (real vs real ± its spread), what it means; then the per-class
    table of ``--per-class``."""
    head = ("metric", "value", "scale", "what it means")
    rows = [head, *_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [_title(report), ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows]
    if report.per_class:
        table = [_CLASS_HEAD, *_class_rows(report)]
        widths = [max(len(r[i]) for r in table) for i in range(len(_CLASS_HEAD))]
        lines += ["", _CLASS_NOTE]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines += ["", f"scale: {report.scale}"] + [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def render_markdown(report: EvalReport) -> str:
    lines = [
        f"# ddpm eval\n\n{_title(report)}\n",
        "| metric | value | scale | what it means |",
        "|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(r)} |" for r in _rows(report)]
    if report.per_class:
        lines += ["", f"{_CLASS_NOTE[0].upper()}{_CLASS_NOTE[1:]}.", "", f"| {' | '.join(_CLASS_HEAD)} |"]
        lines += ["|" + "---|" * len(_CLASS_HEAD)] + [f"| {' | '.join(r)} |" for r in _class_rows(report)]
    lines += ["", f"Scale: {report.scale}.", ""] + [f"- Note: {n}" for n in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def eval_cmd(
    ref: Annotated[
        str,
        typer.Option(help="swissroll | digits | mnist:DIR | cifar10:DIR | folder:DIR, or a --save-ref .npz"),
    ],
    samples: Annotated[
        Path | None,
        typer.Argument(help="npz from `ddpm run --npz`: arr_0 uint8 [M, H, W, C] or float32 [M, D]"),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="print the report as JSON instead of a table")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="also write the report as markdown to this file")] = None,
    inception_weights: Annotated[
        Path | None,
        typer.Option(help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth: report FID, not the proxy"),
    ] = None,
    save_ref: Annotated[
        Path | None, typer.Option(help="cache the reference statistics to this .npz (SAMPLES optional)")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="resize the reference as `ddpm train --image-size` did")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the proxy classifier and the real-vs-real splits")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda, for the Inception network")] = "auto",
    per_class: Annotated[
        bool,
        typer.Option(
            "--per-class",
            help="class-conditional samples (the npz's classes: the class each was asked for): per class, the "
            "classifier's accuracy and confidence and FD-classifier against that class's reference images",
        ),
    ] = False,
) -> None:
    """Measure sample quality offline: energy distance for points; FID (or the FD-classifier proxy),
    precision/recall and class metrics for images, each beside its real-vs-real scale."""
    from ddpm.errors import InvalidArgumentError
    from ddpm.io import check_writable, write_text_atomic

    from .evaluate import cache_reference, evaluate_report

    if out is not None:
        check_writable(out, what="--out")
    opts = dict(inception_weights=inception_weights, seed=seed, device=device, image_size=image_size)
    if samples is None:
        if save_ref is None:
            raise InvalidArgumentError("give SAMPLES to evaluate, or --save-ref FILE.npz to cache --ref")
        stats, notes = cache_reference(ref, save_ref, **opts)
        for n in notes:
            typer.echo(f"note: {n}", err=True)
        typer.echo(f"wrote {save_ref}: {stats.count} images of {stats.dataset}, feature space {stats.space}")
        return
    report = evaluate_report(samples, ref, save_ref=save_ref, per_class=per_class, **opts)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        typer.echo(render_table(report))
    if out is not None:
        write_text_atomic(out, render_markdown(report))


def register(app: typer.Typer) -> None:
    """Add `eval` to the `ddpm` app."""
    app.command("eval")(eval_cmd)
