"""The onnxruntime backend: an exported ``unet.onnx`` on the CPU or CUDA execution provider.

Inputs (x, t, and y for a class-conditional export) and the output are bound with IO binding to torch tensors'
memory on both providers, so nothing is
copied per call: on CPU onnxruntime reads x and writes its output in place; on CUDA the buffers are device
memory shared with torch and the session runs on the torch stream the sampling loop uses
(``user_compute_stream``), with no host synchronisation after a run. ``cuda_graph=True`` turns on onnxruntime's
own CUDA-graph capture (it needs the bound addresses to stay fixed, so x and t are copied into static buffers).

The file is parsed once per open, by onnxruntime: the ddpm metadata comes from the session's model metadata
(``metadata_props``), not from a second parse with the onnx package. The CUDA EP is requested only for a CUDA
device: asking for it on a machine without the CUDA 13 / cuDNN 9 libraries prints a loud error and falls back
(docs/design.md, "Environment facts"), so on CPU the session names
CPUExecutionProvider alone.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ddpm.devices import default_cpu_threads
from ddpm.errors import ArtifactError, InvalidArgumentError, MissingDependencyError
from ddpm.metadata import decode_metadata
from ddpm.precision import artifact_precision

from .base import Backend

__all__ = ["OnnxRuntimeBackend", "import_onnxruntime", "onnxruntime_session"]

_ORT_TYPES = {"tensor(float)": (np.float32, torch.float32), "tensor(int64)": (np.int64, torch.int64)}


def import_onnxruntime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(
            f"the onnxruntime backend needs onnxruntime ({e}); install it: pip install onnxruntime-gpu "
            "(Linux x86_64, also runs on CPU) or pip install onnxruntime"
        ) from None
    return onnxruntime


def onnxruntime_session(
    model: str | bytes,
    device: torch.device,
    *,
    source: str,
    threads: int | None = None,
    spin: bool = False,
    stream: torch.cuda.Stream | None = None,
    cuda_graph: bool = False,
    tf32: bool = True,
) -> Any:
    """The one place an ``onnxruntime.InferenceSession`` is built: CPU EP, or CUDA EP on ``stream`` (+ CPU).

    ``tf32=False`` keeps the CUDA EP's convolutions in fp32 (parity checks compare fp32 arithmetic).
    """
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or default_cpu_threads()
    so.inter_op_num_threads = 1
    # onnxruntime's own log (coloured [E:onnxruntime:...] lines on stderr) is silenced: what it reports reaches the
    # user once, as the exception our one-line error is made of; DDPM_DEBUG=1 shows it too (warnings and up).
    debug = os.environ.get("DDPM_DEBUG") == "1"
    so.log_severity_level = 2 if debug else 4
    ort.set_default_logger_severity(2 if debug else 4)
    # No busy-waiting between ops: the fused step's OpenMP threads run right after each call, and two
    # spinning pools on the same cores starve each other (measured on a 2-core machine with a second
    # process busy: batch-64 digits UNet 45 ms/call spinning, 23 ms not; 21 ms on one thread).
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if stream is None:  # ORT treats stream handle 0 as "none", and torch's default stream is 0
            raise InvalidArgumentError("the onnxruntime CUDA EP needs a non-default torch stream")
        cuda_opts = {
            "device_id": str(device.index or 0),
            "user_compute_stream": str(stream.cuda_stream),
            "has_user_compute_stream": "1",
            "enable_cuda_graph": "1" if cuda_graph else "0",
            "arena_extend_strategy": "kSameAsRequested",
        }
        if not tf32:
            cuda_opts["use_tf32"] = "0"
        providers.insert(0, ("CUDAExecutionProvider", cuda_opts))
    try:
        session = ort.InferenceSession(model, so, providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind exception types (Fail, InvalidGraph, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if type(e).__name__ == "InvalidProtobuf":
            raise ArtifactError(f"{source}: not a readable ONNX model (onnxruntime: {first})") from None
        raise ArtifactError(
            f"{source}: onnxruntime {ort.__version__} cannot load this model: {first}"
        ) from None
    if device.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise MissingDependencyError(
            "onnxruntime could not start its CUDA execution provider (needs onnxruntime-gpu with the CUDA 13 "
            "and cuDNN 9 libraries); use --device cpu"
        )
    return session


class OnnxRuntimeBackend(Backend):
    """An onnxruntime session over an ONNX file (or its bytes) with IO binding, on ``device``.

    ``meta``: the metadata when the caller already holds it (the exporter); otherwise it is decoded from the
    session's model metadata, so the file is parsed once.
    """

    name = "onnxruntime"
    capturable = False  # onnxruntime records its own CUDA graph (cuda_graph=True); torch cannot capture a run
    # onnxruntime raises plain RuntimeError subclasses (Fail, InvalidArgument, RuntimeException) from a run
    runtime_errors = (RuntimeError,)

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        device: torch.device,
        *,
        threads: int | None = None,
        cuda_graph: bool = False,
        meta: dict[str, Any] | None = None,
        spin: bool = False,
        tf32: bool = True,
    ) -> None:
        ort = import_onnxruntime()
        device = torch.device(device)
        cuda = device.type == "cuda"
        if cuda_graph and not cuda:
            raise InvalidArgumentError("--cuda-graph needs a CUDA device; the onnxruntime backend is on cpu")
        self.source = "ONNX graph (in memory)" if isinstance(model, bytes) else os.fspath(model)
        self.cuda_graph = cuda_graph
        stream = torch.cuda.Stream(device) if cuda else None
        self.session = onnxruntime_session(
            model if isinstance(model, bytes) else self.source, device, source=self.source, threads=threads,
            spin=spin, stream=stream, cuda_graph=cuda_graph, tf32=tf32,
        )  # fmt: skip
        if meta is None:
            meta = decode_metadata(dict(self.session.get_modelmeta().custom_metadata_map), source=self.source)
        provider = self.session.get_providers()[0]
        extra = "" if cuda else f", {threads or default_cpu_threads()} intra-op threads"
        extra += ", onnxruntime CUDA graph" if cuda_graph else ""
        super().__init__(
            meta, device, description=f"onnxruntime {ort.__version__} ({provider}{extra})", stream=stream
        )
        self.precision = artifact_precision(meta)  # an fp16 export runs in fp16; IO stays float32
        self._find_io()
        self.run_options = ort.RunOptions()
        if cuda:
            # Ordering with torch's kernels comes from sharing the stream; no host sync after each run.
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.binding = self.session.io_binding()
        self._out: torch.Tensor | None = None
        self._static: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}
        self._y: torch.Tensor | None = None

    def _find_io(self) -> None:
        """Name the x / t (/ y) inputs and the output, and check them against the metadata's sample shape and
        classes (a conditional export has an int64 input named ``y``)."""
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        rank = 1 + len(self.sample_shape)
        cond = self.classes is not None
        ys = [i for i in ins if cond and i.name == "y" and len(i.shape) == 1 and i.type == "tensor(int64)"]
        xs = [i for i in ins if i.type == "tensor(float)" and len(i.shape) == rank]
        ts = [i for i in ins if i not in xs and i not in ys and len(i.shape) == 1 and i.type in _ORT_TYPES]
        if len(ins) != 2 + cond or len(xs) != 1 or len(ts) != 1 or len(ys) != cond or len(outs) != 1:
            sig = ", ".join(f"{i.name}: {i.type}{i.shape}" for i in ins)
            y = " and y [N] int64 (its metadata says class-conditional)" if cond else ""
            raise ArtifactError(
                f"{self.source}: expected a denoiser with inputs x [N, {', '.join(map(str, self.sample_shape))}] "
                f"float32 and t [N]{y} and one output; this model has inputs ({sig}) and {len(outs)} output(s)"
            )
        x, t = xs[0], ts[0]
        self.y_name = ys[0].name if cond else None
        for got, want in zip(x.shape[1:], self.sample_shape, strict=True):
            if isinstance(got, int) and got != want:
                raise ArtifactError(
                    f"{self.source}: inconsistent metadata: input {x.name!r} has shape {x.shape} but the metadata "
                    f"says sample_shape {list(self.sample_shape)}"
                )
        self.x_name, self.t_name, self.out_name = x.name, t.name, outs[0].name
        self.t_dtype = _ORT_TYPES[t.type][1]
        self.fixed_batch = x.shape[0] if isinstance(x.shape[0], int) else None

    def _bind(self, name: str, tensor: torch.Tensor, *, output: bool = False) -> None:
        dtype = np.float32 if tensor.dtype == torch.float32 else np.int64
        kind, index = self.device.type, (self.device.index or 0)
        bind = self.binding.bind_output if output else self.binding.bind_input
        bind(name, kind, index, dtype, list(tensor.shape), tensor.data_ptr())

    def _infer(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        if self.fixed_batch is not None and n != self.fixed_batch:
            raise InvalidArgumentError(
                f"{self.source} was exported for batch {self.fixed_batch} only; use --batch {self.fixed_batch} "
                "or export with a dynamic batch"
            )
        if self.cuda_graph:
            return self._call_graph(x, t, y)
        x = x.contiguous()
        t = t.to(self.t_dtype).contiguous()
        if self._out is None or self._out.shape[0] != x.shape[0]:
            self._out = x.new_empty((x.shape[0], *self.output_shape))
            self._bind(self.out_name, self._out, output=True)
        self._bind(self.x_name, x)
        self._bind(self.t_name, t)
        if y is not None:
            y = y.contiguous()
            self._y = y  # bound by address: alive until the run returns
            self._bind(self.y_name, y)
        self.session.run_with_iobinding(self.binding, self.run_options)
        return self._out

    def _call_graph(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """onnxruntime CUDA graph: one graph per batch size (``gpu_graph_id``), fixed buffers per graph."""
        n = x.shape[0]
        if n not in self._static:
            xs, ts, ys, out = (
                torch.empty_like(x),
                torch.empty(n, dtype=self.t_dtype, device=x.device),
                torch.empty(n, dtype=torch.int64, device=x.device),
                x.new_empty((n, *self.output_shape)),
            )
            self._static[n] = (xs, ts, ys, out, len(self._static))
        xs, ts, ys, out, graph_id = self._static[n]
        if xs.data_ptr() != x.data_ptr():
            xs.copy_(x)
        ts.copy_(t)
        self._bind(self.x_name, xs)
        self._bind(self.t_name, ts)
        if y is not None:
            ys.copy_(y)
            self._bind(self.y_name, ys)
        self._bind(self.out_name, out, output=True)
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.session.run_with_iobinding(self.binding, self.run_options)
        return out

    def _release(self) -> None:
        self.binding = None
        self.session = None
        self._out = self._y = None
        self._static.clear()
