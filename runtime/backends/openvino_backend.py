"""The OpenVINO backend: an exported ``unet.onnx`` compiled by OpenVINO for the CPU, in fp32 or bf16.

Why a second ONNX runtime: onnxruntime's CPU EP has no bf16 path for an fp32 model, while OpenVINO runs the same
file in bf16 on AVX512-BF16/AMX (``INFERENCE_PRECISION_HINT``), about 4x faster than fp32 for the CIFAR-10 UNet
(docs/design.md, "Environment facts"). The model is read once per open and compiled for each batch size it is
called with (static shapes are faster; the last two sizes are kept). OpenVINO's CPU plugin defaults to bf16 on a bf16-capable CPU, so fp32 is asked for
explicitly: a run is in the precision it says.

Nothing is copied per call: x and t (and y, a conditional export's classes) are wrapped as ``ov.Tensor`` over
the torch tensors' memory
(``Tensor.numpy()`` shares it) and the output tensor is a torch buffer OpenVINO writes into. The ddpm metadata
is decoded from the ONNX ``metadata_props`` that OpenVINO's reader keeps in ``rt_info["framework"]``, with the
same decoder as the onnxruntime backend, so the file is parsed once.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch

from ddpm.devices import default_cpu_threads
from ddpm.errors import ArtifactError, InvalidArgumentError, MissingDependencyError
from ddpm.metadata import decode_metadata
from ddpm.precision import Precision, require_cpu_bf16

from .base import Backend

__all__ = ["OpenVINOBackend", "import_openvino", "openvino_has_bf16", "require_cpu"]

# ddpm precision -> OpenVINO's INFERENCE_PRECISION_HINT
_HINTS = {Precision.FP32: "f32", Precision.BF16: "bf16"}


def import_openvino() -> ModuleType:
    try:
        import openvino
    except ImportError as e:
        raise MissingDependencyError(
            f"the openvino runtime needs the openvino package ({e}); install it: pip install openvino "
            "(x86_64 Linux/Windows wheels; it is a ddpm dependency there), or use --runtime onnxruntime"
        ) from None
    return openvino


def require_cpu(device: str | torch.device) -> None:
    """OpenVINO's GPU plugin targets Intel GPUs, not CUDA: any device but the CPU is refused."""
    if str(device).strip().lower() != "cpu":
        raise InvalidArgumentError(
            f"the openvino runtime runs on the CPU only, got device {device}; use --runtime onnxruntime on CUDA"
        )


