"""``ddpm serve`` under load: requests/s and latency with dynamic batching on and off, at several concurrencies.

    python benchmarks/serve_load.py --engine runs/acc/digits/model.onnx --sampler dpm++2m --steps 20 \
        --concurrency 1,4,16,64 --requests 400 --json benchmarks/serve_cpu.json --md benchmarks/serve_cpu.md

For each mode (batching: ``--max-batch 64``; none: ``--max-batch 1``) the script starts ``python -m ddpm serve``
on a free port (as a user would), waits for /healthz, and for each concurrency C runs C simulated clients, each
with its own async httpx client and connection, sending single-sample requests (distinct seeds, npz answers) one
after the other until ``--requests`` have been answered. Per point: requests/s, p50/p90/p99 latency (send to last
byte), the batch sizes the server ran (its /metrics histogram, before/after difference), the server's RSS, and the
load average. The acceptance figure: at 16 clients, batching on gives >= 3x the requests/s of --max-batch 1.

The client runs on the same machine and takes CPU from the server; ``--server-cpus 0-3`` pins the server to those
cores and the client to the others (Linux). Run it on a quiet machine: a busy one measures the other processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ddpm.options import SamplingOptions
from ddpm.runtime.backends import open_backend
from ddpm.runtime.sampling import SamplingPlan
from ddpm.runtime.segments import Segment, sample_segments

MODES = {"batching": 64, "max-batch 1": 1}
TARGET = 3.0  # batching on / --max-batch 1, requests/s at 16 clients


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine()
            )
    except OSError:
        return platform.processor() or platform.machine()


def _cpus(text: str | None) -> set[int] | None:
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _histogram(text: str) -> dict[str, float]:
    """ddpm_serve_batch_rows buckets (le -> cumulative count), its _sum and _count, summed over models."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("ddpm_serve_batch_rows"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{")[0]
        if name.endswith("_bucket"):
            le = head.split('le="')[1].split('"')[0]
            out[le] = out.get(le, 0.0) + float(value)
        elif name.endswith("_sum") or name.endswith("_count"):
            key = name.rsplit("_", 1)[1]
            out[key] = out.get(key, 0.0) + float(value)
    return out


