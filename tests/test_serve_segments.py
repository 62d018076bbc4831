"""runtime/segments.py: one reverse loop over segments of several runs equals the separate runs.

Bitwise on onnxruntime's CPU provider (each row computed independently of its batch), for every sampler, with
segments of different seeds, offsets and lengths in any order: what lets ``ddpm serve`` merge requests and still
answer each one exactly as ``ddpm run``. Eager torch blocks its GEMMs by batch size, so there the merged rows
agree with the separate runs to float32 rounding only (the tolerance below); OpenVINO's CPU plugin is held to
the same tolerance (it measured bitwise on this machine's tiny models, which is not promised).
"""

from __future__ import annotations

import pytest
import torch
from test_serve_helpers import conditional_artifact, serve_artifacts

from ddpm.errors import InvalidArgumentError
from ddpm.options import SamplingOptions
from ddpm.runtime.backends import open_backend
from ddpm.runtime.sampling import SamplingPlan, sample_run
from ddpm.runtime.segments import Segment, SegmentedExecutor, sample_segments

# Eager torch, merged vs separate batches: a 10-step dpm++2m UNet run differs by ~1.5e-5 (max abs, samples in
# [-1, 1] with clip 1) from the batch-size-dependent GEMM blocking; 1e-3 is ~60x that and far below what a wrong
# seed or offset gives (O(1)).
ROUNDING_ATOL = 1e-3
SEGMENTS = [Segment(5, 0, 3), Segment(7, 10, 2), Segment(5, 3, 1), Segment(2**64 - 1, 0, 4)]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return serve_artifacts(tmp_path_factory)


def _separate(backend, options: SamplingOptions, segments) -> torch.Tensor:
    """Each segment as ``ddpm run`` computes it: the whole run of its seed, in batches of 64, then its rows."""
    parts = []
    for s in segments:
        run = sample_run(backend, s.first + s.n, options.replace(seed=s.seed, batch=64))
        parts.append(run.samples[s.first :])
    return torch.cat(parts)


@pytest.mark.parametrize("kind", ["unet", "mlp"])
@pytest.mark.parametrize(
    "fields",
    [
        {"sampler": "ddpm", "clip": 1.0},
        {"sampler": "ddim", "eta": 0.5},
        {"sampler": "dpm++2m", "clip": 1.0},
        {"sampler": "dpm++2m-sde"},
        {"sampler": "ddpm", "clip": "dynamic:0.9"},
    ],
    ids=["ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "dynamic-threshold"],
)
def test_segments_equal_separate_runs_bitwise_on_onnxruntime(art, kind, fields, one_torch_thread):
    options = SamplingOptions(device="cpu", threads=1, steps=5, **fields)
    with open_backend(art[kind], device="cpu", threads=1) as backend:
        plan = SamplingPlan.for_artifact(backend.meta, options)
        got = sample_segments(backend, plan, SEGMENTS)
        want = _separate(backend, options, SEGMENTS)
    assert got.shape == want.shape
    assert torch.equal(got, want), float((got - want).abs().max())


def test_segment_order_does_not_matter(art, one_torch_thread):
    options = SamplingOptions(device="cpu", threads=1, steps=4, sampler="dpm++2m-sde")
    with open_backend(art["unet"], device="cpu", threads=1) as backend:
        plan = SamplingPlan.for_artifact(backend.meta, options)
        a = sample_segments(backend, plan, SEGMENTS)
        b = sample_segments(backend, plan, SEGMENTS[::-1])
    rows = [3, 2, 1, 4]
    split_a = list(torch.split(a, rows))
    split_b = list(torch.split(b, rows[::-1]))[::-1]
    for x, y in zip(split_a, split_b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "fields",
    [{"classes": ("a", "c")}, {"classes": (2, 0, 1), "guidance": 3.0}, {"classes": ("b",), "guidance": 0.0}],
    ids=["conditional", "guided", "unconditional-half"],
)
def test_conditional_segments_equal_separate_runs_bitwise(tmp_path_factory, fields, one_torch_thread):
    """Each segment's classes cycle over its own global sample indices, as in ``ddpm run``; guidance runs one
    forward of the 2N rows [x; x] and the kernel reads both halves, sliced per segment."""
    engine = conditional_artifact(tmp_path_factory)
    options = SamplingOptions(device="cpu", threads=1, steps=4, sampler="dpm++2m", clip=1.0, **fields)
    with open_backend(engine, device="cpu", threads=1) as backend:
        plan = SamplingPlan.for_artifact(backend.meta, options)
        got = sample_segments(backend, plan, SEGMENTS)
        want = _separate(backend, options, SEGMENTS)
    assert torch.equal(got, want), float((got - want).abs().max())


@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_other_runtimes_agree_to_rounding(art, runtime, one_torch_thread):
    if runtime == "openvino":
        pytest.importorskip("openvino")
        engine, rt = art["unet"], "openvino"
    else:
        engine, rt = art["unet_ckpt"], None
    options = SamplingOptions(device="cpu", threads=1, steps=10, sampler="dpm++2m", clip=1.0, runtime=rt)
    with open_backend(engine, device="cpu", threads=1, runtime=rt) as backend:
        plan = SamplingPlan.for_artifact(backend.meta, options)
        got = sample_segments(backend, plan, SEGMENTS)
        want = _separate(backend, options, SEGMENTS)
    diff = float((got - want).abs().max())
    print(f"\n{runtime}: merged vs separate max |diff| = {diff:.3g} (bitwise: {diff == 0.0})")
    assert diff <= ROUNDING_ATOL


def test_bad_segments_are_refused():
    with pytest.raises(InvalidArgumentError, match="seed"):
        Segment(-1, 0, 1)
    with pytest.raises(InvalidArgumentError, match="n >= 1"):
        Segment(0, 0, 0)
    with pytest.raises(InvalidArgumentError, match="n >= 1"):
        Segment(0, 2**32 - 1, 2)
    with pytest.raises(InvalidArgumentError, match="at least one segment"):
        SegmentedExecutor([])
