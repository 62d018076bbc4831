"""PyTorch denoiser -> ONNX: inputs ``x`` [N, *sample_shape] float32, ``t`` [N] int64 and, for a class-conditional
network, ``y`` [N] int64 (its classes; docs/design.md, "Conditional models"), output ``model_output``.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript). On torch 2.13 the TorchScript exporter
(``dynamo=False``) still works for these models, but it warns that it will be removed and traces
``scaled_dot_product_attention`` through Python-bool conversions; the dynamo exporter keeps the batch axis
symbolic (one ``N`` shared by x, t and the output), and its onnxscript optimizer already folds constants and
removes dead nodes, which is the simplification that is safe to apply (the rest is shape arithmetic for the
dynamic batch, which must stay). Measured on the presets: fp32 parity against PyTorch ~1e-6 relative either way.

Opset 18, deliberately:
- GroupNorm. At opset >= 21 the exporter emits ``GroupNormalization-21`` (per-channel scale), which TensorRT
  10.x's parser rejects (NVIDIA/TensorRT#4336: it implements the opset-18 per-group form) and onnxruntime runs
  as an expanded function (microsoft/onnxruntime#24538). At opset 18 the exporter writes GroupNorm as
  Reshape [N, G, -1] -> InstanceNormalization -> Reshape -> per-channel Mul/Add, which both onnxruntime and
  TensorRT have run correctly for years (and which avoids TensorRT's num_groups=1 GroupNormalization bug,
  NVIDIA/TensorRT#4756). ``GroupNormalization-18`` itself is deprecated: its per-group scale is not PyTorch's.
- Attention. ``F.scaled_dot_product_attention`` becomes MatMul -> Softmax -> MatMul; the fused ``Attention``
  operator only exists from opset 23 and TensorRT 10 does not parse it.
- Opset 18 is also the oldest opset the dynamo exporter targets (Reduce* take axes as inputs from 18 on).

IR version: onnx 1.23 stamps IR 14 on models it builds, and onnxruntime 1.31 reads at most IR 13; the written
file gets the smallest IR the opset needs, never above :data:`MAX_ONNX_IR_VERSION` (tested).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

import ddpm
from ddpm.artifacts import MAX_ONNX_IR_VERSION, onnx_weights_sha256
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.metadata import encode_metadata
from ddpm.models import class_count

__all__ = [
    "OPSET",
    "INPUT_NAMES",
    "input_names",
    "OUTPUT_NAME",
    "max_opset",
    "check_opset",
    "trace_to_onnx",
    "set_ir_version",
    "finalize_onnx",
]

OPSET = 18
INPUT_NAMES = ("x", "t")  # an unconditional denoiser's; a class-conditional one adds "y" (input_names)
OUTPUT_NAME = "model_output"
# The example batch used for tracing; parity then runs at other batch sizes (1 and 7) to prove the axis dynamic.
TRACE_BATCH = 2


def max_opset() -> int:
    """The newest opset whose files onnxruntime can read (its IR version must be <= MAX_ONNX_IR_VERSION)."""
    import onnx
    from onnx import helper

    best = OPSET
    for v in range(OPSET, onnx.defs.onnx_opset_version() + 1):
        if helper.find_min_ir_version_for([helper.make_opsetid("", v)]) <= MAX_ONNX_IR_VERSION:
            best = v
    return best


def check_opset(opset: int) -> int:
    """Validate ``--opset``: OPSET (18) .. :func:`max_opset`."""
    hi = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not (OPSET <= opset <= hi):
        raise InvalidArgumentError(
            f"--opset must be an integer in {OPSET}..{hi} (18 is the default and the one TensorRT parses "
            f"best; above 20 GroupNorm becomes GroupNormalization-21), got {opset!r}"
        )
    return opset


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs optional-op registrations (torchvision) and deprecation chatter; hide it."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def input_names(model_config: dict[str, Any]) -> tuple[str, ...]:
    """The graph's inputs: ("x", "t"), and "y" for a class-conditional network."""
    return (*INPUT_NAMES, "y") if class_count(model_config) else INPUT_NAMES


def trace_to_onnx(model: Any, sample_shape: Sequence[int], *, opset: int = OPSET) -> Any:
    """Export ``model(x, t[, y])`` to an ``onnx.ModelProto`` with a dynamic batch axis ``N`` (fp32, weights inline).

    x: [N, *sample_shape] float32, t: [N] int64 (y: [N] int64 when ``model.config`` is class-conditional) ->
    model_output [N, *output_shape] float32 (the sample shape, with 2C channels for a learned-variance model).
    """
    import torch

    check_opset(opset)
    model = model.to("cpu").float().eval()
    names = input_names(getattr(model, "config", {}))
    x = torch.randn(TRACE_BATCH, *sample_shape)
    t = torch.randint(0, 1000, (TRACE_BATCH,), dtype=torch.int64)
    y = torch.zeros(TRACE_BATCH, dtype=torch.int64)  # a class index: every row of the table is valid
    n = torch.export.Dim("N", min=1, max=1 << 16)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                model,
                (x, t, y)[: len(names)],
                None,
                dynamo=True,
                opset_version=opset,
                input_names=list(names),
                output_names=[OUTPUT_NAME],
                dynamic_shapes={name: {0: n} for name in names},
                optimize=True,  # onnxscript optimizer: constant folding, dead-code and identity removal
                external_data=False,  # one self-contained file (our models are far below protobuf's 2 GiB)
                verbose=False,
            )
    except Exception as e:  # torch.export / onnxscript raise many types; the first line says what failed
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ArtifactError(
            f"torch.onnx.export could not export the model: {type(e).__name__}: {first[:300]}"
        ) from None
    return program.model_proto


def set_ir_version(model: Any) -> Any:
    """Stamp the smallest IR version the model's opsets need (<= MAX_ONNX_IR_VERSION) and return the model."""
    from onnx import helper

    need = helper.find_min_ir_version_for(list(model.opset_import))
    if need > MAX_ONNX_IR_VERSION:
        raise InvalidArgumentError(
            f"the model's opsets need ONNX IR {need}, but onnxruntime reads at most IR {MAX_ONNX_IR_VERSION}; "
            f"use a lower --opset"
        )
    model.ir_version = need
    return model


def finalize_onnx(model: Any, meta: dict[str, Any], extra: dict[str, str]) -> Any:
    """Set IR version, producer and ``metadata_props`` (checkpoint metadata + ``extra`` + weights hash), then
    run the ONNX checker. ``model`` is changed in place and returned."""
    import onnx

    set_ir_version(model)
    model.producer_name = "ddpm"
    model.producer_version = ddpm.__version__
    props = {**meta, **extra, "weights_sha256": onnx_weights_sha256(model)}
    del model.metadata_props[:]
    for k, v in encode_metadata(props).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        first = (str(e).strip().splitlines() or ["?"])[0]
        raise ArtifactError(f"the exported ONNX graph fails onnx.checker: {first[:300]}") from None
    return model


def graph_summary(model: Any) -> str:
    """``"613 nodes (106 Reshape, 91 Mul, ...), 6.5M weights"`` for the export log."""
    ops = Counter(n.op_type for n in model.graph.node).most_common(4)
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    top = ", ".join(f"{c} {op}" for op, c in ops)
    return f"{len(model.graph.node)} nodes ({top}, ...), {weights / 1e6:.2f}M weights"
