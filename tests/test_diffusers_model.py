"""ddpm/unet2d.py against diffusers' own UNet2DModel: the same state dict, fresh random x and t, every option.

Tolerance: max |ours - diffusers| / max |diffusers| <= 1e-4 (normwise, as export/parity.py). Both sides compute
in float32 with the same operators in the same order except for summation order inside convolutions and
attention; measured ~1e-6 over the sweep (the cifar10 geometry included), so 1e-4 leaves a 50x margin while a
wrong layer, a missing norm or a mis-wired skip shows up at 1e-2..1. Weights are perturbed randomly, the zero /
one initialised ones too (GroupNorm affine, biases), so every parameter matters to the output.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the network: models are built locally

import numpy as np
import pytest
import torch

from ddpm.diffusers_folder import rename_legacy_keys
from ddpm.errors import InvalidArgumentError
from ddpm.models import build_model, normalize_config
from ddpm.validate import estimate_params

diffusers = pytest.importorskip("diffusers")  # the oracle only: nothing in ddpm imports it

TOL = 1e-4
BASE = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
ATTN = {"down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D"] * 2}
RESNET = {
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "ResnetUpsampleBlock2D"],
}
# Small configs, one option (or one interaction) each; the last ones are the channel / size / variance sweep.
CONFIGS = {
    "defaults": {},
    "ddpm_legacy_style": {
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "downsample_padding": 0,
        "norm_eps": 1e-6,
    },
    "one_head": {"attention_head_dim": None},
    "head_dim_not_dividing": {"attention_head_dim": 12},  # 32 channels -> 2 heads of 12, inner width 24
    "scale_shift": {"resnet_time_scale_shift": "scale_shift"},  # the mid attention then has no GroupNorm
    "scale_shift_attn_groups": {"resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 4},
    "attn_norm_groups": {"attn_norm_num_groups": 2},
    "resnet_samplers": {**ATTN, "downsample_type": "resnet", "upsample_type": "resnet"},
    "resnet_blocks": RESNET,
    "unetres_prefix": {"down_block_types": ["UNetResDownBlock2D", "AttnDownBlock2D"]},
    "learned_time": {"time_embedding_type": "learned", "num_train_timesteps": 100},
    "time_embedding_dim": {"time_embedding_dim": 40},
    "no_mid_attention": {"add_attention": False},
    "no_mid_block": {"mid_block_type": None},
    "center_scale": {"center_input_sample": True, "mid_block_scale_factor": 2**0.5},
    "dropout_eval": {"dropout": 0.1},
    "act_swish": {"act_fn": "swish"},
    "act_mish": {"act_fn": "mish"},
    "act_gelu": {"act_fn": "gelu"},
    "act_relu": {"act_fn": "relu"},
    "three_levels_2_layers": {
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    },
    "one_channel_32px": {"in_channels": 1, "out_channels": 1, "sample_size": 32},
    "two_channels": {"in_channels": 2, "out_channels": 2},
    "four_channels_learned_variance": {"in_channels": 4, "out_channels": 8},
    "learned_variance": {"out_channels": 6},
    "rectangular_64px": {"sample_size": [16, 64], "in_channels": 1, "out_channels": 2},
}
# Two configs that switch on every branch at once: exported to ONNX and run in onnxruntime.
KITCHEN_SINK = {
    "attn_resnet_learned": {
        **ATTN,
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "resnet_time_scale_shift": "scale_shift",
        "attn_norm_num_groups": 4,
        "time_embedding_type": "learned",
        "num_train_timesteps": 1000,
        "out_channels": 6,
        "center_input_sample": True,
        "mid_block_scale_factor": 2**0.5,
        "act_fn": "mish",
    },
    "resnet_conv_legacy": {
        **RESNET,
        "up_block_types": ["UpBlock2D", "ResnetUpsampleBlock2D"],
        "down_block_types": ["ResnetDownsampleBlock2D", "DownBlock2D"],
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "attention_head_dim": None,
        "sample_size": [16, 32],
        "in_channels": 1,
        "out_channels": 1,
    },
}
# google/ddpm-cifar10-32's unet/config.json (the DDPM paper's CIFAR-10 network, 35.7M parameters).
CIFAR10 = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "attention_head_dim": None,
    "act_fn": "silu",
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
    "time_embedding_type": "positional",
}


def diffusers_unet(config: dict, gen: torch.Generator) -> torch.nn.Module:
    """diffusers' UNet2DModel for ``config`` with every parameter randomly perturbed (zeros and ones included)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ref = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            scale = 0.5 * float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.1
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return ref


