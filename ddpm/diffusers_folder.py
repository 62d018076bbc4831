"""A diffusers DDPM folder as one of our artifacts: the adapter at the edge (docs/design.md, "Artifacts").

Two layouts are read, with diffusers nowhere on the import path:

    pipeline folder   model_index.json, unet/ (config.json + weights), scheduler/scheduler_config.json,
                      optionally unet_ema/ (EMA weights)
    model folder      config.json + diffusion_pytorch_model.{safetensors,bin}; the scheduler config beside it
                      (scheduler_config.json), in ../scheduler/, or given explicitly (``scheduler_config=``)

:func:`read_folder` turns the two configs into our validated metadata (``ddpm.metadata``: arch "unet2d",
schedule, prediction, variance, recommended sampling, ``source``) without reading a tensor; :func:`load_folder`
adds the state dict in our module's names (ddpm/unet2d.py mirrors diffusers' names; the legacy attention names
of older checkpoints map by :func:`rename_legacy_keys`). Past this module everything sees only our artifact.

Weights: safetensors preferred (sharded ``*.safetensors.index.json`` too), ``.bin`` only through
``torch.load(weights_only=True)``; EMA weights when the folder holds both (``unet_ema/`` or the ``ema``
variant ``diffusion_pytorch_model.ema.safetensors``), and ``source.weights_kind`` says which were used.
JSON goes through ``ddpm.validate.loads_json`` (size and depth caps) and every failure is one ArtifactError
naming the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .diffusers_scheduler import scheduler_facts
from .errors import ArtifactError, InvalidArgumentError
from .metadata import FORMAT, validate_metadata
from .models import build_model, class_count, normalize_config, sample_shape
from .validate import MAX_JSON_BYTES, SchemaError, loads_json

__all__ = [
    "DiffusersFolder",
    "is_diffusers_folder",
    "read_folder",
    "load_folder",
    "fit_state_dict",
    "rename_legacy_keys",
]

MODEL_INDEX, CONFIG, SCHEDULER_CONFIG = "model_index.json", "config.json", "scheduler_config.json"
WEIGHTS = "diffusion_pytorch_model"
# Preference order of the weight files of one variant (None: the main weights, "ema": the EMA variant).
_FILES = (".safetensors", ".safetensors.index.json", ".bin")
# Pipeline components that make it a latent or text-conditioned model: its UNet does not denoise images.
_FOREIGN_COMPONENTS = ("vae", "vqvae", "text_encoder", "tokenizer", "image_encoder")
# Older diffusers checkpoints (the google/ddpm-* family) name the attention projections differently.
_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_keys(state: dict[str, Any]) -> dict[str, Any]:
    """``...attentions.K.{query,key,value,proj_attn}.*`` -> ``...attentions.K.{to_q,to_k,to_v,to_out.0}.*``;
    other keys unchanged (both generations store the projections as Linear weights of the same shape)."""
    out = {}
    for key, value in state.items():
        m = _LEGACY_ATTENTION.match(key)
        out[f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}" if m else key] = value
    return out


@dataclass(frozen=True)
class DiffusersFolder:
    """What :func:`read_folder` found: the validated metadata and the weight file it describes."""

    root: Path
    meta: dict[str, Any]
    weights: Path  # a .safetensors / .bin file, or a sharded checkpoint's index.json
    weights_kind: str  # "ema" | "main"


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """A folder holding ``model_index.json``, or a diffusers model's ``config.json`` (weights beside it, or a
    ``_class_name`` inside it), and not our own run folder (``model.safetensors``)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / MODEL_INDEX).is_file():
        return True
    if (p / "model.safetensors").exists() or not (p / CONFIG).is_file():
        return False
    if any(p.glob(f"{WEIGHTS}*")):
        return True
    # A diffusers config names its class; our trainer's run config.json does not. A too-big file is refused later.
    with open(p / CONFIG, "rb") as f:
        head = f.read(MAX_JSON_BYTES + 1)
    return len(head) > MAX_JSON_BYTES or b'"_class_name"' in head


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file ({what})")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ArtifactError(
            f"{path}: {what} is {size} bytes; a real one is a few KB (at most {MAX_JSON_BYTES})"
        )
    try:
        obj = loads_json(path.read_bytes(), what=what)
    except SchemaError as e:
        raise ArtifactError(f"{path}: {e}") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _variant(name: str, variant: str | None) -> str:
    """diffusers' variant names: ``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model.ema.safetensors``
    (the variant goes before the last suffix, ``...safetensors.index.ema.json`` for an index)."""
    if variant is None:
        return name
    stem, _, last = name.rpartition(".")
    return f"{stem}.{variant}.{last}"


