"""The counter-based noise: Philox4x32-10 known answers, C++ normals vs the NumPy oracle, batch invariance and
the statistics of >= 10^6 draws (fresh random seeds every run; thresholds below)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import ddpm.noise as noise
from ddpm import extension
from ddpm.errors import InvalidArgumentError

_C = extension.cpu_extension()
needs_C = pytest.mark.skipif(_C is None, reason="ddpm._C is not built")

# Random123's published known-answer vectors: file tests/kat_vectors of the Random123 distribution (D. E. Shaw
# Research, https://github.com/DEShawResearch/random123, v1.14.0), rows "philox4x32 7" and "philox4x32 10";
# format: counter[4] key[2] -> expected[4] (hex). The 7-round rows check the `rounds` parameter of the reference.
KAT = [
    (7, "00000000 00000000 00000000 00000000", "00000000 00000000", "5f6fb709 0d893f64 4f121f81 4f730a48"),
    (7, "ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff", "5207ddc2 45165e59 4d8ee751 8c52f662"),
    (7, "243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0", "4dfccaba 190a87f0 c47362ba b6b5242a"),
    (10, "00000000 00000000 00000000 00000000", "00000000 00000000", "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    (10, "ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff", "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    (10, "243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0", "d16cfe09 94fdcceb 5001e420 24126ea1"),
]

# C++ normals vs the oracle. The oracle evaluates Box-Muller in float64 and rounds once, so it is the float32
# nearest the exact value; the kernel works in float32 with polynomial log/sin/cos (each ~1 ulp) after exact
# integer argument reduction, about six roundings in all. Measured max: 4 ulp over 10^6 random words and the
# edge words below; we allow 8 ulp of the reference value (relative error <= 8 * 2^-24 ~ 4.8e-7, also near 0).
ULP_TOL = 8


def _words(s: str) -> list[int]:
    return [int(w, 16) for w in s.split()]


def _ulp_error(z: np.ndarray, ref: np.ndarray) -> float:
    ref32 = ref.astype(np.float32)
    return float(np.max(np.abs(z.astype(np.float64) - ref.astype(np.float64)) / np.spacing(np.abs(ref32))))


def _seed(rng) -> int:
    return int(rng.integers(0, 2**63, dtype=np.int64)) * 2 + int(rng.integers(0, 2))  # all 64 bits in play


@pytest.mark.parametrize("rounds, counter, key, expected", KAT)
def test_philox_known_answers_reference(rounds, counter, key, expected):
    out = noise.philox4x32(_words(counter), _words(key), rounds=rounds)
    assert out.dtype == np.uint32
    assert out.tolist() == _words(expected)


@needs_C
@pytest.mark.parametrize("counter, key, expected", [k[1:] for k in KAT if k[0] == 10])
def test_philox_known_answers_cpp(counter, key, expected):
    assert list(_C.philox4x32_10(_words(counter), _words(key))) == _words(expected)


@needs_C
def test_simd_philox_variants_known_answers_and_reference(rng):
    """The SIMD Philox of every compiled variant (8/16 blocks per instruction) on the known answers (as counter
    (c0, sample, step, stream) and key = seed) and on a run of counters that wraps c0 past 2^32 - 1."""
    seed = int(rng.integers(0, 2**63)) * 2 + 1
    c0, sample, step, stream = 2**32 - 300, int(rng.integers(0, 2**32)), int(rng.integers(0, 2**32)), 1
    ctr = np.stack(
        [
            (c0 + np.arange(1000, dtype=np.uint64)) % 2**32,
            *(np.full(1000, v) for v in (sample, step, stream)),
        ],
        1,
    )
    ref = noise.philox4x32(ctr, [seed & 0xFFFFFFFF, seed >> 32])
    for target in _C.simd_targets():
        _C.set_simd_target(target)
        try:
            for counter, key, expected in [k[1:] for k in KAT if k[0] == 10]:
                c, kw = _words(counter), _words(key)
                assert _C.philox_words(*c[:1], 1, *c[1:], kw[0] | kw[1] << 32) == _words(expected), target
            words = np.array(_C.philox_words(c0, 1000, sample, step, stream, seed), dtype=np.uint32).reshape(
                -1, 4
            )
        finally:
            _C.set_simd_target("")
        assert np.array_equal(words, ref), target


def test_philox_reference_is_vectorised(rng):
    ctr = rng.integers(0, 2**32, size=(7, 3, 4), dtype=np.uint64).astype(np.uint32)
    key = rng.integers(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32)
    batch = noise.philox4x32(ctr, key)
    assert batch.shape == (7, 3, 4)
    assert np.array_equal(batch[4, 2], noise.philox4x32(ctr[4, 2], key))


@needs_C
@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (1, 1, 28, 28), (5, 3), (2, 1), (4,), (9, 3, 17, 13)])
def test_cpp_normals_match_reference(shape, rng):
    seed = _seed(rng)
    step, stream, offset = (int(v) for v in rng.integers(0, 2**32 - 16, size=3))
    ref = noise.normal_reference(seed, shape, step=step, stream=stream, sample_offset=offset)
    for target in _C.simd_targets():  # every compiled variant this CPU runs
        _C.set_simd_target(target)
        try:
            z = noise.normal(seed, shape, step=step, stream=stream, sample_offset=offset)
        finally:
            _C.set_simd_target("")
        assert z.dtype == torch.float32 and tuple(z.shape) == shape
        assert _ulp_error(z.numpy(), ref) <= ULP_TOL, target


@needs_C
def test_box_muller_edge_words_and_random_words(rng):
    """Words that no test seed would hit: u at its extremes (w = 0, 2^32 - 1), at 1/2, at the ends of the log's
    range reduction, and angles on and next to every quarter turn, where sin/cos must stay relatively accurate."""
    edges = [
        0,
        1,
        2,
        0x1FFFFFFF,
        0x20000000,
        0x3FFFFFFF,
        0x40000000,
        0x5FFFFFFF,
        0x60000000,
        0x7FFFFFFF,
        0x80000000,
        0x9FFFFFFF,
        0xA0000000,
        0xB504F333,
        0xB504F334,
        0xBFFFFFFF,
        0xC0000000,
        0xDFFFFFFF,
        0xE0000000,
        0xFFFFFFFE,
        0xFFFFFFFF,
    ]
    grid = np.array(np.meshgrid(edges, edges), dtype=np.uint32).reshape(2, -1).T  # every (w_a, w_b) pair
    rand = rng.integers(0, 2**32, size=(1 << 17, 4), dtype=np.uint64).astype(np.uint32)
    words = np.ascontiguousarray(np.concatenate([np.concatenate([grid, grid], 1), rand]))
    z = np.empty(words.shape, dtype=np.float32)
    _C.box_muller(words.ctypes.data, z.ctypes.data, len(words))
    assert _ulp_error(z, noise.box_muller_reference(words)) <= ULP_TOL


@needs_C
def test_sample_k_is_the_same_in_any_batch(rng):
    seed, step = _seed(rng), int(rng.integers(0, 1000))
    shape = (16, 3, 5, 5)  # 75 elements per sample: groups straddle nothing, the last group is partial
    batch = noise.normal(seed, shape, step=step, sample_offset=100)
    for k in range(16):
        one = noise.normal(seed, (1, *shape[1:]), step=step, sample_offset=100 + k)
        assert torch.equal(one[0], batch[k])
    four = noise.normal(seed, (4, *shape[1:]), step=step, sample_offset=106)
    assert torch.equal(four, batch[6:10])


@needs_C
def test_threads_do_not_change_a_bit(rng):
    """Splitting the work over threads (forced here even for a small tensor) gives the same bits."""
    seed, shape = _seed(rng), (7, 3, 13, 9)
    single = noise.normal(seed, shape, step=3)
    old = _C.parallel_threshold()
    _C.set_parallel_threshold(1)
    try:
        split = noise.normal(seed, shape, step=3)
    finally:
        _C.set_parallel_threshold(old)
    assert torch.equal(single, split)


@needs_C
def test_initial_noise_is_stream_one(rng):
    seed = _seed(rng)
    x_t = noise.initial_noise(seed, (3, 1, 8, 8), sample_offset=5)
    assert torch.equal(x_t, noise.normal(seed, (3, 1, 8, 8), step=0, stream=1, sample_offset=5))
    assert not torch.equal(x_t, noise.normal(seed, (3, 1, 8, 8), step=0, stream=0, sample_offset=5))


def test_out_argument_and_empty(rng):
    seed = _seed(rng)
    out = torch.full((2, 3, 5), 7.0)
    res = noise.normal(seed, (2, 3, 5), out=out)
    assert res is out
    assert _ulp_error(out.numpy(), noise.normal_reference(seed, (2, 3, 5))) <= ULP_TOL
    assert noise.normal(seed, (0, 3)).shape == (0, 3)


def test_fallback_without_extension_warns_once(monkeypatch, rng):
    monkeypatch.setattr(extension, "cpu_extension", lambda: None)
    monkeypatch.setattr(extension, "_warned", set())
    seed = _seed(rng)
    with pytest.warns(extension.FallbackWarning, match="NumPy reference"):
        z = noise.normal(seed, (2, 9), step=4)
    assert np.array_equal(z.numpy(), noise.normal_reference(seed, (2, 9), step=4))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noise.normal(seed, (2, 9), step=5)  # no second warning


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seed=-1), r"seed must be an integer in \[0, 2\^64\), got -1"),
        (dict(seed=2**64), r"seed must be an integer in \[0, 2\^64\)"),
        (dict(seed=1.5), r"seed must be an integer"),
        (dict(shape=()), r"shape must be \(N, \*sample_shape\)"),
        (dict(shape=(2, -3)), r"shape must be \(N, \*sample_shape\) with sizes >= 0"),
        (dict(step=2**32), r"step must be an integer in \[0, 4294967296\), got 4294967296"),
        (dict(stream=-1), r"stream must be an integer"),
        (dict(sample_offset=2**32 - 1), r"sample_offset \+ N must be <= 2\^32"),
        (
            dict(out=torch.empty(2, 3, dtype=torch.float64)),
            r"out must be a contiguous float32 tensor of shape",
        ),
        (dict(out=torch.empty(3, 2).t()), r"out must be a contiguous float32 tensor of shape \(2, 3\)"),
        (dict(device="nodevice"), r"cannot create the noise on device 'nodevice'"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(seed=1, shape=(2, 3))
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=match):
        noise.normal(args.pop("seed"), args.pop("shape"), **args)


# ---- statistics of the generator ----
# n = 2^20 draws per sample of draws. Under H0 (iid N(0, 1)) the sample mean and every Pearson correlation
# have standard error 1/sqrt(n) ~ 9.8e-4 and the sample variance sqrt(2/n) ~ 1.4e-3; we fail beyond 5 standard
# errors (two-sided p ~ 6e-7 each). KS against N(0, 1) fails below p = 1e-6. With ~12 statistics per run the
# chance of a false failure is ~1e-5, while a real defect (a wrong word order, a reused counter, a skewed
# Box-Muller) shows as correlations of O(1) or a KS p-value of 0.
N_DRAWS = 1 << 20
Z_LIMIT = 5.0


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


@needs_C
def test_statistics_of_a_million_draws(rng):
    seed = _seed(rng)
    shape = (N_DRAWS // 1024, 1024)  # 1024 samples of 1024 elements
    z = noise.normal(seed, shape, step=int(rng.integers(0, 1000))).numpy().astype(np.float64)
    se = 1.0 / np.sqrt(z.size)
    assert abs(z.mean()) < Z_LIMIT * se
    assert abs(z.var() - 1.0) < Z_LIMIT * np.sqrt(2.0 / z.size)
    assert stats.kstest(z.ravel(), "norm").pvalue > 1e-6
    # The tails come from the log's extremes: P(|z| > 4) = 6.3e-5, so ~66 expected; Poisson 5-sigma band.
    tail = int(np.sum(np.abs(z) > 4.0))
    expected = 2 * stats.norm.sf(4.0) * z.size
    assert abs(tail - expected) < Z_LIMIT * np.sqrt(expected) + 1
    # Neighbouring elements: lag 1 (inside and across Box-Muller pairs), 2 (across pairs), 4 (across blocks).
    for lag in (1, 2, 3, 4):
        assert abs(_corr(z[:, :-lag], z[:, lag:])) < Z_LIMIT / np.sqrt(z[:, lag:].size), lag
    # A Box-Muller pair (r cos, r sin) is independent, so even the squares are uncorrelated.
    assert abs(_corr(z[:, 0::2] ** 2, z[:, 1::2] ** 2)) < Z_LIMIT / np.sqrt(z.size / 2)
    # Neighbouring samples.
    assert abs(_corr(z[:-1], z[1:])) < Z_LIMIT / np.sqrt(z[1:].size)


@needs_C
@pytest.mark.parametrize("axis", ["step", "stream", "seed", "sample"])
def test_no_correlation_across_counter_words(axis, rng):
    """Draws that differ only in one counter/key word (neighbouring steps, the two streams, neighbouring seeds,
    samples far apart) are uncorrelated, element by element."""
    seed, step = _seed(rng) & ~1, int(rng.integers(1, 1000))
    shape = (256, 2048)  # 2^19 pairs
    base = dict(step=step, stream=0, sample_offset=0)
    other = dict(base)
    other_seed = seed
    if axis == "step":
        other["step"] = step - 1
    elif axis == "stream":
        other["stream"] = 1
    elif axis == "seed":
        other_seed = seed + 1  # differs in key word 0 only
    else:
        other["sample_offset"] = 256
    a = noise.normal(seed, shape, **base).numpy()
    b = noise.normal(other_seed, shape, **other).numpy()
    assert abs(_corr(a, b)) < Z_LIMIT / np.sqrt(a.size)
    assert abs(_corr(np.abs(a), np.abs(b))) < Z_LIMIT / np.sqrt(a.size)
