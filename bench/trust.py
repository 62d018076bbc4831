"""``ddpm bench``'s verdict: the performance targets checked, and withheld when the machine was too busy to trust.

A busy machine inverts verdicts (issue #16: "0.96x missed" became "7.72x met" while the eager baseline's p90 was
6x its median). Four signals, judged together by :func:`judge`, a pure function of the figures (tests feed it
made-up ones):

    spread       p90 / median of every row a verdict rests on (every stage of each engine x batch a target
                 applies to) timed often enough, and long enough a call, for its spread to be the machine's
    CPU share    of the CPU time this process's threads asked for while those rows were timed, the fraction
                 they got (bench/timing.py, ``CpuUse.share``); rows timed for too short a time to say are
                 reported but not judged
    load         the 1-minute load average per core before the run, and after it less this process's own
                 threads (the load average counts them too)
    others' CPU  the CPU time the rest of the machine used while the bench ran (/proc/stat, steal included),
                 as a fraction of all its cores

Load average and /proc/stat count the whole machine, so they are divided by its cores (``os.cpu_count()``), not
by the cores this process may use. When any signal fails, the met/missed verdict is withheld (``"verdict":
"withheld"`` and the reasons in the JSON); every figure is still reported. The thresholds were measured on a
quiet 2-core VM and next to a hog of 2 x cores busy loops (benchmarks/README.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .stages import FUSED_TABLE

__all__ = [
    "TARGETS",
    "THRESHOLDS",
    "Thresholds",
    "Figures",
    "RowFigures",
    "MachineClock",
    "judge",
    "judged",
    "check_targets",
    "assess",
    "verdict_line",
]

# The performance targets of docs/design.md: (stage, device type, sample shape incl. batch or None for any) -> minimum ratio.
TARGETS = [
    {
        "name": "fused update vs eager, CPU, 64x3x32x32",
        "stage": "update",
        "device": "cpu",
        "shape": [64, 3, 32, 32],
        "min": 5.0,
    },
    {
        "name": "fused update vs eager, CPU, 1x1x28x28",
        "stage": "update",
        "device": "cpu",
        "shape": [1, 1, 28, 28],
        "min": 10.0,
    },
    {
        "name": "end-to-end onnxruntime+fused vs eager, CPU",
        "stage": "loop",
        "device": "cpu",
        "backend": "onnxruntime",
        "min": 2.0,
    },
    {
        "name": "end-to-end OpenVINO bf16 + fused vs eager fp32, CPU, 1x3x32x32",
        "stage": "loop",
        "device": "cpu",
        "shape": [1, 3, 32, 32],
        "backend": "openvino",
        "precision": "bf16",
        "min": 2.5,
    },
    {
        "name": "end-to-end OpenVINO bf16 + fused vs eager fp32, CPU, 64x3x32x32",
        "stage": "loop",
        "device": "cpu",
        "shape": [64, 3, 32, 32],
        "backend": "openvino",
        "precision": "bf16",
        "min": 2.5,
    },
    {
        "name": "fused update vs eager, GPU, batch 1",
        "stage": "update",
        "device": "cuda",
        "batch": 1,
        "min": 10.0,
    },
    {
        "name": "end-to-end CUDA-graph loop vs eager, GPU, batch 1",
        "stage": "loop",
        "device": "cuda",
        "batch": 1,
        "cuda_graph": True,
        "min": 5.0,
    },
]


@dataclass(frozen=True)
class Thresholds:
    """Past these the machine was too busy for a verdict (the figures behind them: benchmarks/README.md).

    max_spread: p90 / median of a row of at least min_spread_repeats calls (the p90 of fewer is their slowest
    one: 2.4x for 5 calls of a 0.1 ms forward on a quiet machine) taking at least min_spread_median_s each
    (below, the timer and the interpreter make the spread: a 2-element step table reads 2.4x there too).
    min_cpu_share: CpuUse.share of a row timed for at least min_share_wall_s in all (over less, one wake-up
    decides the figure).
    max_load_per_core: load average per core. max_others_cpu: the other processes' fraction of the machine's CPU
    time while the bench ran.
    """

    max_spread: float = 2.5
    min_spread_repeats: int = 10
    min_spread_median_s: float = 1e-5
    min_cpu_share: float = 0.75
    min_share_wall_s: float = 0.05
    max_load_per_core: float = 1.5
    max_others_cpu: float = 0.2


THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class RowFigures:
    """One timed row: seconds per call (median, p90), the CPU share over its cpu_wall_s timed seconds, and how
    many calls were timed."""

    median_s: float
    p90_s: float
    cpu_share: float | None = None
    cpu_wall_s: float = 0.0
    repeats: int = 20


@dataclass(frozen=True)
class Figures:
    """What judge() decides on. rows: {row label: RowFigures} of the rows a verdict rests on; cores: the
    machine's; own_threads: the most threads this process ran; others_cpu: see the module docstring."""

    rows: dict[str, RowFigures]
    cores: int
    own_threads: int
    load_before: float | None = None
    load_after: float | None = None
    others_cpu: float | None = None


