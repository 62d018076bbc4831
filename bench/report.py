"""``ddpm bench``'s report: the markdown tables and the speed-up bar plot of a run_bench result."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.images import new_figure, save_figure

from .trust import verdict_line

__all__ = ["render_markdown", "plot_report"]


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.1f} µs"
    return f"{s * 1e9:.0f} ns"


_MET = {True: "yes", False: "**no**"}  # None: withheld on a busy machine


def _conditions(report: dict[str, Any]) -> str:
    """Load, other processes' CPU, the threads used: what the verdict's trust rests on, in one line."""
    tr, th = report["trust"], report["threads"]
    load = " / ".join(f"{v[0]:.2f}" if v else "-" for v in (tr["load_before"], tr["load_after"]))
    others = "-" if tr["others_cpu"] is None else f"{tr['others_cpu']:.0%}"
    runtimes = ", ".join(
        f"{k} {v}" for k, v in th.items() if k not in ("asked", "usable_cores", "machine_cores", "env")
    )
    env = ", ".join(f"{k}={v}" for k, v in th["env"].items()) or "no thread variables set"
    spread = "-" if tr["max_spread"] is None else f"{tr['max_spread']:.2f}x"
    share = "-" if tr["min_cpu_share_judged"] is None else f"{tr['min_cpu_share_judged']:.0%}"
    return (
        f"Conditions: load average {load} (before / after) on {tr['cores']} cores ({th['usable_cores']} usable); "
        f"other processes used {others} of the CPU; widest p90/median {spread}, lowest CPU share {share} "
        f"(rows the verdict rests on); threads: {runtimes}; {env}"
    )


def render_markdown(report: dict[str, Any]) -> str:
    """The machine, the command, the conditions and the verdict, then one table of stage rows (median, p10, p90,
    the CPU share the process got), one of throughput, one of the targets."""
    m = report["machine"]
    lines = [
        f"Machine: {m.get('gpu') or m['cpu']} ({m['cores']} cores, torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}, openvino {m.get('openvino', '-')}, torch threads {report['config']['threads']}, "
        f"native bf16 {m.get('cpu_native_bf16', '-')}); copy bandwidth "
        f"{report['rates']['copy_bandwidth_GBps']:.1f} GB/s, matmul {report['rates']['matmul_GFLOPps']:.0f} GFLOP/s",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    if "trust" in report:
        lines += [_conditions(report), "", f"**{verdict_line(report)}**", ""]
    lines.append(
        "| engine | batch | stage | impl | median | p10 | p90 | CPU | floor | x floor | speed-up vs eager |"
    )
    lines.append("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for res in report["results"]:
        name = Path(res["engine"]).name
        for r in res["rows"]:
            note = ""
            if r["stage"] == "loop" and res["loop_steps_timed"] != res["steps"]:
                note = f" ({res['steps']} steps, timed over {res['loop_steps_timed']})"
            xf = f"{r['x_floor']:.1f}" if r["x_floor"] else "-"
            impl = r["impl"]
            if r.get("precision") and not r.get("baseline") and r["precision"] not in impl:
                impl = f"{impl}, {r['precision']}"  # the engine's own rows name only the runtime
            impl = f"**{impl}** (fastest)" if r.get("fastest") else impl
            share = (r.get("cpu") or {}).get("share")
            lines.append(
                f"| {name} | {res['batch']} | {r['stage']}{note} | {impl} | {_fmt_s(r['median_s'])} | "
                f"{_fmt_s(r.get('p10_s'))} | {_fmt_s(r['p90_s'])} | {'-' if share is None else f'{share:.0%}'} | "
                f"{_fmt_s(r['floor_s'])} | {xf} | {r['speedup']:.2f}x |"
            )
    lines.append("")
    lines.append("| engine | batch | setup: backend load | samples/s | eager samples/s | peak memory |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for res in report["results"]:
        peak = f"{res['peak_memory_bytes'] / 2**20:.0f} MiB" if res["peak_memory_bytes"] else "-"
        lines.append(
            f"| {Path(res['engine']).name} | {res['batch']} | {_fmt_s(res['setup_s']['backend_load'])} | "
            f"{res['samples_per_s']:.3g} | {res['eager_samples_per_s']:.3g} | {peak} |"
        )
    if report["targets"]:
        lines += [
            "",
            "| target | engine | batch | required | measured | met |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for t in report["targets"]:
            lines.append(
                f"| {t['target']} | {Path(t['engine']).name} | {t['batch']} | >= {t['min_ratio']:g}x | "
                f"{t['measured_ratio']:.2f}x | {_MET.get(t['met'], 'withheld')} |"
            )
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Bars per stage: speed-up over eager for every engine x batch (log scale), written atomically."""
    labels: list[str] = []
    groups: dict[str, list[float]] = {}
    for j, res in enumerate(report["results"]):
        labels.append(f"{Path(res['engine']).name}\nbatch {res['batch']}")
        for r in res["rows"]:
            if r.get("baseline"):
                continue
            # forward/loop rows are named after the backend; one bar series per stage keeps engines comparable
            # (extra runtime x precision rows: one series each, by their tags)
            key = f"{r['stage']}: {r['impl']}" if r["stage"] == "update" else f"{r['stage']}: engine"
            if "runtime" in r and (r["runtime"], r["precision"]) != (
                res["backend"],
                res.get("precision", "fp32"),
            ):
                key = f"{r['stage']}: {r['runtime']} {r['precision']}"
            groups.setdefault(key, [math.nan] * len(report["results"]))[j] = r["speedup"]
    fig, ax = new_figure((max(6, 2.2 * len(labels)), 4), dpi=120)
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(labels))
    for j, (name, vals) in enumerate(groups.items()):
        ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("speed-up over eager PyTorch")
    ax.set_title(f"ddpm bench on {report['machine'].get('gpu') or report['machine']['cpu']}", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path, what="--plot")