def _batch_sizes(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    loops = diff.get("count", 0.0)
    seen, prev = {}, 0.0
    for le in sorted((k for k in diff if k not in ("sum", "count")), key=lambda k: float(k)):
        n = diff[le] - prev
        prev = diff[le]
        if n:
            seen[f"<={le}" if le != "+Inf" else ">1024"] = int(n)
    return {
        "loops": int(loops),
        "mean_rows": round(diff.get("sum", 0.0) / loops, 2) if loops else None,
        "histogram": seen,
    }


class Server:
    def __init__(self, engine: Path, max_batch: int, args: argparse.Namespace, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ddpm", "serve", "--engine", f"model={engine}", "--port", str(self.port)]
        cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "65536"]
        cmd += ["--device", "cpu"] + (["--threads", str(args.threads)] if args.threads else [])
        self.cmd = cmd
        cpus = _cpus(args.server_cpus)
        self.proc = subprocess.Popen(
            cmd,
            stdout=open(log, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"the server did not come up in 120 s; see {log}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


async def _load(url: str, body: dict[str, Any], clients: int, total: int, first_seed: int) -> list[float]:
    """``clients`` clients, each with its own connection, one request after the other, ``total`` in all."""
    seeds = iter(range(first_seed, first_seed + total))
    latencies: list[float] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            for seed in seeds:
                t0 = time.perf_counter()
                r = await c.post("/v1/samples", json={**body, "seed": seed})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise SystemExit(f"request failed: {r.status_code} {r.text[:200]}")

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def loop_ceiling(args: argparse.Namespace, sizes: tuple[int, ...] = (1, 16, 64)) -> dict[str, float]:
    """samples/s of the bare merged loop (no HTTP) at batch 1, 16 and 64, in this process with the server's
    threads: the most batching can give on this machine (the HTTP figures can only approach the ratios)."""
    out = {}
    with open_backend(args.engine, device="cpu", threads=args.threads) as backend:
        opts = SamplingOptions(sampler=args.sampler, steps=args.steps, recommended=True, device="cpu")
        plan = SamplingPlan.for_artifact(backend.meta, opts)
        for n in sizes:
            segments = [Segment(seed, 0, 1) for seed in range(n)]  # n single-sample requests
            sample_segments(backend, plan, segments)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                sample_segments(backend, plan, segments)
                times.append(time.perf_counter() - t0)
            out[f"batch_{n}_samples_per_s"] = round(n / statistics.median(times), 1)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    body = {"num_samples": 1, "format": "npz", "sampler": args.sampler, "steps": args.steps}
    concurrency = [int(c) for c in args.concurrency.split(",")]
    log = Path(args.log)
    facts: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "cpu": _cpu_name(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "server_threads": args.threads or "default (the usable cores)",
        "server_cpus": args.server_cpus or "any",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "python": platform.python_version(),
        "engine": str(args.engine),
        "request": body,
        "load_before": [round(v, 2) for v in os.getloadavg()],
    }
    facts["loop_ceiling"] = loop_ceiling(args)
    print("bare loop:", json.dumps(facts["loop_ceiling"]), flush=True)
    client_cpus = _cpus(args.server_cpus)
    if client_cpus and hasattr(os, "sched_setaffinity"):
        rest = set(os.sched_getaffinity(0)) - client_cpus
        if rest:
            os.sched_setaffinity(0, rest)
            facts["client_cpus"] = sorted(rest)
    rows = []
    for mode, max_batch in MODES.items():
        server = Server(args.engine, max_batch, args, log)
        facts.setdefault("server_command", " ".join(server.cmd))
        try:
            asyncio.run(_load(server.url, body, 4, 4 * max(1, args.warmup), 1 << 40))  # warm-up, not counted
            for c in concurrency:
                before = _histogram(httpx.get(server.url + "/metrics").text)
                t0 = time.perf_counter()
                lat = asyncio.run(_load(server.url, body, c, args.requests, c * 1_000_000))
                seconds = time.perf_counter() - t0
                after = _histogram(httpx.get(server.url + "/metrics").text)
                row = {
                    "mode": mode,
                    "max_batch": max_batch,
                    "clients": c,
                    "requests": len(lat),
                    "requests_per_s": round(len(lat) / seconds, 2),
                    "p50_ms": round(1000 * statistics.median(lat), 2),
                    "p90_ms": round(1000 * _percentile(lat, 90), 2),
                    "p99_ms": round(1000 * _percentile(lat, 99), 2),
                    "batches": _batch_sizes(before, after),
                    "server_rss_mb": round(_rss_mb(server.proc.pid), 1),
                    "load_after": [round(v, 2) for v in os.getloadavg()],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.stop()
    facts["load_after"] = [round(v, 2) for v in os.getloadavg()]
    verdict = _verdict(rows, facts["loop_ceiling"])
    return {"machine": facts, "rows": rows, "acceptance": verdict}


def _verdict(rows: list[dict[str, Any]], ceiling: dict[str, float]) -> dict[str, Any]:
    at = {(r["mode"], r["clients"]): r for r in rows}
    on, off = at.get(("batching", 16)), at.get(("max-batch 1", 16))
    if on is None or off is None:
        return {"verdict": "not measured (needs 16 clients in --concurrency)"}
    ratio = on["requests_per_s"] / off["requests_per_s"]
    # no server, however it batches, beats the bare 16-row loop: that over the unbatched server bounds the ratio
    bare = ceiling.get("batch_16_samples_per_s", float("nan"))
    return {
        "clients": 16,
        "ratio": round(ratio, 2),
        "bound": round(bare / off["requests_per_s"], 2),
        "batching_vs_bare_loop": round(on["requests_per_s"] / bare, 2),
        "target": TARGET,
        "verdict": "met" if ratio >= TARGET else "missed",
        "p99_ms_batching": on["p99_ms"],
        "p99_ms_max_batch_1": off["p99_ms"],
    }


def markdown(result: dict[str, Any]) -> str:
    m, acc = result["machine"], result["acceptance"]
    lines = [
        "# `ddpm serve` under load (CPU)",
        "",
        f"Command: `{m['command']}`",
        "",
        f"CPU: {m['cpu']}; usable cores {m['cores_usable']}; server threads {m['server_threads']}; server cpus "
        f"{m['server_cpus']}; client cpus {m.get('client_cpus', 'any')}; OMP_NUM_THREADS {m['OMP_NUM_THREADS']}; "
        f"Python {m['python']}; load average before {m['load_before']}, after {m['load_after']}.",
        "",
        f"Server: `{m.get('server_command', '')}` (with `--max-batch 64` and `--max-batch 1`).",
        f"The bare merged loop on this machine, no HTTP (samples/s): {json.dumps(m['loop_ceiling'])}; the ratio "
        "of batch 16 to batch 1 there bounds what batching can give 16 clients.",
        f"Each request: `{json.dumps(m['request'])}` with its own seed; each client has its own connection.",
        "",
        "| mode | clients | requests/s | p50 ms | p90 ms | p99 ms | loops | mean rows/loop | rows per loop seen "
        "| server RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in result["rows"]:
        b = r["batches"]
        seen = ", ".join(f"{k}: {v}" for k, v in b["histogram"].items())
        lines.append(
            f"| {r['mode']} | {r['clients']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p90_ms']} | "
            f"{r['p99_ms']} | {b['loops']} | {b['mean_rows']} | {seen} | {r['server_rss_mb']} |"
        )
    lines += ["", f"Acceptance (16 clients, batching >= {TARGET:g}x the requests/s of --max-batch 1): "]
    if "ratio" in acc:
        lines[-1] += (
            f"**{acc['verdict']}**, {acc['ratio']}x; p99 {acc['p99_ms_batching']} ms with batching, "
            f"{acc['p99_ms_max_batch_1']} ms without. The bound on this machine (the bare 16-row loop's samples/s "
            f"over the --max-batch 1 server's requests/s): {acc['bound']}x; batching reached "
            f"{acc['batching_vs_bare_loop']:.0%} of the bare loop."
        )
    else:
        lines[-1] += acc["verdict"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--engine", type=Path, required=True, help="the ONNX file to serve (e.g. the digits model)"
    )
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=400, help="answered requests per point")
    p.add_argument("--warmup", type=int, default=5, help="requests per warm-up client before the points")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads (default: its own)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--server-cpus", default=None, help="pin the server to these cores (e.g. 0-3), the client to the rest"
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--log", default="serve_load.log", help="the servers' output")
    args = p.parse_args()
    result = run(args)
    text = markdown(result)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.md is not None:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
