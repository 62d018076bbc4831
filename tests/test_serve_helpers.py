"""Helpers shared by the ``ddpm serve`` tests (no tests here): tiny artifacts built once per session, a server
started as a user starts it (``python -m ddpm serve`` on a free port), and the reference answers.

The artifacts are a [1, 8, 8] UNet that recommends dpm++2m, 4 steps, clip 1 (so a bare request is fast and
still goes through the model's recommendation, as ``ddpm run``'s defaults do) and a [2] MLP, both exported to
ONNX by the project's exporter. They are built once per session even under pytest-xdist: the workers share
the folder above their own temp folders (or ``DDPM_TEST_SHARED``, which `make test` sets for both of its pytest
runs), and a file lock lets one of them export.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from _runtime_models import CONFIGS, built_once, export_onnx

from ddpm.checkpoint import save_checkpoint
from ddpm.cli import main
from ddpm.models import build_model
from ddpm.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
UNET_SAMPLING = {"sampler": "dpm++2m", "steps": 4, "clip": 1.0}


def _checkpoint(folder: Path, kind: str, sampling: dict | None) -> Path:
    model = build_model(CONFIGS[kind]())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = {"schedule": Schedule.linear(1000).config, "prediction": "eps", "dataset": "test", "step": 0}
    if sampling is not None:
        meta["sampling"] = sampling
    return save_checkpoint(folder / f"{kind}.safetensors", model, meta)


def serve_artifacts(tmp_path_factory) -> dict[str, Path]:
    """{"unet": unet.onnx, "mlp": mlp.onnx, "unet_ckpt": unet.safetensors}, built once per session."""

    def build(folder: Path) -> None:
        export_onnx(_checkpoint(folder, "unet", UNET_SAMPLING), folder / "unet.onnx")
        export_onnx(
            _checkpoint(folder, "mlp", {"sampler": "ddpm", "steps": 5, "clip": None}), folder / "mlp.onnx"
        )

    folder = built_once(tmp_path_factory, "serve_artifacts", build)
    return {
        "unet": folder / "unet.onnx",
        "mlp": folder / "mlp.onnx",
        "unet_ckpt": folder / "unet.safetensors",
    }


def conditional_artifact(tmp_path_factory) -> Path:
    """A class-conditional [1, 8, 8] UNet (3 classes named a, b, c; null class 3, trained-with-dropout in its
    metadata) exported to ONNX, once per session; only the tests that need it pay for its export."""

    def build(folder: Path) -> None:
        model = build_model({**CONFIGS["unet"](), "num_classes": 3})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        meta = {"schedule": Schedule.linear(1000).config, "prediction": "eps", "dataset": "test", "step": 0}
        meta["classes"] = {"count": 3, "null": 3, "names": ["a", "b", "c"], "p_uncond": 0.1}
        export_onnx(save_checkpoint(folder / "cond.safetensors", model, meta), folder / "cond.onnx")

    return built_once(tmp_path_factory, "serve_conditional", build) / "cond.onnx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@contextlib.contextmanager
def started_server(
    engines: dict[str, Path], folder: Path, *args: str, wait_s: float = 90.0
) -> Iterator[Server]:
    """``python -m ddpm serve --engine NAME=PATH ... ARGS`` on a free port, as a user starts it; yields once
    /healthz answers 200; SIGTERM (then SIGKILL) at the end."""
    port = free_port()
    log = folder / f"server-{port}.log"
    cmd = [sys.executable, "-m", "ddpm", "serve", "--port", str(port), "--threads", "1", *args]
    for name, path in engines.items():
        cmd += ["--engine", f"{name}={path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_healthy(server, wait_s)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_healthy(server: Server, wait_s: float, path: str = "/healthz") -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"the server exited with {server.proc.returncode}:\n{server.stderr()}")
        try:
            if httpx.get(server.url + path, timeout=10).status_code == 200:  # a busy machine answers slowly
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not answer {path} within {wait_s} s:\n{server.stderr()}")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def ddpm_run_arr0(engine: Path, folder: Path, num_samples: int, settings: dict) -> np.ndarray:
    """arr_0 of ``ddpm run --engine E --num-samples N --npz F`` with ``settings`` as its flags (the command
    itself, through ``ddpm.cli.main``)."""
    out = folder / f"run-{abs(hash((str(engine), num_samples, tuple(sorted(settings.items())))))}.npz"
    args = ["run", "--engine", str(engine), "--num-samples", str(num_samples), "--npz", str(out)]
    args += ["--no-progress", "--device", "cpu", "--threads", "1"]
    for k, v in settings.items():
        args += [f"--{k}", str(v)]
    code = main(args)
    assert code == 0, f"ddpm run {args} exited {code}"
    with np.load(out) as f:
        return f["arr_0"]


def npz_arrays(content: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(content)) as f:
        return {k: f[k] for k in f.files}


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0.0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, rest = head.partition("{")
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if metric_name == name and got == want:
            return float(value)
    return 0.0


def raw_request(port: int, head: bytes, send=None, timeout: float = 20.0) -> tuple[int, bytes]:
    """Send a request head (and ``send(sock)`` in a thread for the body); read the answer until the server
    closes. Returns (status, body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sender = None
    try:
        sock.sendall(head)
        if send is not None:
            sender = threading.Thread(target=send, args=(sock,), daemon=True)
            sender.start()
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
        if sender is not None:
            sender.join(timeout)
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data.partition(b"\r\n\r\n")[2]


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0
