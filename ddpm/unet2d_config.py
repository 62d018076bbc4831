"""The ``unet2d`` model config: diffusers' ``UNet2DModel`` options, in diffusers' names, checked and completed.

A key a ``config.json`` leaves out means what it means to diffusers (:data:`UNET2D_DEFAULTS`). Types, caps and
the parameter estimate are checked first (``ddpm.validate.check_model_config``: a hostile config is refused
before anything is allocated), then the geometry; anything the native network (ddpm/unet2d.py) does not build
exactly (cross-attention or unknown blocks, class embeddings other than a table of ``num_class_embeds`` classes,
Fourier time embeddings, unknown keys) is an InvalidArgumentError naming the field and its value.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidArgumentError
from .validate import check_model_config

__all__ = ["UNET2D_DEFAULTS", "DOWN_BLOCKS", "UP_BLOCKS", "normalize_unet2d_config", "unet2d_sample_shape"]

# diffusers' UNet2DModel.__init__ defaults: a key a config.json leaves out means what it means to diffusers.
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1.0,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "num_train_timesteps": None,
}
# block type -> (has attention, resampler): "option" = the config's downsample_type / upsample_type.
DOWN_BLOCKS = {
    "DownBlock2D": (False, "conv"),
    "AttnDownBlock2D": (True, "option"),
    "ResnetDownsampleBlock2D": (False, "resnet"),
}
UP_BLOCKS = {
    "UpBlock2D": (False, "conv"),
    "AttnUpBlock2D": (True, "option"),
    "ResnetUpsampleBlock2D": (False, "resnet"),
}
# diffusers' other class embeddings (a second timestep embedding of the label, a given embedding vector, a
# projection): they embed something other than a class index, so they are not built.
_CLASS_EMBED_TYPES = ("timestep", "identity", "projection", "simple_projection")


def unet2d_sample_shape(config: dict[str, Any]) -> list[int]:
    """[C, H, W] of one sample: ``sample_size`` is an int (square) or [H, W]."""
    size = config["sample_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return [config["in_channels"], h, w]


def _refuse(key: str, value: Any, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"model config {key} = {value!r:.80} is not supported: {why}")


def normalize_unet2d_config(config: dict[str, Any]) -> dict[str, Any]:
    """A ``unet2d`` config with diffusers' defaults filled in, types, caps and the parameter estimate checked
    (``ddpm.validate``), then the geometry; InvalidArgumentError naming the field and value otherwise."""
    cfg = {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if k != "arch"}}
    kind = cfg.pop("class_embed_type", None)
    if kind is not None:
        what = (
            "it embeds something other than a class index" if kind in _CLASS_EMBED_TYPES else "unknown type"
        )
        raise _refuse(
            "class_embed_type", kind, f"{what}; supported: null (a table of num_class_embeds classes)"
        )
    if cfg.get("num_class_embeds", 0) is None:  # left out = unconditional: the config stays as it was
        del cfg["num_class_embeds"]
    if cfg["time_embedding_type"] == "fourier":
        raise _refuse(
            "time_embedding_type", "fourier", "it embeds continuous noise levels (score-SDE models), not the "
            "integer timesteps of a DDPM; supported: positional, learned",
        )  # fmt: skip
    unknown = sorted(str(k) for k in set(cfg) - set(UNET2D_DEFAULTS) - {"num_class_embeds"})
    if unknown:
        raise InvalidArgumentError(
            f"model config has unknown key(s) {', '.join(unknown)[:200]}: they may change the network, so it is "
            "not built (the UNet2DModel options supported: ddpm/unet2d_config.py)"
        )
    for key, table in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        if isinstance(cfg[key], (list, tuple)):
            names = [b[7:] if isinstance(b, str) and b.startswith("UNetRes") else b for b in cfg[key]]
            cfg[key] = names
            bad = [(i, b) for i, b in enumerate(names) if b not in table]
            if bad:
                i, b = bad[0]
                hint = (
                    "; cross-attention (text-conditioned) blocks are not supported"
                    if "Cross" in str(b)
                    else ""
                )
                raise _refuse(f"{key}[{i}]", b, f"allowed: {', '.join(table)}{hint}")
    cfg = check_model_config({"arch": "unet2d", **cfg})
    _check_geometry(cfg)
    return cfg


def _check_geometry(cfg: dict[str, Any]) -> None:
    ch, levels = cfg["block_out_channels"], len(cfg["block_out_channels"])
    for key in ("down_block_types", "up_block_types"):
        if len(cfg[key]) != levels:
            raise InvalidArgumentError(
                f"model config {key} has {len(cfg[key])} entries but block_out_channels {ch} has {levels}"
            )
    if cfg["mid_block_type"] not in ("UNetMidBlock2D", None):
        raise _refuse("mid_block_type", cfg["mid_block_type"], "allowed: UNetMidBlock2D, null")
    if cfg["out_channels"] not in (cfg["in_channels"], 2 * cfg["in_channels"]):
        raise _refuse(
            "out_channels", cfg["out_channels"], f"a denoiser outputs in_channels ({cfg['in_channels']}), or twice "
            "that with a learned variance",
        )  # fmt: skip
    groups = cfg["norm_num_groups"]
    bad = [c for c in ch if c % groups]
    if bad:
        raise _refuse(
            "norm_num_groups", groups, f"it must divide every block_out_channels entry; {bad} do not"
        )
    attn_levels = [ch[i] for i, b in enumerate(cfg["down_block_types"]) if DOWN_BLOCKS[b][0]]
    attn_levels += [ch[::-1][i] for i, b in enumerate(cfg["up_block_types"]) if UP_BLOCKS[b][0]]
    if cfg["mid_block_type"] and cfg["add_attention"]:
        attn_levels.append(ch[-1])
        g = cfg["attn_norm_num_groups"]
        if g is not None and ch[-1] % g:
            raise _refuse("attn_norm_num_groups", g, f"it must divide the mid block's {ch[-1]} channels")
    head = cfg["attention_head_dim"]
    if head is not None and any(head > c for c in attn_levels):
        raise _refuse(
            "attention_head_dim", head, f"attention runs on {min(attn_levels)} channels, fewer than one head"
        )
    if cfg["time_embedding_type"] == "learned" and cfg["num_train_timesteps"] is None:
        raise _refuse("num_train_timesteps", None, "a learned time embedding needs its table size")
    if cfg["time_embedding_type"] == "positional" and ch[0] // 2 - cfg["freq_shift"] <= 0:
        raise _refuse(
            "freq_shift", cfg["freq_shift"], f"it must be below block_out_channels[0] / 2 = {ch[0] // 2}"
        )
    if cfg["sample_size"] is None:
        raise _refuse("sample_size", None, "the image size must be known to sample (set it in config.json)")
    step = 2 ** (levels - 1)
    if any(s % step for s in unet2d_sample_shape(cfg)[1:]):
        raise _refuse(
            "sample_size",
            cfg["sample_size"],
            f"the UNet downsamples {levels - 1} time(s) by 2; use a multiple of {step}",
        )
