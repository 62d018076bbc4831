"""The denoisers: the paper's CIFAR-10 UNet size, shapes, the timestep embedding, config validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.errors import InvalidArgumentError
from ddpm.models import (
    PRESETS,
    build_model,
    count_params,
    normalize_config,
    preset_config,
    sample_shape,
    timestep_embedding,
)


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    # Zero-initialised output layers would make every output 0 and the tests below vacuous.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def test_cifar10_preset_matches_paper_param_count():
    # Ho et al. 2020, appendix B: the CIFAR-10 model has 35.7M parameters.
    n = count_params(build_model(preset_config("cifar10")))
    print(f"cifar10 UNet parameters: {n:,}")
    assert abs(n - 35.7e6) / 35.7e6 < 0.01


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_map_x_t_to_x_shape(name, torch_gen):
    cfg = preset_config(name)
    if name == "cifar10":  # same architecture at 16x16 keeps the test fast
        cfg = preset_config(name, image_size=16)
    model = _randomize(build_model(cfg), torch_gen)
    shape = sample_shape(model.config)
    for n in (1, 3):
        x = torch.randn(n, *shape, generator=torch_gen)
        t = torch.randint(0, 1000, (n,), generator=torch_gen)
        with torch.no_grad():
            out = model(x, t)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_samples_are_processed_independently_and_depend_on_t(torch_gen):
    # No batch coupling (no BatchNorm, no data-dependent control flow): sample k's output is the same in a
    # batch of 4 as alone. Tolerance 1e-5 relative: float32 convolution algorithms may differ by batch size.
    model = _randomize(build_model(preset_config("tiny")), torch_gen)
    x = torch.randn(4, 1, 8, 8, generator=torch_gen)
    t = torch.randint(0, 1000, (4,), generator=torch_gen)
    with torch.no_grad():
        batch = model(x, t)
        single = torch.cat([model(x[k : k + 1], t[k : k + 1]) for k in range(4)])
        other_t = model(x, (t + 500) % 1000)
    rel = (batch - single).norm() / batch.norm()
    assert rel < 1e-5, rel
    assert (batch - other_t).norm() / batch.norm() > 1e-3  # the timestep embedding reaches the output


def test_timestep_embedding_matches_formula(rng):
    # Reference in float64 NumPy: [sin(t f_k), cos(t f_k)], f_k = exp(-ln(10000) k / (half - 1)).
    # The float32 argument t*f_k (up to ~1000) carries a relative error ~6e-8, i.e. an absolute phase error
    # ~1e-4 at t = 999: tolerance 5e-4 absolute on values in [-1, 1].
    dim = 64
    t = rng.integers(0, 1000, size=17)
    half = dim // 2
    f = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
    ref = np.concatenate([np.sin(t[:, None] * f), np.cos(t[:, None] * f)], axis=1)
    got = timestep_embedding(torch.as_tensor(t), dim).numpy()
    assert got.dtype == np.float32 and got.shape == (17, dim)
    assert np.abs(got - ref).max() < 5e-4


def test_normalize_config_is_complete_and_idempotent():
    cfg = preset_config("mnist")
    assert normalize_config(cfg) == cfg
    assert cfg["attention_resolutions"] == [14] and cfg["out_channels"] == 1
    assert preset_config("cifar10", image_size=64)["attention_resolutions"] == [32]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 30}, r"image size 30 is not divisible by 8"),
        ({"groups": 48}, r"groups 48 must divide every channel count"),
        ({"attention_resolutions": [5]}, r"attention resolution\(s\) \[5\] never occur"),
        ({"channel_mult": []}, r"channel_mult must be a non-empty list"),
        ({"base_channels": 0}, r"'base_channels' must be a positive integer"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"bogus": 1}, r"unknown key\(s\) bogus"),
    ],
)
def test_bad_unet_configs_are_rejected(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        preset_config("cifar10", **kwargs)


def test_bad_preset_and_arch():
    with pytest.raises(
        InvalidArgumentError, match=r"unknown model preset 'huge'; allowed: tiny, small, mnist"
    ):
        preset_config("huge")
    with pytest.raises(InvalidArgumentError, match=r"arch 'unet' or 'mlp'"):
        build_model({"arch": "transformer"})
    with pytest.raises(InvalidArgumentError, match="takes dim, not image geometry"):
        preset_config("mlp", image_size=8)