def judged(fig: Figures, th: Thresholds = THRESHOLDS) -> tuple[dict[str, float], dict[str, float]]:
    """({row: p90 / median}, {row: CPU share}) of the rows long enough for each signal to mean something."""
    spreads = {
        k: r.p90_s / r.median_s
        for k, r in fig.rows.items()
        if r.median_s >= th.min_spread_median_s and r.repeats >= th.min_spread_repeats
    }
    shares = {
        k: r.cpu_share
        for k, r in fig.rows.items()
        if r.cpu_share is not None and r.cpu_wall_s >= th.min_share_wall_s
    }
    return spreads, shares


def judge(fig: Figures, th: Thresholds = THRESHOLDS) -> list[str]:
    """Why these figures cannot carry a verdict (empty: they can): one reason per failing signal, naming the
    worst row where the signal is per row."""
    reasons = []
    spreads, shares = judged(fig, th)
    wide = {k: v for k, v in spreads.items() if v > th.max_spread}
    if wide:
        worst = max(wide, key=lambda k: wide[k])
        more = f", {len(wide) - 1} more rows over it" if len(wide) > 1 else ""
        reasons.append(f"{worst}: p90 is {wide[worst]:.1f}x its median (limit {th.max_spread:g}x{more})")
    starved = {k: v for k, v in shares.items() if v < th.min_cpu_share}
    if starved:
        worst = min(starved, key=lambda k: starved[k])
        more = f", {len(starved) - 1} more rows under it" if len(starved) > 1 else ""
        reasons.append(
            f"{worst}: this process got {starved[worst]:.0%} of the CPU it asked for "
            f"(limit {th.min_cpu_share:.0%}{more})"
        )
    limit = th.max_load_per_core * fig.cores
    if fig.load_before is not None and fig.load_before > limit:
        reasons.append(
            f"load average {fig.load_before:.1f} on {fig.cores} cores before the run (limit {limit:g})"
        )
    if fig.load_after is not None and fig.load_after - fig.own_threads > limit:
        reasons.append(
            f"load average {fig.load_after:.1f} on {fig.cores} cores after the run, {fig.own_threads} of it at "
            f"most this process's threads (limit {limit:g} + {fig.own_threads})"
        )
    if fig.others_cpu is not None and fig.others_cpu > th.max_others_cpu:
        reasons.append(
            f"other processes used {fig.others_cpu:.0%} of the machine's CPU meanwhile "
            f"(limit {th.max_others_cpu:.0%})"
        )
    return reasons


def _proc_stat() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot (steal counts as busy), or None."""
    try:
        with open("/proc/stat") as f:
            first = f.readline().split()
        ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    total = sum(ticks) / hz
    return total - (ticks[3] + ticks[4]) / hz, total


@dataclass(frozen=True)
class MachineClock:
    """The machine-wide counters at one moment: load average, /proc/stat, this process's CPU time."""

    load: tuple[float, float, float] | None
    stat: tuple[float, float] | None
    own_cpu: float
    wall: float

    @classmethod
    def now(cls) -> MachineClock:
        try:
            load: tuple[float, float, float] | None = os.getloadavg()
        except OSError:
            load = None
        return cls(load, _proc_stat(), time.process_time(), time.perf_counter())


def _others_cpu(before: MachineClock, after: MachineClock) -> float | None:
    if before.stat is None or after.stat is None or after.stat[1] <= before.stat[1]:
        return None
    busy = after.stat[0] - before.stat[0] - (after.own_cpu - before.own_cpu)
    return max(0.0, busy) / (after.stat[1] - before.stat[1])


def row_label(res: dict[str, Any], row: dict[str, Any]) -> str:
    """'model.onnx batch 64 loop, eager torch + DDPM update (baseline)': one row of the report."""
    return f"{Path(res['engine']).name} batch {res['batch']} {row['stage']}, {row['impl']}"


