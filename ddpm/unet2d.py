"""diffusers' ``UNet2DModel``, written natively: the network of a diffusers DDPM folder, with no diffusers at run time.

The DDPM UNet (Ho et al. 2020, appendix B) as diffusers lays it out: ``conv_in``; a sinusoidal (or learned)
embedding of t through ``time_embedding`` (Linear-SiLU-Linear); ``down_blocks`` of ``layers_per_block``
ResNet blocks (each followed by self-attention in the Attn* blocks) and a 2x downsampler except at the last
level; ``mid_block`` ResNet-[attention]-ResNet; ``up_blocks`` of ``layers_per_block + 1`` ResNet blocks, each
reading the matching down-path activation concatenated along channels, and a 2x upsampler except at the last
level; ``conv_norm_out`` -> SiLU -> ``conv_out``.

Module attribute names mirror diffusers' (``down_blocks.0.resnets.0.norm1.weight``,
``...attentions.0.to_q.weight``, ``mid_block.attentions.0.to_out.0.bias``, ``time_embedding.linear_1.weight``),
so a diffusers state dict loads by name, with no table (older checkpoints' attention names map by one rule:
``ddpm.diffusers_folder.rename_legacy_keys``). The config keys are diffusers' own names, ``arch`` = ``"unet2d"``
(ddpm/unet2d_config.py).

``model(x, t, y=None)``: x [N, in_channels, H, W] float32, t [N] int64 ORIGINAL timesteps, y [N] int64 classes in
0..num_class_embeds-1 for a class-conditional model (``class_embedding``, required there) -> [N, out_channels, H, W];
out_channels = 2 in_channels for learned-variance models (the prediction, then the variance interpolation v of
Nichol & Dhariwal 2021). Export notes as in ddpm/models.py: every Python branch depends on the config only, and
attention goes through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError
from .unet2d_config import DOWN_BLOCKS, UP_BLOCKS, normalize_unet2d_config

__all__ = ["UNet2D", "check_classes_arg"]

_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def check_classes_arg(conditional: bool, y: torch.Tensor | None) -> None:
    """y is required by a class-conditional network and refused by an unconditional one (this module's and
    ddpm/models.py's); the branch depends on the config only, so it traces away in an export."""
    if conditional and y is None:
        raise InvalidArgumentError(
            "this model is class-conditional: call it as model(x, t, y) with y [N] int64"
        )
    if not conditional and y is not None:
        raise InvalidArgumentError("this model is unconditional: call it as model(x, t), without y")


class Timesteps(nn.Module):
    """Sinusoidal embedding of t (DDPM's, as diffusers' ``get_timestep_embedding``): t [N] -> [N, dim].

    f_k = exp(-ln(10000) k / (dim/2 - freq_shift)), k < dim/2; cat(sin(t f), cos(t f)), or cat(cos, sin) when
    ``flip_sin_to_cos``; odd dims padded with one zero. No parameters: computed in forward, so exported graphs
    carry it."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> None:
        super().__init__()
        self.dim, self.flip, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        # Same order of float32 operations as diffusers, so the embeddings agree to the last bit or two.
        exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
        args = t[:, None].float() * torch.exp(exponent / (half - self.freq_shift))[None, :]
        parts = [torch.cos(args), torch.sin(args)] if self.flip else [torch.sin(args), torch.cos(args)]
        emb = torch.cat(parts, dim=-1)
        return F.pad(emb, (0, 1)) if self.dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2: [N, c_in] -> [N, dim]."""

    def __init__(self, c_in: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(c_in, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(emb)))


class ResnetBlock2D(nn.Module):
    """norm1-act-[resample]-conv1, + time projection (added, or as scale and shift after norm2), norm2-act-
    dropout-conv2, residual (1x1 ``conv_shortcut`` when channels change), divided by ``output_scale_factor``.

    [N, c_in, H, W], temb [N, E] -> [N, c_out, H', W']; ``resample`` "down" (2x2 average pool) / "up" (nearest
    x2) resizes both branches (the resnet down/upsamplers), None keeps H x W."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        temb: int,
        cfg: dict[str, Any],
        *,
        scale: float = 1.0,
        resample: str | None = None,
    ) -> None:
        super().__init__()
        groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
        self.scale_shift = cfg["resnet_time_scale_shift"] == "scale_shift"
        self.resample, self.output_scale_factor = resample, scale
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, 2 * c_out if self.scale_shift else c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.dropout = nn.Dropout(cfg["dropout"])
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nonlinearity = _ACTIVATIONS[cfg["act_fn"]]()
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self._resize(self.nonlinearity(self.norm1(x)))
        x = self._resize(x)
        h = self.conv1(h)
        emb = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(self.nonlinearity(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Attention(nn.Module):
    """Self-attention over the H*W positions, residual: [N, C, H, W] -> [N, C, H, W].

    heads = C // head_dim of width head_dim (inner width heads * head_dim), optional GroupNorm first, output
    divided by ``rescale_output_factor`` (the mid block's scale factor)."""

    def __init__(self, channels: int, head_dim: int, groups: int | None, eps: float, rescale: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.rescale_output_factor = channels // head_dim, head_dim, rescale
        inner = self.heads * head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups is not None else None
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        h = x if self.group_norm is None else self.group_norm(x)
        h = h.reshape(n, c, hgt * wid).transpose(1, 2)  # [N, HW, C]
        # [N, heads, HW, head_dim]; config-derived sizes only, so the reshape exports cleanly
        q, k, v = (
            p(h).reshape(n, hgt * wid, self.heads, self.head_dim).transpose(1, 2)
            for p in (self.to_q, self.to_k, self.to_v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(n, hgt * wid, self.heads * self.head_dim)
        out = self.to_out[1](self.to_out[0](out)).transpose(1, 2).reshape(n, c, hgt, wid)
        return (out + x) / self.rescale_output_factor


class Downsample2D(nn.Module):
    """Strided 3x3 conv: [N, C, H, W] -> [N, C, H/2, W/2]; padding 0 pads right/bottom by one first (the
    original DDPM's TensorFlow "SAME" padding)."""

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: [N, C, H, W] -> [N, C, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _head_dim(cfg: dict[str, Any], channels: int) -> int:
    # attention_head_dim None means one head over all channels (diffusers passes the channel count)
    return cfg["attention_head_dim"] or channels


class DownBlock(nn.Module):
    """One level of the down path: ``resnets`` (+ ``attentions``), then ``downsamplers`` unless it is the last.
    Returns the new h and the activations the up path reads (one per resnet, plus the downsampled one)."""

    def __init__(self, kind: str, c_in: int, c_out: int, temb: int, cfg: dict[str, Any], last: bool) -> None:
        super().__init__()
        attn, resampler = DOWN_BLOCKS[kind]
        resampler = cfg["downsample_type"] if resampler == "option" else resampler
        n, eps, groups = cfg["layers_per_block"], cfg["norm_eps"], cfg["norm_num_groups"]
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c_in if i == 0 else c_out, c_out, temb, cfg) for i in range(n)
        )
        heads = _head_dim(cfg, c_out)
        self.attentions = nn.ModuleList(Attention(c_out, heads, groups, eps, 1.0) for _ in range(n) if attn)
        if last:
            self.downsamplers = None
        elif resampler == "resnet":
            self.downsamplers = nn.ModuleList([ResnetBlock2D(c_out, c_out, temb, cfg, resample="down")])
        else:
            self.downsamplers = nn.ModuleList([Downsample2D(c_out, cfg["downsample_padding"])])

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        states = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if len(self.attentions):  # config-determined, not data-dependent
                h = self.attentions[i](h)
            states.append(h)
        if self.downsamplers is not None:
            down = self.downsamplers[0]
            h = down(h, temb) if isinstance(down, ResnetBlock2D) else down(h)
            states.append(h)
        return h, states


class UpBlock(nn.Module):
    """One level of the up path: ``layers_per_block + 1`` resnets, each on cat(h, skip) (+ attention), then
    ``upsamplers`` unless it is the last level."""

    def __init__(
        self, kind: str, c_prev: int, c_skip_last: int, c_out: int, temb: int, cfg: dict[str, Any], last: bool
    ) -> None:
        super().__init__()
        attn, resampler = UP_BLOCKS[kind]
        resampler = cfg["upsample_type"] if resampler == "option" else resampler
        n, eps, groups = cfg["layers_per_block"] + 1, cfg["norm_eps"], cfg["norm_num_groups"]
        # resnet i reads h (c_prev for the first, then c_out) and a skip (c_out, the last one the level below)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                (c_prev if i == 0 else c_out) + (c_skip_last if i == n - 1 else c_out), c_out, temb, cfg
            )
            for i in range(n)
        )
        heads = _head_dim(cfg, c_out)
        self.attentions = nn.ModuleList(Attention(c_out, heads, groups, eps, 1.0) for _ in range(n) if attn)
        if last:
            self.upsamplers = None
        elif resampler == "resnet":
            self.upsamplers = nn.ModuleList([ResnetBlock2D(c_out, c_out, temb, cfg, resample="up")])
        else:
            self.upsamplers = nn.ModuleList([Upsample2D(c_out)])

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips[-1 - i]], dim=1), temb)
            if len(self.attentions):
                h = self.attentions[i](h)
        if self.upsamplers is not None:
            up = self.upsamplers[0]
            h = up(h, temb) if isinstance(up, ResnetBlock2D) else up(h)
        return h


