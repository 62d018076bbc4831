"""The trainer's run state: the resume point (``train_state.pt``) and the run folder checks.

Checkpoints themselves (``save_checkpoint``, ``load_model``, ``read_checkpoint_metadata``) live in the core,
``ddpm.checkpoint``, so that ``ddpm import`` writes the same format; they are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from ddpm.checkpoint import (
    CHECKPOINT_NAME,
    load_model,
    read_checkpoint_metadata,
    resolve_checkpoint,
    save_checkpoint,
)
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.io import atomic_path, check_free_space
from ddpm.validate import MAX_JSON_BYTES, Int, ListOf, Record, SchemaError, Str, check, loads_json

__all__ = [
    "CHECKPOINT_NAME",
    "STATE_NAME",
    "STATE_VERSION",
    "save_checkpoint",
    "save_train_state",
    "load_train_state",
    "check_optimizer_state",
    "check_run_folder",
    "load_model",
    "read_checkpoint_metadata",
    "resolve_checkpoint",
]

STATE_NAME = "train_state.pt"
STATE_VERSION = 1


def check_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Fail before any work when the run folder cannot be written, or holds a run that neither ``resume`` nor
    ``overwrite`` allows to replace: a run's model and resume point are never replaced silently."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InvalidArgumentError(f"--out {str(out)!r}: {str(probe)!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"--out {str(out)!r}: folder {str(probe)!r} is not writable")
    held = [name for name in (CHECKPOINT_NAME, STATE_NAME) if (out / name).exists()]
    if held and not (resume or overwrite):
        raise InvalidArgumentError(
            f"--out {str(out)!r} already holds a run ({', '.join(held)}); pass --resume to continue it, "
            "--overwrite to replace it, or another --out"
        )


def save_train_state(path: str | os.PathLike, blob: dict[str, Any]) -> None:
    """Write the resume point atomically; a full disk is one ArtifactError, the previous state kept."""
    weights = sum(t.numel() * t.element_size() for t in blob["model"].values())
    check_free_space(path, 4 * weights + (1 << 20), what="training state")  # model, EMA, two AdamW moments
    with atomic_path(path, what="training state") as tmp:
        try:
            torch.save(blob, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (ENOSPC) as RuntimeError
            raise ArtifactError(
                f"{path}: cannot write the training state ({' '.join(str(e).split())[:160]})"
            ) from None


class _Tensors:
    """A dict of name -> tensor (a state_dict), at most ``max_items`` entries."""

    def __init__(self, max_items: int = 1 << 16) -> None:
        self.max_items = max_items

    def check(self, v: Any, path: str) -> dict:
        ok = isinstance(v, dict) and len(v) <= self.max_items
        if not ok or not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()):
            raise SchemaError(f"{path} must be a dict of name -> tensor, got {type(v).__name__}")
        return v


class _Losses:
    def check(self, v: Any, path: str) -> torch.Tensor:
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
            raise SchemaError(f"{path} must be a 1-D float tensor, got {type(v).__name__}")
        return v


class _AdamState:
    """optimizer.state: param index -> {name: tensor}."""

    def check(self, v: Any, path: str) -> dict:
        ok = (
            isinstance(v, dict)
            and len(v) <= 1 << 16
            and all(
                isinstance(k, int)
                and isinstance(d, dict)
                and all(isinstance(t, torch.Tensor) for t in d.values())
                for k, d in v.items()
            )
        )
        if not ok:
            raise SchemaError(f"{path} must map parameter indices to dicts of tensors")
        return v


_STATE_SPEC = Record(
    {
        "version": Int(STATE_VERSION, STATE_VERSION),
        "step": Int(0, 2**62),
        "model": _Tensors(),
        "ema": _Tensors(),
        "optimizer": Record({"state": _AdamState(), "param_groups": ListOf(Record({}, extra=True), 1, 1024)}),
        "losses": _Losses(),
        "trajectory": Str(max_len=MAX_JSON_BYTES),
    },
    extra=True,
)


def load_train_state(
    path: Path, *, trajectory: dict[str, Any], iters: int, defaults: Collection[str] = ()
) -> dict[str, Any]:
    """The validated resume point of a run: every field type-checked before any is used; the run's options
    (``trajectory``) must match the saved ones and the saved step must be below ``iters``.

    ``defaults`` names the options that were not given but filled in (preset, LR, warm-up ...): those take the
    saved run's values, returned in ``state["inherited"]``, so resuming on another device or with another
    ``--iters`` continues the run that was saved rather than failing on a default that now differs."""
    if not path.is_file():
        raise ArtifactError(f"--resume: no training state {str(path)!r} (run without --resume to start)")
    try:
        # weights_only=True: only tensors and plain containers are unpickled; no code can run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise ArtifactError(f"{path}: corrupt training state ({type(e).__name__}: {str(e)[:120]})") from None
    keys = ("version", "step", "model", "ema", "optimizer", "losses", "trajectory")
    if not isinstance(state, dict) or not set(keys) <= set(state):
        raise ArtifactError(
            f"{path}: not a ddpm training state (version {STATE_VERSION} with keys {sorted(keys)})"
        )
    try:
        check(_STATE_SPEC, state, "state")
        saved = loads_json(state["trajectory"], what="state.trajectory")
        if not isinstance(saved, dict):
            raise SchemaError(f"state.trajectory must be a JSON object, got {type(saved).__name__}")
        if state["losses"].numel() != state["step"]:
            raise SchemaError(f"state.losses holds {state['losses'].numel()} values for step {state['step']}")
    except SchemaError as e:
        raise ArtifactError(f"{path}: not a valid ddpm training state: {e}") from None
    inherited = {k: saved[k] for k in defaults if k in saved and saved[k] != trajectory.get(k)}
    trajectory = {**trajectory, **inherited}
    state["inherited"] = inherited
    diff = [k for k in sorted(set(saved) | set(trajectory)) if saved.get(k) != trajectory.get(k)]
    if diff:
        k = diff[0]
        raise InvalidArgumentError(
            f"--resume: option {k} = {trajectory.get(k)!r} differs from the run's {saved.get(k)!r} ({path}); "
            "resume with the run's options (see config.json)"
        )
    if state["step"] >= iters:
        raise InvalidArgumentError(
            f"--resume: the run is already at step {state['step']}; pass --iters above it"
        )
    return state


def check_optimizer_state(opt: torch.optim.Optimizer, source: Path) -> None:
    """After ``load_state_dict``: every moment tensor has its parameter's shape (else AdamW fails mid-run)."""
    for group in opt.param_groups:
        for p in group["params"]:
            for name, t in opt.state.get(p, {}).items():
                if not isinstance(t, torch.Tensor) or (t.dim() and t.shape != p.shape):
                    raise ArtifactError(
                        f"{source}: optimizer state {name!r} does not fit its parameter {list(p.shape)}"
                    )