def openvino_has_bf16(core: Any) -> bool:
    """OpenVINO's own answer: "BF16" among the CPU plugin's OPTIMIZATION_CAPABILITIES."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVINOBackend(Backend):
    """One compiled OpenVINO model and one infer request over an ONNX file, on the CPU."""

    name = "openvino"
    capturable = False
    # OpenVINO raises RuntimeError from infer(); on the first call it becomes one ArtifactError naming the file
    runtime_errors = (RuntimeError,)

    def __init__(
        self,
        path: str | os.PathLike,
        device: torch.device,
        *,
        precision: Precision = Precision.FP32,
        threads: int | None = None,
    ) -> None:
        device = torch.device(device)
        self.source = os.fspath(path)
        require_cpu(device)
        if precision not in _HINTS:
            raise InvalidArgumentError(
                f"--precision {precision} is not supported by the openvino runtime on CPU; allowed: "
                f"{', '.join(p.value for p in _HINTS)}"
            )
        ov = import_openvino()
        self._ov = ov
        self.core = ov.Core()
        if precision is Precision.BF16:
            require_cpu_bf16("openvino", openvino_has_bf16(self.core))
        try:
            model = self.core.read_model(self.source)
        except Exception as e:  # OpenVINO raises plain RuntimeErrors for every reader failure
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(
                f"{self.source}: OpenVINO {ov.__version__} cannot read this model: {first}"
            ) from None
        meta = decode_metadata(_framework_info(model), source=self.source)
        n_threads = threads or default_cpu_threads()
        config = {
            "INFERENCE_PRECISION_HINT": _HINTS[precision],
            "INFERENCE_NUM_THREADS": n_threads,
            "PERFORMANCE_HINT": "LATENCY",  # one stream: the loop makes one call at a time
        }
        self.precision = precision
        version = ov.__version__.split("-")[0]
        super().__init__(
            meta,
            device,
            description=f"openvino {version} (CPU, {precision}, {n_threads} threads, compiled per batch size)",
        )
        self._find_io(model)
        self._model, self._config = model, config
        # batch -> (compiled model, infer request); the loop uses one batch (and maybe a last, smaller one)
        self._compiled: dict[int, tuple[Any, Any]] = {}
        self.compiled = self.request = None
        self._batch: int | None = None
        self._out: torch.Tensor | None = None

    def _request_for(self, batch: int) -> Any:
        """The infer request of a model compiled for exactly this batch: with every shape static OpenVINO
        picks its kernels and memory plan once (measured on the CIFAR-10 UNet, bf16, 1 thread: 62 ms per
        forward at batch 1 against 66 ms with the exported dynamic batch). Kept for the last two batch sizes."""
        if batch == self._batch:
            return self.request
        if batch not in self._compiled:
            model = self._model
            if self.fixed_batch is None:
                model = model.clone()
                shapes = {self.x_index: [batch, *self.sample_shape], self.t_index: [batch]}
                if self.y_index is not None:
                    shapes[self.y_index] = [batch]
                model.reshape(shapes)
            try:
                compiled = self.core.compile_model(model, "CPU", self._config)
            except Exception as e:  # OpenVINO raises plain RuntimeErrors
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ArtifactError(f"{self.source}: OpenVINO cannot compile this model: {first}") from None
            if len(self._compiled) >= 2:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[batch] = (compiled, compiled.create_infer_request())
        self.compiled, self.request = self._compiled[batch]
        self._batch, self._out = batch, None
        return self.request

    def _find_io(self, model: Any) -> None:
        """Input indices of x, t (and y, named ``y``, for a conditional export), checked against the metadata's
        sample shape and classes (as the onnxruntime backend)."""
        rank = 1 + len(self.sample_shape)
        ins, outs = list(model.inputs), list(model.outputs)
        cond = self.classes is not None

        def rank_of(i: Any) -> int:
            return i.get_partial_shape().rank.get_length()

        ys = [k for k, i in enumerate(ins) if cond and "y" in i.get_names() and rank_of(i) == 1]
        xs = [k for k, i in enumerate(ins) if rank_of(i) == rank and k not in ys]
        ts = [k for k, i in enumerate(ins) if k not in xs and k not in ys and rank_of(i) == 1]
        if len(ins) != 2 + cond or len(xs) != 1 or len(ts) != 1 or len(ys) != cond or len(outs) != 1:
            sig = ", ".join(f"{i.get_any_name()}: {i.get_element_type()}{i.get_partial_shape()}" for i in ins)
            y = " and y [N] int64 (its metadata says class-conditional)" if cond else ""
            raise ArtifactError(
                f"{self.source}: expected a denoiser with inputs x [N, {', '.join(map(str, self.sample_shape))}] "
                f"and t [N]{y} and one output; this model has inputs ({sig}) and {len(outs)} output(s)"
            )
        self.x_index, self.t_index = xs[0], ts[0]
        self.y_index = ys[0] if cond else None
        xshape = ins[self.x_index].get_partial_shape()
        for got, want in zip(list(xshape)[1:], self.sample_shape, strict=True):
            if got.is_static and got.get_length() != want:
                raise ArtifactError(
                    f"{self.source}: inconsistent metadata: input x has shape {xshape} but the metadata says "
                    f"sample_shape {list(self.sample_shape)}"
                )
        tt = ins[self.t_index].get_element_type()
        self.t_dtype = torch.int32 if tt == self._ov.Type.i32 else torch.int64
        self.fixed_batch = xshape[0].get_length() if xshape[0].is_static else None

    def _infer(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            raise InvalidArgumentError(
                f"{self.source} was exported for batch {self.fixed_batch} only; use --batch {self.fixed_batch} "
                "or export with a dynamic batch"
            )
        x = x.contiguous()
        t = t.to(self.t_dtype).contiguous()
        ov, req = self._ov, self._request_for(int(x.shape[0]))
        if self._out is None or self._out.shape[0] != x.shape[0]:
            self._out = x.new_empty((x.shape[0], *self.output_shape))
            req.set_output_tensor(0, ov.Tensor(self._out.numpy(), shared_memory=True))
        # The tensors view torch's memory; keep x and t alive until the (synchronous) infer returns.
        req.set_input_tensor(self.x_index, ov.Tensor(x.numpy(), shared_memory=True))
        req.set_input_tensor(self.t_index, ov.Tensor(t.numpy(), shared_memory=True))
        if y is not None:
            y = y.contiguous()
            req.set_input_tensor(self.y_index, ov.Tensor(y.numpy(), shared_memory=True))
        req.infer()
        return self._out

    def _release(self) -> None:
        # Request before compiled model before core: reverse order of creation.
        self.request = None
        self.compiled = None
        self._compiled.clear()
        self._model = None
        self.core = None
        self._out = None


def _framework_info(model: Any) -> dict[str, str]:
    """The ONNX ``metadata_props`` as OpenVINO's ONNX reader keeps them: rt_info["framework"] (str -> str)."""
    info = model.get_rt_info()
    if "framework" not in info:
        return {}
    return {str(k): v.astype(str) for k, v in info["framework"].items()}
