"""Classifier-free guidance through the one reverse loop (ddpm/executors.py, ``model_call``): one forward of the 2N
rows [x; x] with classes [y; null] per step, the fused kernel forming m_u + S (m_c - m_u) in the same pass as
the update; the reference is ``ddpm.step`` on the guided output computed in torch (tests/test_kernel_operands.py
compares single steps to 1e-6; here whole runs, with the loop-level tolerance of tests/test_reverse.py).

The model is a smooth made-up conditional denoiser (no training needed): its output depends on x, t and the class.
"""

from __future__ import annotations

import pytest
import torch

import ddpm
from ddpm import Schedule
from ddpm.errors import InvalidArgumentError
from ddpm.options import OptionError, SamplingOptions

FUSED_VS_REF_RTOL = 5e-5  # as tests/test_reverse.py: float32 rounding over a whole run
K = 4  # classes 0..3, null class 4
SHAPE = (3, 6, 6)


class CondNet:
    """m = tanh(a_y * x + 0.3 * sin(t / 100)) + b_y, with a per-class scale and shift (the null class too)."""

    def __init__(self, gen: torch.Generator, channels: int = 3) -> None:
        self.a = 0.5 + torch.rand(K + 1, generator=gen)
        self.b = 0.3 * torch.randn(K + 1, channels, 1, 1, generator=gen)
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], tuple(y.tolist())))
        a = self.a[y].reshape(-1, 1, 1, 1)
        out = torch.tanh(a * x + 0.3 * torch.sin(t.float() / 100).reshape(-1, 1, 1, 1)) + self.b[y]
        return out.contiguous()


def _rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _setup(torch_gen, n: int = 5):
    seed = int(torch.randint(0, 2**62, (1,), generator=torch_gen))
    x = ddpm.noise.initial_noise(seed, (n, *SHAPE))
    y = torch.randint(0, K, (n,), generator=torch_gen)
    return seed, x, y, CondNet(torch_gen)


@pytest.mark.parametrize(
    "options",
    [
        {"sampler": "ddpm"},
        {"sampler": "ddim", "eta": 0.5},
        {"sampler": "dpm++2m"},
        {"sampler": "dpm++2m-sde"},
        {"sampler": "ddpm", "prediction": "v", "clip": 1.0},
        {"sampler": "ddim", "prediction": "x0", "clip": "dynamic:0.9"},
        {"sampler": "dpm++2m", "clip": "dynamic:0.95:1.5"},
    ],
)
@pytest.mark.parametrize("guidance", [3.0, -0.5])
def test_guided_fused_run_matches_the_reference(options, guidance, torch_gen):
    options = dict(options)
    prediction = options.pop("prediction", "eps")
    sched = Schedule.linear(1000).respace(25, "trailing" if "dpm" in options["sampler"] else "uniform")
    seed, x, y, net = _setup(torch_gen)
    kw = dict(options, seed=seed, guidance=guidance, y=y, null_class=K, prediction=prediction)
    fused = ddpm.reverse(net, x, sched, **kw)
    ref = ddpm.reverse(net, x, sched, kernel="reference", **kw)
    assert torch.isfinite(fused).all()
    assert _rel_max(fused, ref) <= FUSED_VS_REF_RTOL, (options, guidance, _rel_max(fused, ref))


def test_one_forward_of_2n_rows_per_step(torch_gen):
    sched = Schedule.linear(1000).respace(10)
    seed, x, y, net = _setup(torch_gen, n=3)
    ddpm.reverse(net, x, sched, seed=seed, guidance=2.0, y=y, null_class=K)
    assert len(net.calls) == 10  # one call per step, never two
    assert all(n == 6 and labels == (*y.tolist(), K, K, K) for n, labels in net.calls)


def test_guidance_one_is_plain_conditional_and_zero_is_the_null_class(torch_gen):
    sched = Schedule.linear(1000).respace(12)
    seed, x, y, net = _setup(torch_gen)
    plain = ddpm.reverse(net, x, sched, seed=seed, y=y)
    assert torch.equal(ddpm.reverse(net, x, sched, seed=seed, y=y, guidance=1.0, null_class=K), plain)
    assert all(n == 5 for n, _ in net.calls)  # S = 1: N rows, no null half
    null = ddpm.reverse(net, x, sched, seed=seed, y=torch.full_like(y, K))
    assert torch.equal(ddpm.reverse(net, x, sched, seed=seed, y=y, guidance=0.0, null_class=K), null)
    # S = 1 fused with an explicit null half equals the plain conditional step to float32 rounding
    kw = dict(seed=seed, y=y, null_class=K)
    assert _rel_max(ddpm.reverse(net, x, sched, guidance=1.0 + 1e-7, **kw), plain) < 1e-5


