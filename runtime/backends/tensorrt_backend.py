"""The TensorRT backend: a serialised engine (``unet.trt``) and its JSON sidecar.

Written against TensorRT 10's public Python API only: ``deserialize_cuda_engine`` once, named IO tensors
(``get_tensor_name`` / ``get_tensor_mode``), ``set_input_shape`` + ``set_tensor_address`` and
``execute_async_v3`` on torch's current stream — no bindings indices, no ``execute_async_v2``. Enqueueing on
the current stream lets the sampling loop record a call inside ``torch.cuda.graph`` (``capturable``).

The sidecar is validated (TensorRT version, GPU, compute capability) before the engine is deserialised: an
engine built for another GPU or TensorRT version is refused with one line instead of a crash inside TensorRT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ddpm.artifacts import check_engine_compat, read_metadata
from ddpm.devices import gpu_facts, import_tensorrt, tensorrt_logger
from ddpm.errors import ArtifactError, InvalidArgumentError, SamplingError
from ddpm.precision import artifact_precision

from .base import Backend

__all__ = ["TensorRTBackend", "import_tensorrt"]


class TensorRTBackend(Backend):
    """One TensorRT execution context over a deserialised engine; ``backend(x, t[, y])`` on a CUDA device.

    ``meta``: the sidecar's metadata when the caller already read it (``open_backend``); otherwise it is read
    here, before anything else, so a missing or inconsistent sidecar is reported first on any machine.
    """

    name = "tensorrt"
    capturable = True

    def __init__(
        self, path: str | os.PathLike, device: torch.device, *, meta: dict[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        device = torch.device(device)
        # Order of checks: the files (sidecar present and consistent), then the device, then TensorRT itself.
        meta = meta if meta is not None else read_metadata(self.path)
        if device.type != "cuda":
            raise InvalidArgumentError(
                f"{self.path.name} is a TensorRT engine: it runs only on a CUDA GPU, got device {device}; "
                "use the ONNX file for CPU"
            )
        trt = import_tensorrt()
        gpu_name, cc = gpu_facts(device)
        check_engine_compat(meta, trt_version=trt.__version__, gpu_name=gpu_name, compute_capability=cc,
                            source=str(self.path))  # fmt: skip
        self._trt = trt
        self._logger = tensorrt_logger(trt)  # errors kept for our message, printed only under DDPM_DEBUG=1
        with torch.cuda.device(device):
            self._runtime = trt.Runtime(self._logger)
            if meta.get("version_compatible"):
                # version-compatible engines embed a lean runtime that must be allowed to run host code
                self._runtime.engine_host_code_allowed = True
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                why = "; ".join(self._logger.errors[-2:])[:200]
                raise ArtifactError(
                    f"{self.path}: TensorRT {trt.__version__} could not deserialise this engine"
                    + (f" ({why})" if why else "")
                )
            self.context = self.engine.create_execution_context()
        super().__init__(meta, device, description=f"tensorrt {trt.__version__} on {gpu_name}")
        self.precision = artifact_precision(meta)  # the sidecar's; open_backend refused a mismatch already
        self._find_io()
        self.description += f" (batch {self.min_batch}..{self.max_batch})"
        self._n: int | None = None
        self._out: torch.Tensor | None = None

    def _find_io(self) -> None:
        trt, eng = self._trt, self.engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        ins = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        rank, cond = 1 + len(self.sample_shape), self.classes is not None
        ys = [n for n in ins if cond and n == "y" and len(eng.get_tensor_shape(n)) == 1]
        xs = [n for n in ins if len(eng.get_tensor_shape(n)) == rank]
        ts = [n for n in ins if n not in xs and n not in ys and len(eng.get_tensor_shape(n)) == 1]
        if len(ins) != 2 + cond or len(xs) != 1 or len(ts) != 1 or len(ys) != cond or len(outs) != 1:
            y = " and y [N] (its sidecar says class-conditional)" if cond else ""
            raise ArtifactError(
                f"{self.path}: expected inputs x [N, ...] and t [N]{y} and one output, got {names}"
            )
        self.x_name, self.t_name, self.out_name = xs[0], ts[0], outs[0]
        self.y_name = ys[0] if cond else None
        dtypes = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT64: torch.int64,
        }
        try:
            self.x_dtype = dtypes[eng.get_tensor_dtype(self.x_name)]
            self.t_dtype = dtypes[eng.get_tensor_dtype(self.t_name)]
            self.y_dtype = dtypes[eng.get_tensor_dtype(self.y_name)] if cond else torch.int64
            self.out_dtype = dtypes[eng.get_tensor_dtype(self.out_name)]
        except KeyError as e:
            raise ArtifactError(f"{self.path}: unsupported IO tensor type {e.args[0]}") from None
        lo, _opt, hi = eng.get_tensor_profile_shape(self.x_name, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        if tuple(int(d) for d in lo[1:]) != self.sample_shape:
            raise ArtifactError(
                f"{self.path}: inconsistent metadata: engine input {list(lo[1:])} vs sample_shape "
                f"{list(self.sample_shape)}"
            )

    def _infer(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        if n != self._n:
            if not (self.min_batch <= n <= self.max_batch):
                raise InvalidArgumentError(
                    f"{self.path.name} was built for batch {self.min_batch}..{self.max_batch}, got {n}; "
                    "use --batch in that range or rebuild the engine with a wider profile"
                )
            self.context.set_input_shape(self.x_name, tuple(x.shape))
            self.context.set_input_shape(self.t_name, (n,))
            if self.y_name is not None:
                self.context.set_input_shape(self.y_name, (n,))
            self._out = torch.empty((n, *self.output_shape), dtype=self.out_dtype, device=self.device)
            self.context.set_tensor_address(self.out_name, self._out.data_ptr())
            self._n = n
        # Inputs converted only when the engine's IO types differ (an fp16-IO engine, int32 timesteps).
        xin = x if self.x_dtype == torch.float32 else x.to(self.x_dtype)
        tin = t if self.t_dtype == torch.int64 else t.to(self.t_dtype)
        yin = None if y is None else (y if self.y_dtype == torch.int64 else y.to(self.y_dtype))
        self._keep = (xin, tin, yin)  # the engine reads these asynchronously: alive until the next call
        self.context.set_tensor_address(self.x_name, xin.data_ptr())
        self.context.set_tensor_address(self.t_name, tin.data_ptr())
        if yin is not None:
            self.context.set_tensor_address(self.y_name, yin.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise SamplingError(
                f"{self.path.name}: TensorRT execute_async_v3 failed (see the TensorRT log above)"
            )
        out = self._out
        return out if out.dtype == torch.float32 else out.float()

    def _release(self) -> None:
        # Context before engine before runtime: TensorRT objects must die in reverse order of creation.
        self.context = None
        self.engine = None
        self._runtime = None
        self._out = None
        self._keep = None
