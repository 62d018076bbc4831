"""Tiny artifacts for the runtime tests: checkpoints written by the trainer's code, ONNX files by the exporter's.

Weights are random (fresh on every run, not seeded) and the zero-initialised output layers are perturbed, so the
networks compute something non-trivial; what the tests check must hold for any weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ddpm.models import build_model, preset_config
from ddpm.schedule import Schedule
from ddpm.trainer.checkpoint import save_checkpoint

CONFIGS = {
    "mlp": lambda: preset_config("mlp", hidden=32, time_dim=16, depth=2),
    "unet": lambda: preset_config("tiny", base_channels=8, groups=4, num_res_blocks=1),
}


def export_onnx(ckpt: Path, out: Path) -> Path:
    """The project's exporter, as ``ddpm export --ckpt CKPT --out unet.onnx`` runs it (parity-checked)."""
    from ddpm.export.pipeline import export

    export(ckpt, out)
    return out


def make_checkpoint(folder: Path, kind: str, *, prediction: str = "eps", scale: float = 0.05) -> Path:
    model = build_model(CONFIGS[kind]())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    meta = {"schedule": Schedule.linear(1000).config, "prediction": prediction, "dataset": "test", "step": 0}
    return save_checkpoint(folder / f"{kind}.safetensors", model, meta)


_CACHE: dict[str, dict[str, tuple[Path, Path]]] = {}


def make_artifacts(folder: Path) -> dict[str, tuple[Path, Path]]:
    """{"mlp": (checkpoint, onnx), "unet": (checkpoint, onnx)}: [2] points and [1, 8, 8] images."""
    out = {}
    for kind in CONFIGS:
        ckpt = make_checkpoint(folder, kind)
        out[kind] = (ckpt, export_onnx(ckpt, folder / f"{kind}.onnx"))
    return out


def shared_root(tmp_path_factory) -> Path:
    """Where the artifacts built once per session are kept: ``DDPM_TEST_SHARED`` when set (`make test` sets one
    folder for both of its pytest runs, so the serial run reuses the first run's exports), else the folder above
    the xdist workers' own temp folders (shared by the workers of this session), else this session's temp folder."""
    if os.environ.get("DDPM_TEST_SHARED"):
        return Path(os.environ["DDPM_TEST_SHARED"])
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """``shared_root/name``, filled by ``build(folder)`` the first time any process of the session asks (a file
    lock lets one of them build; a ``done`` marker tells the others it is complete)."""
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / "done").exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            (folder / "done").touch()
    return folder


def shared_artifacts(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """One set per test session (the ONNX export takes seconds): the runtime test files share it read-only.

    Under pytest-xdist every worker uses the one set the first of them made (:func:`built_once`)."""
    if "art" not in _CACHE:
        folder = built_once(tmp_path_factory, "runtime_artifacts", make_artifacts)
        _CACHE["art"] = {kind: (folder / f"{kind}.safetensors", folder / f"{kind}.onnx") for kind in CONFIGS}
    return _CACHE["art"]
