"""Denoisers: the DDPM UNet (Ho et al. 2020, appendix B) for images and an MLP for 2-D / vector data.

Both are built from a plain config dict (``build_model``) that is stored in the checkpoint's metadata, so a
model is rebuilt from the file alone. ``model(x, t, y=None)``: x ``[N, *sample_shape]`` float32, t ``[N]`` int64
ORIGINAL timesteps -> output shaped like x (eps, x0 or v, depending on how it was trained). A UNet with
``num_classes`` K > 0 is class-conditional (docs/design.md, "Conditional models"): y ``[N]`` int64 in 0..K is
required, K being the null class; the MLP is unconditional.

Export notes: forward has no data-dependent Python control flow (every branch depends on the config only),
attention goes through ``F.scaled_dot_product_attention``, and the timestep embedding is computed from ``t``
inside forward with Cast / Exp / Sin / Cos, so ONNX graphs carry it and the caller feeds raw int64 timesteps.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError
from .unet2d import UNet2D, check_classes_arg
from .unet2d_config import normalize_unet2d_config, unet2d_sample_shape
from .validate import check_model_config

__all__ = [
    "PRESETS",
    "UNet",
    "MLPDenoiser",
    "build_model",
    "preset_config",
    "normalize_config",
    "count_params",
]
__all__ += ["class_count", "check_classes_arg"]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (DDPM's get_timestep_embedding, Transformer positions).

    t: [N] int64 -> [N, dim] float32: cat(sin(t * f_k), cos(t * f_k)), f_k = 10000^(-k / (half - 1)).
    """
    half = dim // 2
    # Frequencies built from arange + exp in forward: exported graphs compute them (constant-folded), the
    # checkpoint holds no buffer for them.
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(k * (-math.log(10000.0) / max(half - 1, 1)))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 even under bf16 autocast (improved-diffusion's GroupNorm32): the
    statistics of large activations lose too much in bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    # Residual branches and the output start at zero, so a fresh network is the identity on its skips
    # (DDPM initialises these with scale 1e-10; improved-diffusion's zero_module).
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding projection, GroupNorm-SiLU-dropout-conv; 1x1 conv on the skip
    when the channel count changes. [N, C_in, H, W], temb [N, E] -> [N, C_out, H, W]."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm32(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = GroupNorm32(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions (tokens split along channels, as in DDPM), residual.
    [N, C, H, W] -> [N, C, H, W]."""

    def __init__(self, channels: int, groups: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise InvalidArgumentError(f"num_heads {num_heads} must divide the channel count {channels}")
        self.num_heads = num_heads
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(n, 3, heads, c // heads, h * w)
        # [N, heads, HW, d] for SDPA; the reshape uses config-derived sizes only, so it exports cleanly.
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Strided 3x3 conv: [N, C, H, W] -> [N, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: [N, C, H, W] -> [N, C, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The DDPM UNet. x [N, in_channels, image_size, image_size], t [N] int64 (and y [N] int64 in 0..K when
    ``num_classes`` K > 0: the class, K the null class) -> [N, out_channels, S, S].

    Levels i = 0..L-1 with ``base_channels * channel_mult[i]`` channels, ``num_res_blocks`` ResBlocks each
    (attention after each one at the resolutions in ``attention_resolutions``), strided-conv downsampling
    between levels; middle ResBlock-Attn-ResBlock; the up path mirrors it with ``num_res_blocks + 1``
    ResBlocks per level, each taking the matching down-path activation concatenated along channels.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = normalize_config(config)
        self.config = cfg
        ch, mult, nres = cfg["base_channels"], cfg["channel_mult"], cfg["num_res_blocks"]
        groups, drop, heads = cfg["groups"], cfg["dropout"], cfg["num_heads"]
        attn_res = set(cfg["attention_resolutions"])
        temb_dim = 4 * ch
        self.temb_in = ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        # K classes and the null class K (label dropout trains it: the unconditional model of guidance), ADM's
        # label_emb: its row is added to the time embedding. Absent for K = 0, so the keys stay the same.
        k = cfg.get("num_classes", 0)
        self.class_emb = nn.Embedding(k + 1, temb_dim) if k else None
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch, 3, padding=1)

        res = cfg["image_size"]
        skip_ch = [ch]
        cur = ch
        self.down = nn.ModuleList()
        for level, m in enumerate(mult):
            for _ in range(nres):
                blocks = [ResBlock(cur, ch * m, temb_dim, drop, groups)]
                cur = ch * m
                if res in attn_res:
                    blocks.append(AttnBlock(cur, groups, heads))
                self.down.append(nn.ModuleList(blocks))
                skip_ch.append(cur)
            if level != len(mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                res //= 2
                skip_ch.append(cur)

        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, temb_dim, drop, groups),
                AttnBlock(cur, groups, heads),
                ResBlock(cur, cur, temb_dim, drop, groups),
            ]
        )

        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for _ in range(nres + 1):
                blocks = [ResBlock(cur + skip_ch.pop(), ch * m, temb_dim, drop, groups)]
                cur = ch * m
                if res in attn_res:
                    blocks.append(AttnBlock(cur, groups, heads))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res *= 2

        self.norm_out = GroupNorm32(groups, cur)
        self.conv_out = _zero(nn.Conv2d(cur, cfg["out_channels"], 3, padding=1))

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for b in blocks:
            h = b(h, temb) if isinstance(b, ResBlock) else b(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_classes_arg(self.class_emb is not None, y)
        temb = self.temb(timestep_embedding(t, self.temb_in))
        if self.class_emb is not None:
            temb = temb + self.class_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, temb)
            hs.append(h)
        h = self._run(self.mid, h, temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):  # config-determined, not data-dependent
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


class MLPDenoiser(nn.Module):
    """Residual MLP for vector data (seed 003's swiss roll): x [N, dim], t [N] int64 -> [N, dim].

    h = in(x) + time_mlp(emb(t)); ``depth`` blocks h += W2 SiLU(W1 LN(h) + Wt temb); out = W SiLU(LN(h)).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = normalize_config(config)
        self.config = cfg
        dim, hid, tdim = cfg["dim"], cfg["hidden"], cfg["time_dim"]
        self.time_dim = tdim
        self.temb = nn.Sequential(nn.Linear(tdim, hid), nn.SiLU(), nn.Linear(hid, hid))
        self.inp = nn.Linear(dim, hid)
        self.blocks = nn.ModuleList()
        for _ in range(cfg["depth"]):
            self.blocks.append(
                nn.ModuleDict(
                    {
                        "norm": nn.LayerNorm(hid),
                        "fc1": nn.Linear(hid, hid),
                        "tproj": nn.Linear(hid, hid),
                        "fc2": nn.Linear(hid, hid),
                    }
                )
            )
        self.norm_out = nn.LayerNorm(hid)
        self.out = nn.Linear(hid, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_classes_arg(False, y)
        temb = F.silu(self.temb(timestep_embedding(t, self.time_dim)))
        h = self.inp(x)
        for b in self.blocks:
            h = h + b["fc2"](F.silu(b["fc1"](b["norm"](h)) + b["tproj"](temb)))
        return self.out(F.silu(self.norm_out(h)))


# ---- configs ----

_UNET_DEFAULTS: dict[str, Any] = {
    "base_channels": 128,
    "channel_mult": [1, 2, 2, 2],
    "num_res_blocks": 2,
    "attention_resolutions": [16],
    "dropout": 0.1,
    "groups": 32,
    "num_heads": 1,
}
_MLP_DEFAULTS: dict[str, Any] = {"dim": 2, "hidden": 128, "time_dim": 64, "depth": 3}

# name -> config with the default sample geometry. preset_config puts attention at image_size // 2 (the
# second level): the paper's 16x16 for CIFAR-10, and a preset stays valid when --image-size changes.
PRESETS: dict[str, dict[str, Any]] = {
    # Sized for the 8x8 digits on a 2-core CPU: 0.7M parameters, one ResBlock per level.
    "tiny": {"arch": "unet", "in_channels": 1, "image_size": 8, "base_channels": 32, "channel_mult": [1, 2],
             "num_res_blocks": 1, "dropout": 0.0, "groups": 8},
    # 17-32 px on a CPU: 2.5M parameters, three levels, one ResBlock each
    "small": {"arch": "unet", "in_channels": 3, "image_size": 32, "base_channels": 48, "channel_mult": [1, 2, 2],
              "num_res_blocks": 1, "dropout": 0.0, "groups": 16},
    "mnist": {"arch": "unet", "in_channels": 1, "image_size": 28, "base_channels": 64, "channel_mult": [1, 2, 2],
              "num_res_blocks": 2, "dropout": 0.1, "groups": 32},
    "cifar10": {"arch": "unet", "in_channels": 3, "image_size": 32, "base_channels": 128,
                "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2, "dropout": 0.1, "groups": 32},
    "mlp": {"arch": "mlp", "dim": 2, "hidden": 128, "time_dim": 64, "depth": 3},
}  # fmt: skip


def preset_config(
    name: str,
    *,
    in_channels: int | None = None,
    image_size: int | None = None,
    dim: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A full model config from a preset name (``tiny``, ``mnist``, ``cifar10``, ``mlp``), with the sample
    geometry (``in_channels``/``image_size`` for UNets, ``dim`` for the MLP) and any other key overridden."""
    if name not in PRESETS:
        raise InvalidArgumentError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name])
    if cfg["arch"] == "unet":
        if dim is not None:
            raise InvalidArgumentError(f"preset {name!r} is an image UNet; give in_channels/image_size")
        cfg["in_channels"] = cfg["in_channels"] if in_channels is None else in_channels
        cfg["image_size"] = cfg["image_size"] if image_size is None else image_size
        cfg.setdefault("attention_resolutions", [max(int(cfg["image_size"]) // 2, 1)])
    else:
        if in_channels is not None or image_size is not None:
            raise InvalidArgumentError(f"preset {name!r} is for vectors; it takes dim, not image geometry")
        cfg["dim"] = cfg["dim"] if dim is None else dim
    cfg.update(overrides)
    return normalize_config(cfg)


def normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a model config and fill defaults; the result is JSON-able and complete (what checkpoints store).

    Types and size caps are checked first (``ddpm.validate.check_model_config``), so a config read from a file
    never allocates more than a real network would. ``unet2d`` (diffusers' UNet2DModel): ddpm/unet2d.py."""
    if not isinstance(config, dict) or config.get("arch") not in ("unet", "mlp", "unet2d"):
        raise InvalidArgumentError(f"model config needs arch 'unet' or 'mlp' or 'unet2d', got {config!r:.90}")
    if config["arch"] == "unet2d":
        return normalize_unet2d_config(config)
    if config["arch"] == "mlp":
        cfg = {**_MLP_DEFAULTS, **config}
        unknown = set(cfg) - set(_MLP_DEFAULTS) - {"arch", "num_classes"}
        check_model_config(cfg)
        if cfg.pop("num_classes", 0):
            raise InvalidArgumentError("the MLP denoiser is unconditional: num_classes must be 0")
    else:
        cfg = {**_UNET_DEFAULTS, **config}
        size = config.get("image_size")
        if "attention_resolutions" not in config and type(size) is int and size > 0:
            # as preset_config: the first downsampled level
            cfg["attention_resolutions"] = [max(size // 2, 1)]
        cfg.setdefault("out_channels", cfg.get("in_channels"))
        unknown = set(cfg) - set(_UNET_DEFAULTS) - {"arch", "in_channels", "image_size", "out_channels"}
        unknown.discard("num_classes")
        check_model_config(cfg)
        if not cfg.get("num_classes", 1):  # 0 = unconditional: left out, so such configs stay as they were
            del cfg["num_classes"]
        cfg["channel_mult"] = list(cfg["channel_mult"])
        cfg["attention_resolutions"] = sorted(set(cfg["attention_resolutions"]), reverse=True)
        cfg["dropout"] = float(cfg["dropout"])
        _check_unet_geometry(cfg)
    if unknown:
        raise InvalidArgumentError(f"model config has unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    return cfg


def _check_unet_geometry(cfg: dict[str, Any]) -> None:
    mult = cfg["channel_mult"]
    if not mult or any(m < 1 for m in mult):
        raise InvalidArgumentError(f"channel_mult must be a non-empty list of positive ints, got {mult}")
    if not (0.0 <= cfg["dropout"] < 1.0):
        raise InvalidArgumentError(f"dropout must be in [0, 1), got {cfg['dropout']}")
    size, downs = cfg["image_size"], len(mult) - 1
    if size % (2**downs):
        raise InvalidArgumentError(
            f"image size {size} is not divisible by {2**downs}: the UNet (channel_mult {mult}) downsamples "
            f"{downs} time(s) by 2; use a multiple of {2**downs}"
        )
    widths = {cfg["base_channels"] * m for m in mult} | {cfg["base_channels"]}
    bad = sorted(w for w in widths if w % cfg["groups"])
    if bad:
        raise InvalidArgumentError(
            f"GroupNorm groups {cfg['groups']} must divide every channel count; {bad} do not"
        )
    resolutions = [size // 2**i for i in range(len(mult))]
    missing = [r for r in cfg["attention_resolutions"] if r not in resolutions]
    if missing:
        raise InvalidArgumentError(
            f"attention resolution(s) {missing} never occur; this UNet's resolutions are {resolutions}"
        )


def build_model(config: dict[str, Any]) -> nn.Module:
    """The network for a config (``arch`` unet | mlp | unet2d); ``model.config`` is the full config."""
    cfg = normalize_config(config)
    return {"unet": UNet, "mlp": MLPDenoiser, "unet2d": UNet2D}[cfg["arch"]](cfg)


def sample_shape(config: dict[str, Any]) -> list[int]:
    """One sample's shape for a model config: [C, H, W] for a UNet, [dim] for the MLP."""
    if config["arch"] == "unet2d":
        return unet2d_sample_shape(config)
    if config["arch"] == "unet":
        return [config["in_channels"], config["image_size"], config["image_size"]]
    return [config["dim"]]


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def class_count(config: dict[str, Any]) -> int:
    """K, the classes a (normalized) model config is conditioned on: ``num_classes`` (unet; its table has the
    null class K too), ``num_class_embeds`` (unet2d, diffusers' table of K rows); 0 = unconditional."""
    return int(config.get("num_classes") or config.get("num_class_embeds") or 0)