def _weights_in(folder: Path, variant: str | None) -> Path | None:
    for suffix in _FILES:
        p = folder / _variant(WEIGHTS + suffix, variant)
        if p.is_file():
            return p
    return None


def _pick_weights(unet: Path, root: Path, pipeline: bool, which: str | None) -> tuple[Path, str]:
    """(file, "ema" | "main"): EMA weights when present unless ``which`` == "main"."""
    if which not in (None, "auto", "ema", "main"):
        raise InvalidArgumentError(f"--weights must be ema or main, got {which!r}")
    main = _weights_in(unet, None)
    ema = _weights_in(unet, "ema") or (_weights_in(root / "unet_ema", None) if pipeline else None)
    if which == "main" and main is None:
        raise ArtifactError(
            f"{unet}: no main weights ({WEIGHTS}.safetensors / .bin){' (EMA ones exist)' * bool(ema)}"
        )
    if which == "ema" and ema is None:
        raise ArtifactError(f"{unet}: no EMA weights ({WEIGHTS}.ema.safetensors or a unet_ema/ folder)")
    if ema is not None and which != "main":
        return ema, "ema"
    if main is None:
        raise ArtifactError(
            f"{unet}: no weights beside {CONFIG}: expected {WEIGHTS}.safetensors (or .bin, or a sharded "
            ".safetensors.index.json)"
        )
    return main, "main"


def _locate(root: Path, scheduler_config: str | os.PathLike | None) -> tuple[Path, Path, bool, dict]:
    """(unet folder, scheduler config file, is a pipeline, model_index) of a pipeline or model folder."""
    if (root / MODEL_INDEX).is_file():
        index = _read_json(root / MODEL_INDEX, "model_index.json")
        foreign = [c for c in _FOREIGN_COMPONENTS if c in index]
        if foreign:
            raise ArtifactError(
                f"{root / MODEL_INDEX}: the pipeline has a {foreign[0]} component: a latent or text-conditioned "
                "model is not supported (its UNet does not denoise images)"
            )
        entry = index.get("unet")
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == "UNet2DModel"):
            raise ArtifactError(
                f"{root / MODEL_INDEX}: unet is {entry!r:.80}; only a UNet2DModel is supported"
            )
        unet, sched, pipeline = root / "unet", root / "scheduler" / SCHEDULER_CONFIG, True
    else:
        index, unet, pipeline = {}, root, False
        found = [
            p for p in (root / SCHEDULER_CONFIG, root.parent / "scheduler" / SCHEDULER_CONFIG) if p.is_file()
        ]
        sched = found[0] if found else None
    if scheduler_config is not None:
        sched = Path(scheduler_config)
        sched = sched / SCHEDULER_CONFIG if sched.is_dir() else sched
    if sched is None or not sched.is_file():
        raise ArtifactError(
            f"{root}: no scheduler config ({SCHEDULER_CONFIG} beside {CONFIG} or in ../scheduler/); give one with "
            f"`ddpm import {root} --scheduler-config FILE`"
        )
    return unet, sched, pipeline, index