def ours_from(ref: torch.nn.Module, config: dict, state: dict | None = None) -> torch.nn.Module:
    model = build_model({"arch": "unet2d", **config}).eval()
    model.load_state_dict(
        ref.state_dict() if state is None else state, strict=True
    )  # names mirror diffusers'
    return model


def inputs(config: dict, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    size = config.get("sample_size")
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(batch, config.get("in_channels", 3), h, w, generator=gen)
    t = torch.randint(0, config.get("num_train_timesteps") or 1000, (batch,), generator=gen)
    return x, t


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == torch.float32
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def check(
    ref: torch.nn.Module, ours: torch.nn.Module, config: dict, gen: torch.Generator, batch: int = 3
) -> float:
    x, t = inputs(config, batch, gen)
    with torch.no_grad():
        want = ref(x, t).sample
        got = ours(x, t)
    assert want.abs().max() > 1e-3  # not a vacuous comparison of zeros
    err = rel_err(want, got)
    assert err <= TOL, err
    return err


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_diffusers(name, torch_gen, one_torch_thread):
    config = {**BASE, **CONFIGS[name]}
    ref = diffusers_unet(config, torch_gen)
    check(ref, ours_from(ref, config), config, torch_gen)
    # the bound the validator refuses hostile configs with (before building) holds for the real network
    assert estimate_params(normalize_config({"arch": "unet2d", **config})) >= sum(
        p.numel() for p in ref.parameters()
    )


def test_legacy_attention_key_names_map_by_rule(torch_gen, one_torch_thread):
    """google/ddpm-* checkpoints name the attention projections query/key/value/proj_attn."""
    config = {**BASE, **ATTN}
    ref = diffusers_unet(config, torch_gen)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in ref.state_dict().items():
        for new, name in old.items():
            key = key.replace(f".{new}.", f".{name}.") if ".attentions." in key else key
        legacy[key] = value
    assert sum(k.endswith(".query.weight") for k in legacy) == 7  # 2 down, 4 up, 1 mid
    renamed = rename_legacy_keys(legacy)
    assert set(renamed) == set(ref.state_dict())
    check(ref, ours_from(ref, config, renamed), config, torch_gen)


def test_cifar10_geometry_matches_diffusers(torch_gen):
    ref = diffusers_unet(CIFAR10, torch_gen)
    ours = ours_from(ref, CIFAR10)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 35_746_307
    check(ref, ours, CIFAR10, torch_gen, batch=2)


def _onnx_outputs(model: torch.nn.Module, config: dict, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    from ddpm.export.onnx_export import trace_to_onnx
    from ddpm.models import sample_shape

    proto = trace_to_onnx(model, sample_shape(normalize_config({"arch": "unet2d", **config})))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy(), "t": t.numpy()})[0]


@pytest.mark.parametrize("name", sorted(KITCHEN_SINK))
def test_exported_onnx_matches_diffusers(name, torch_gen):
    config = {**BASE, **KITCHEN_SINK[name]}
    ref = diffusers_unet(config, torch_gen)
    ours = ours_from(ref, config)
    check(ref, ours, config, torch_gen)
    x, t = inputs(config, 5, torch_gen)  # neither the traced batch (2) nor a power of two
    with torch.no_grad():
        want = ref(x, t).sample
    assert rel_err(want, torch.from_numpy(_onnx_outputs(ours, config, x, t))) <= TOL


@pytest.mark.slow
def test_cifar10_geometry_exported_onnx_matches_diffusers(torch_gen):
    ref = diffusers_unet(CIFAR10, torch_gen)
    x, t = inputs(CIFAR10, 3, torch_gen)
    with torch.no_grad():
        want = ref(x, t).sample
    assert rel_err(want, torch.from_numpy(_onnx_outputs(ours_from(ref, CIFAR10), CIFAR10, x, t))) <= TOL