def test_sample_k_keeps_its_class_and_noise_in_any_batch(torch_gen):
    """Noise and class follow the global sample index: rows 2..4 of a run equal a run of those rows alone."""
    sched = Schedule.linear(1000).respace(8)
    seed, x, y, net = _setup(torch_gen)
    full = ddpm.reverse(net, x, sched, seed=seed, y=y, guidance=2.5, null_class=K)
    part = ddpm.reverse(net, x[2:], sched, seed=seed, y=y[2:], guidance=2.5, null_class=K, sample_offset=2)
    assert torch.equal(part, full[2:])


def test_learned_variance_with_guidance_uses_the_conditional_variance(torch_gen):
    """A 2C-channel output: the mean halves are guided, the conditional half's variance sets sigma."""
    sched = Schedule.cosine(1000).respace(20)
    seed, x, y, _ = _setup(torch_gen)
    net = CondNet(torch_gen, channels=6)

    def model(x, t, y):
        out = net(torch.cat([x, x], 1), t, y)
        return torch.cat([out[:, :3], out[:, 3:].tanh()], 1)  # variance channels in [-1, 1]

    kw = dict(seed=seed, y=y, guidance=2.0, null_class=K, variance="learned_range")
    fused = ddpm.reverse(model, x, sched, **kw)
    ref = ddpm.reverse(model, x, sched, kernel="reference", **kw)
    assert _rel_max(fused, ref) <= FUSED_VS_REF_RTOL


def test_bad_guidance_is_one_clear_error(torch_gen):
    sched = Schedule.linear(1000).respace(5)
    seed, x, y, net = _setup(torch_gen)
    with pytest.raises(InvalidArgumentError, match="needs the model's null class"):
        ddpm.reverse(net, x, sched, y=y, guidance=2.0)
    with pytest.raises(InvalidArgumentError, match="needs y, the rows' classes"):
        ddpm.reverse(net, x, sched, guidance=2.0, null_class=K)
    with pytest.raises(InvalidArgumentError, match=r"y must be the rows' classes, int64 \[5\]"):
        ddpm.reverse(net, x, sched, y=y.float(), null_class=K)
    for bad in (float("nan"), float("inf"), "x"):
        with pytest.raises(OptionError, match="guidance must be a finite number"):
            SamplingOptions(guidance=bad)


META = {"classes": {"count": K, "null": K, "names": ["a", "b", "c", "d"], "p_uncond": 0.1}}


@pytest.mark.parametrize(
    "meta, fields, match",
    [
        ({}, {"classes": (1,)}, "class needs a class-conditional model"),
        ({}, {"guidance": 3.0}, "guidance needs a class-conditional model"),
        (META, {"classes": (5,)}, r"5 is out of range: this model has classes 0\.\.3 \(4: the null class"),
        (META, {"classes": ("zebra",)}, "'zebra' is not a class of this model"),
        (
            {"classes": {**META["classes"], "p_uncond": 0.0}},
            {"guidance": 2.0, "classes": (1,)},
            "p_uncond = 0.0",
        ),
        ({"classes": {**META["classes"], "null": None}}, {}, "class-conditional .4 classes.: give --class"),
    ],
)
def test_classes_and_guidance_are_checked_against_the_model(meta, fields, match):
    base = {"format": "ddpm/1", "schedule": {"kind": "linear", "timesteps": 10}, "prediction": "eps", **meta}
    with pytest.raises(OptionError, match=match):
        SamplingOptions(**fields).resolve(base)


def test_class_names_and_cycling_resolve_to_indices():
    base = {"schedule": {"kind": "linear", "timesteps": 10}, **META}
    opts, _ = SamplingOptions(classes="b,3,a").resolve(base)
    assert opts.classes == (1, 3, 0)
    assert SamplingOptions().resolve(base)[0].classes == (K,)  # none asked: the null class (unconditional)
    assert SamplingOptions.from_cli(classes="0,1").classes == (0, 1)
    with pytest.raises(InvalidArgumentError, match="--class must be class numbers or names"):
        SamplingOptions.from_cli(classes=",")