class MidBlock(nn.Module):
    """ResNet, [attention], ResNet at the lowest resolution, every output divided by ``mid_block_scale_factor``."""

    def __init__(self, c: int, temb: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        scale = cfg["mid_block_scale_factor"]
        self.resnets = nn.ModuleList(ResnetBlock2D(c, c, temb, cfg, scale=scale) for _ in range(2))
        groups = cfg["attn_norm_num_groups"]
        if (
            groups is None
        ):  # diffusers: the attention's GroupNorm exists only with the additive time embedding
            groups = cfg["norm_num_groups"] if cfg["resnet_time_scale_shift"] == "default" else None
        attn = Attention(c, _head_dim(cfg, c), groups, cfg["norm_eps"], scale)
        self.attentions = nn.ModuleList([attn] if cfg["add_attention"] else [])

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        if len(self.attentions):
            h = self.attentions[0](h)
        return self.resnets[1](h, temb)


class UNet2D(nn.Module):
    """diffusers' UNet2DModel from a ``unet2d`` config: x [N, C, H, W], t [N] int64 (y [N] int64 when it has
    ``num_class_embeds``) -> [N, out_channels, H, W]."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = normalize_unet2d_config(config)
        self.config = cfg
        ch = cfg["block_out_channels"]
        temb = cfg["time_embedding_dim"] or 4 * ch[0]
        self.center_input_sample = cfg["center_input_sample"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        if cfg["time_embedding_type"] == "learned":
            self.time_proj: nn.Module = nn.Embedding(cfg["num_train_timesteps"], ch[0])
        else:
            self.time_proj = Timesteps(ch[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        # diffusers' class_embed_type None + num_class_embeds K: a table of K rows added to the time embedding
        k = cfg.get("num_class_embeds")
        self.class_embedding = nn.Embedding(k, temb) if k else None
        levels = len(ch)
        self.down_blocks = nn.ModuleList(
            DownBlock(kind, ch[max(i - 1, 0)], ch[i], temb, cfg, last=i == levels - 1)
            for i, kind in enumerate(cfg["down_block_types"])
        )
        self.mid_block = MidBlock(ch[-1], temb, cfg) if cfg["mid_block_type"] else None
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(
                kind, rev[max(i - 1, 0)], rev[min(i + 1, levels - 1)], rev[i], temb, cfg, last=i == levels - 1
            )
            for i, kind in enumerate(cfg["up_block_types"])
        )
        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], ch[0], eps=cfg["norm_eps"])
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn says, as in diffusers
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_classes_arg(self.class_embedding is not None, y)
        if self.center_input_sample:
            x = 2 * x - 1.0
        temb = self.time_embedding(self.time_proj(t))
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(y)  # diffusers: emb = emb + class_emb
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, states = block(h, temb)
            skips += states
        if self.mid_block is not None:
            h = self.mid_block(h, temb)
        for block in self.up_blocks:
            k = len(block.resnets)
            h = block(h, skips[-k:], temb)
            skips = skips[:-k]
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))