def check_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each TARGETS entry checked against every result it applies to, with the rows its ratio comes from."""
    out = []
    for tg in TARGETS:
        for res in results:
            dev = torch.device(res["device"]).type
            if dev != tg["device"] or ("shape" in tg and res["shape"] != tg["shape"]):
                continue
            if "batch" in tg and res["batch"] != tg["batch"]:
                continue
            base = {r["stage"]: r for r in res["rows"] if r.get("baseline")}
            for row in res["rows"]:
                if row["stage"] != tg["stage"] or row.get("baseline"):
                    continue
                if "backend" in tg and row.get("runtime", res["backend"]) != tg["backend"]:
                    continue
                if row.get("precision", "fp32") != tg.get("precision", row.get("precision", "fp32")):
                    continue
                if tg["stage"] == "update" and row["impl"] != FUSED_TABLE:
                    continue
                if tg.get("cuda_graph") and not row.get("cuda_graph"):
                    continue
                met = row["speedup"] >= tg["min"]
                out.append(
                    {
                        "target": tg["name"],
                        "engine": res["engine"],
                        "batch": res["batch"],
                        "min_ratio": tg["min"],
                        "measured_ratio": row["speedup"],
                        "met": met,
                        "verdict": "met" if met else "missed",
                        "rows": [row_label(res, row), row_label(res, base[tg["stage"]])],
                    }
                )
    return out


def assess(
    results: list[dict[str, Any]],
    targets: list[dict[str, Any]],
    before: MachineClock,
    after: MachineClock,
    own_threads: int,
    th: Thresholds = THRESHOLDS,
) -> dict[str, Any]:
    """The report's verdict, its reasons and the "trust" figures behind them; a withheld verdict also
    withholds every target's met (None; its measured ratio stays).

    A verdict rests on every row of the engine x batch results a target applies to, not only the two rows of
    its ratio: a loop is steps x (forward + update), and its own one to three timed repeats show little spread
    while the forward stage's twenty, timed the same minute, show the machine's state."""
    rested_on = {(t["engine"], t["batch"]) for t in targets}
    rows, all_shares = {}, {}
    for res in results:
        for row in res["rows"]:
            label, cpu = row_label(res, row), row.get("cpu") or {}
            if cpu.get("share") is not None:
                all_shares[label] = cpu["share"]
            # every row when no target applies
            if not rested_on or (res["engine"], res["batch"]) in rested_on:
                share, wall = cpu.get("share"), cpu.get("wall_s", 0.0)
                rows[label] = RowFigures(row["median_s"], row["p90_s"], share, wall, row["repeats"])
    fig = Figures(
        rows,
        cores=os.cpu_count() or 1,
        own_threads=own_threads,
        load_before=before.load[0] if before.load else None,
        load_after=after.load[0] if after.load else None,
        others_cpu=_others_cpu(before, after),
    )
    reasons, (spreads, shares) = judge(fig, th), judged(fig, th)
    if not targets:
        verdict = "none"
    elif reasons:
        verdict = "withheld"
        for t in targets:
            t["met"], t["verdict"] = None, "withheld"
    else:
        verdict = "met" if all(t["met"] for t in targets) else "missed"
    wall = after.wall - before.wall
    trust = {
        "busy": bool(reasons),
        "reasons": reasons,
        "thresholds": asdict(th),
        "cores": fig.cores,
        "load_before": list(before.load) if before.load else None,
        "load_after": list(after.load) if after.load else None,
        "others_cpu": fig.others_cpu,
        "own_cpu_per_wall": (after.own_cpu - before.own_cpu) / wall if wall > 0 else None,
        "wall_s": wall,
        "rows_rested_on": sorted(rows),
        "max_spread": max(spreads.values(), default=None),
        "min_cpu_share_judged": min(shares.values(), default=None),
        "min_cpu_share_any_row": min(all_shares.values(), default=None),
    }
    return {"verdict": verdict, "verdict_reasons": reasons if verdict == "withheld" else [], "trust": trust}


def verdict_line(report: dict[str, Any]) -> str:
    """One line: the verdict, or why it is withheld."""
    reasons = "; ".join(report["trust"]["reasons"])
    targets = report["targets"]
    if report["verdict"] == "withheld":
        return f"verdict withheld: the machine was busy ({reasons}) — rerun on a quiet machine"
    if report["verdict"] == "none":
        busy = f"; the machine was busy ({reasons}), the figures may be off" if reasons else ""
        return f"verdict: no target applies to what was measured{busy}"
    met = sum(1 for t in targets if t["met"])
    return f"verdict: {report['verdict']} ({met} of {len(targets)} target checks met; the machine was quiet)"