@pytest.mark.parametrize("name", ["attn_resnet_learned", "resnet_conv_legacy"])
def test_class_embeddings_match_diffusers(name, torch_gen, one_torch_thread):
    """num_class_embeds K (class_embed_type None): emb = time_emb + class_embedding(y). Through ONNX with y:
    tests/test_diffusers_folder.py (a class-conditional folder imported, exported and run)."""
    config = {**BASE, **KITCHEN_SINK[name], "num_class_embeds": 5}
    ref = diffusers_unet(config, torch_gen)
    ours = ours_from(ref, config)
    assert "class_embedding.weight" in ours.state_dict()
    x, t = inputs(config, 5, torch_gen)
    y = torch.tensor([0, 4, 2, 2, 1])
    with torch.no_grad():
        want = ref(x, t, class_labels=y).sample
        other = ref(x, t, class_labels=(y + 1) % 5).sample
        assert rel_err(want, ours(x, t, y)) <= TOL
    assert float((want - other).abs().max()) > 1e-3  # the class matters


# ---- configs the native network refuses, each naming the field and the value ----


@pytest.mark.parametrize(
    "over, match",
    [
        (
            {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]},
            r"down_block_types\[1\] = 'CrossAttn.*cross",
        ),
        ({"up_block_types": ["SkipUpBlock2D", "UpBlock2D"]}, r"up_block_types\[0\] = 'SkipUpBlock2D'"),
        ({"class_embed_type": "timestep"}, "class_embed_type = 'timestep' is not supported"),
        ({"class_embed_type": "projection", "num_class_embeds": 3}, "class_embed_type = 'projection' is not"),
        ({"num_class_embeds": 0}, r"num_class_embeds must be an integer in 1\.\.100000"),
        ({"num_class_embeds": True}, r"num_class_embeds must be an integer"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type = 'fourier' is not supported"),
        (
            {"resnet_time_scale_shift": "spatial"},
            "resnet_time_scale_shift must be one of default, scale_shift",
        ),
        ({"act_fn": "tanh"}, "act_fn must be one of"),
        ({"cross_attention_dim": 768}, "unknown key.*cross_attention_dim"),
        ({"out_channels": 4}, "out_channels = 4 is not supported"),
        ({"norm_num_groups": 5}, "norm_num_groups = 5 is not supported: it must divide"),
        ({"attention_head_dim": 64}, "attention_head_dim = 64 is not supported"),
        ({"sample_size": 17}, "sample_size = 17 is not supported.*multiple of 2"),
        ({"sample_size": None}, "sample_size = None is not supported"),
        ({"time_embedding_type": "learned"}, "num_train_timesteps = None is not supported"),
        ({"up_block_types": ["UpBlock2D"]}, "up_block_types has 1 entries"),
        ({"block_out_channels": [16, 1 << 20]}, r"block_out_channels\[1\] must be an integer in 1..8192"),
        ({"layers_per_block": "2"}, "layers_per_block must be an integer"),
        ({"center_input_sample": 1}, "center_input_sample must be true or false"),
        ({"downsample_padding": 2}, "downsample_padding must be an integer in 0..1"),
        ({"block_out_channels": [8192] * 8, "layers_per_block": 64}, "parameters; at most"),
    ],
)
def test_unsupported_configs_are_refused_by_name(over, match):
    config = {"arch": "unet2d", **BASE, **over}
    if "block_out_channels" in over and len(over["block_out_channels"]) == 8:
        config["down_block_types"] = ["DownBlock2D"] * 8
        config["up_block_types"] = ["UpBlock2D"] * 8
    with pytest.raises(InvalidArgumentError, match=match):
        build_model(config)


def test_normalized_config_is_complete_and_stable():
    cfg = normalize_config({"arch": "unet2d", **BASE})
    assert normalize_config(cfg) == cfg
    assert cfg["attention_head_dim"] == 8 and cfg["flip_sin_to_cos"] is True  # diffusers' defaults
    assert normalize_config(
        {"arch": "unet2d", **BASE, "down_block_types": ["UNetResDownBlock2D", "AttnDownBlock2D"]}
    )["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
