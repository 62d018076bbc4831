"""Hostile artifacts for tests/test_hostile.py and tests/test_fuzz.py: valid files with one thing edited.

Every builder writes a small file from scratch (no export, no training), so a fuzz example costs milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.artifacts import sidecar_path
from ddpm.cli import main
from ddpm.metadata import FORMAT, encode_metadata
from ddpm.schedule import Schedule

MLP = {"arch": "mlp", "dim": 2, "hidden": 8, "time_dim": 4, "depth": 1}


def valid_meta(**over: Any) -> dict[str, Any]:
    meta = {
        "format": FORMAT,
        "model": dict(MLP),
        "schedule": Schedule.linear(50).config,
        "prediction": "eps",
        "sample_shape": [2],
        "dataset": "toy",
        "step": 3,
        "ema_decay": None,
    }
    meta.update(over)
    return meta


def raw_strings(**over: Any) -> dict[str, str]:
    """The on-disk ``str -> str`` map of a valid artifact, with keys replaced by raw (unvalidated) strings."""
    strings = encode_metadata(valid_meta())
    strings.update(over)
    return strings


def write_checkpoint(path: Path, strings: dict[str, str]) -> Path:
    """A safetensors file with ``strings`` as its metadata (weights: the MLP's, zeros)."""
    import torch
    from safetensors.torch import save_file

    from ddpm.models import build_model

    tensors = {k: torch.zeros_like(v) for k, v in build_model(MLP).state_dict().items()}
    save_file(tensors, str(path), metadata=strings)
    return path


def write_onnx(path: Path, strings: dict[str, str], *, output: str = "same") -> Path:
    """A tiny ONNX denoiser x [N, 2], t [N] -> y, with ``strings`` as metadata_props.

    ``output``: same (y = x), wider ([N, 4]), narrower ([N, 1]), batch2 ([2N, 2]) or float64.
    """
    import onnx
    from onnx import TensorProto, helper

    nodes = {
        "same": [helper.make_node("Identity", ["x"], ["y"])],
        "wider": [helper.make_node("Concat", ["x", "x"], ["y"], axis=1)],
        "narrower": [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=1, axes=[1])],
        "batch2": [helper.make_node("Concat", ["x", "x"], ["y"], axis=0)],
        "float64": [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)],
    }[output]
    out_type = TensorProto.DOUBLE if output == "float64" else TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("t", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("y", out_type, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)
    for k, v in strings.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def write_engine(path: Path, **over: Any) -> Path:
    """Fake engine bytes plus a sidecar built by the exporter's own code, with keys replaced by ``over``."""
    from ddpm.export.tensorrt_build import BatchProfile, make_sidecar

    engine = bytes(range(256)) * 4
    path.write_bytes(engine)
    side = make_sidecar(
        valid_meta(),
        engine=engine,
        trt_version="10.9.0.34",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        precision="fp16",
        profile=BatchProfile(1, 8, 64),
    )
    side.update(over)
    sidecar_path(path).write_text(json.dumps(side))
    return path


def cli(args: list[str], capsys) -> tuple[int, str]:
    """``main(args)`` -> (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *, expect: int = 2, match: str | None = None) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == expect, (code, err)
    assert "Traceback" not in err, err
    if expect != 0:
        assert len(lines) == 1, err
    if match is not None:
        assert match in err, err


def leftovers(folder: Path) -> list[str]:
    """Temp files our writers might leave behind."""
    return sorted(p.name for p in folder.rglob("*.tmp"))


def npz_rows(path: Path) -> np.ndarray:
    with np.load(path) as f:
        return f["arr_0"]