def read_folder(
    path: str | os.PathLike, *, scheduler_config: str | os.PathLike | None = None, weights: str | None = None
) -> DiffusersFolder:
    """The validated metadata of a diffusers folder and the weight file it uses (no tensor is read).

    ``weights``: None / "auto" (EMA when present), "ema" or "main". ArtifactError (one line, naming the file)
    for anything missing, malformed or unsupported."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a folder")
    unet, sched_path, pipeline, index = _locate(root, scheduler_config)
    config_path = unet / CONFIG
    unet_cfg = _read_json(config_path, "the UNet's config.json")
    if unet_cfg.get("_class_name") != "UNet2DModel":
        raise ArtifactError(
            f"{config_path}: _class_name {unet_cfg.get('_class_name')!r:.60} is not supported; only diffusers' "
            "UNet2DModel is (unconditional or with num_class_embeds; cross-attention / text-conditioned UNets are not)"
        )
    try:
        model = normalize_config(
            {"arch": "unet2d", **{k: v for k, v in unet_cfg.items() if not k.startswith("_")}}
        )
    except InvalidArgumentError as e:
        raise ArtifactError(f"{config_path}: {e}") from None
    sched = _read_json(sched_path, "the scheduler config")
    facts = scheduler_facts(sched, sched_path, model)
    file, kind = _pick_weights(unet, root, pipeline, weights)
    name = index.get("_name_or_path") or unet_cfg.get(
        "_name_or_path"
    )  # the hub id, when it was saved from one
    if not (isinstance(name, str) and 0 < len(name) <= 4096):
        name = f"diffusers:{root.resolve().name}"
    meta = {
        "format": FORMAT,
        "model": model,
        "sample_shape": sample_shape(model),
        "dataset": name,
        "step": 0,
        "ema_decay": None,
        **facts,
        **_classes(model),
        "source": {
            "format": "diffusers",
            "unet_class": "UNet2DModel",
            "scheduler_class": sched["_class_name"],
            "weights": file.relative_to(root).as_posix(),
            "weights_kind": kind,
            "diffusers_version": str(unet_cfg.get("_diffusers_version", "unknown"))[:64],
        },
    }
    validate_metadata(meta, source=str(root))
    return DiffusersFolder(root, meta, file, kind)


def _classes(model: dict[str, Any]) -> dict[str, Any]:
    """A ``num_class_embeds`` model's ``classes``: K classes, and no null class: nothing in a diffusers folder
    says whether it was trained with label dropout, nor which class would be the unconditional one, so guidance
    is refused for it (docs/design.md, "Conditional models")."""
    k = class_count(model)
    return {"classes": {"count": k, "null": None, "names": None, "p_uncond": None}} if k else {}


# ---- weights ----


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types; all mean "not readable"
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:120]})"
        ) from None


def _sharded(index_path: Path) -> dict[str, torch.Tensor]:
    index = _read_json(index_path, "the sharded checkpoint's index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ArtifactError(f"{index_path}: weight_map must map tensor names to shard file names")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard.startswith("."):  # shards live beside the index, nowhere else
            raise ArtifactError(f"{index_path}: shard name {shard!r:.80} is not a file name beside the index")
        tensors.update(_safetensors(index_path.parent / shard))
    if set(tensors) != set(weight_map):
        raise ArtifactError(f"{index_path}: the shards hold other tensors than weight_map lists")
    return tensors


def _pickled(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: tensors and plain containers only, no code runs while unpickling
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged or hostile file
        raise ArtifactError(
            f"{path}: not a readable weights file ({type(e).__name__}: {str(e)[:120]})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()
    ):
        raise ArtifactError(f"{path}: expected a dict of name -> tensor (a state dict)")
    return state


def load_folder(
    path: str | os.PathLike, *, scheduler_config: str | os.PathLike | None = None, weights: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, state_dict)``: :func:`read_folder`'s metadata and the weights in our module's names, float32,
    every key and shape checked against the network the metadata describes (ArtifactError naming the file)."""
    folder = read_folder(path, scheduler_config=scheduler_config, weights=weights)
    file = folder.weights
    if file.name.endswith(".index.json"):
        tensors = _sharded(file)
    else:
        tensors = _safetensors(file) if file.suffix == ".safetensors" else _pickled(file)
    return folder.meta, fit_state_dict(rename_legacy_keys(tensors), folder.meta["model"], source=str(file))


def fit_state_dict(
    tensors: dict[str, torch.Tensor], model: dict[str, Any], *, source: str
) -> dict[str, torch.Tensor]:
    """The tensors as float32, after checking that they are exactly the network's (names and shapes; the
    network is built on the meta device, so nothing is allocated for the check)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(model).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{source}: weights do not match the config (missing {missing[:3]}{'...' * (len(missing) > 3)}, "
            f"unexpected {unexpected[:3]}{'...' * (len(unexpected) > 3)})"
        )
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise ArtifactError(
                f"{source}: weights do not match the config: {k} is {list(tensors[k].shape)}, the config makes it "
                f"{list(shape)}"
            )
    out = {k: t.to(torch.float32).contiguous() for k, t in tensors.items()}
    bad = [k for k, t in out.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ArtifactError(f"{source}: weight {bad[0]} holds NaN or Inf values")
    return out
