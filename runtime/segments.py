"""Several runs in one reverse loop: contiguous segments of a batch, each with its own seed and sample indices.

    x = cat(initial_noise(seed_k, [n_k, *shape], sample_offset=first_k) for each segment k)   # Philox stream 1
    for i = start .. 0:
        m = model(x, t_i)                                              # ONE network call on the whole batch
        for each segment k = rows a:b:                                 # the fused step, per segment
            fused_step_raw(x[a:b], m[a:b], rows32[i], clip, seed_k, i, first_k, x[a:b], history=h[a:b])

Row r of segment k is then exactly the row ``first_k + (r - a)`` of ``sample_run(engine, ..., seed=seed_k)``:
the noise is keyed by (seed, global sample, step) (docs/design.md, "Noise") and the step is elementwise. The
network output is the same too when the runtime computes each row independently of the rest of its batch,
which onnxruntime's CPU provider does (tests/test_sampling.py::test_sample_k_identical_for_any_batch_size);
eager torch and OpenVINO block their GEMMs by batch size, so there the merged rows equal the separate runs to
float32 rounding only. This is what lets ``ddpm serve`` merge requests (docs/design.md, "Serving").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ddpm.diffusion import DynamicThreshold
from ddpm.errors import InvalidArgumentError
from ddpm.executors import StepJob, model_call
from ddpm.kernels import dynamic_thresholds, fused_step_raw
from ddpm.loop import run_reverse
from ddpm.noise import check_seed, initial_noise
from ddpm.schedule import COEF_P, COEF_Q
from ddpm.validate import MAX_NUM_SAMPLES

from .sampling import SamplingPlan

__all__ = ["Segment", "SegmentedExecutor", "sample_segments"]


@dataclass(frozen=True)
class Segment:
    """``n`` consecutive samples of one run: global samples ``first .. first + n - 1`` of seed ``seed``."""

    seed: int
    first: int
    n: int

    def __post_init__(self) -> None:
        check_seed(self.seed)
        for name in ("first", "n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidArgumentError(f"segment {name} must be an integer, got {v!r}")
        if self.n < 1 or self.first < 0 or self.first + self.n > MAX_NUM_SAMPLES:
            raise InvalidArgumentError(
                f"a segment holds n >= 1 samples within 0..{MAX_NUM_SAMPLES - 1}, got first {self.first}, "
                f"n {self.n}"
            )


def _spans(segments: Sequence[Segment]) -> list[tuple[int, int, Segment]]:
    spans, a = [], 0
    for seg in segments:
        spans.append((a, a + seg.n, seg))
        a += seg.n
    return spans


class SegmentedExecutor:
    """The fused step per contiguous segment (a :class:`ddpm.loop.StepExecutor`): one network call per step on
    the whole batch, then one kernel call per segment with that segment's seed and first global sample index.
    The plan's own seed is not used. Like runtime/img2img.py's SharedNoiseExecutor, but per segment; a
    learned variance, guidance's unconditional half and dynamic thresholds are passed as ddpm/executors.py's
    FusedExecutor passes them, sliced to the segment."""

    def __init__(self, segments: Sequence[Segment]) -> None:
        if not segments:
            raise InvalidArgumentError("a segmented run needs at least one segment")
        self.spans = _spans(segments)
        self.rows = self.spans[-1][1]

    def bind(
        self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], job: StepJob
    ) -> Callable[[int], torch.Tensor]:
        x, h, plan, rows = job.x, job.history, job.plan, job.rows32
        if x.shape[0] != self.rows:
            raise InvalidArgumentError(f"x has {x.shape[0]} rows; the segments hold {self.rows}")
        spans = self.spans
        # the operands as FusedExecutor passes them (ddpm/executors.py), each sliced to the segment's rows
        dynamic = plan.clip if isinstance(plan.clip, DynamicThreshold) else None
        clip = math.inf if dynamic is not None else plan.clip
        call = model_call(model, job)  # (m, learned variance v, guidance's unconditional u), one forward

        def step(i: int) -> torch.Tensor:
            m, v, u = call(i, x)
            row = rows[i]
            g = plan.guidance if u is not None else 1.0
            thr = None  # per-sample quantiles: computed once over the batch, each row its own
            if dynamic is not None:
                thr = dynamic_thresholds(x, m, row[COEF_P], row[COEF_Q], dynamic, uncond=u, guidance=g)
            for a, b, seg in spans:
                xs, kw = x[a:b], {}
                if h is not None:
                    kw["history"] = h[a:b]
                if v is not None:
                    kw["variance"] = v[a:b]
                if u is not None:
                    kw.update(uncond=u[a:b], guidance=g)
                if thr is not None:
                    kw["thresholds"] = thr[a:b]
                fused_step_raw(xs, m[a:b], row, clip, seg.seed, i, seg.first, xs, **kw)
            return x

        return step


def sample_segments(backend: Any, plan: SamplingPlan, segments: Sequence[Segment]) -> torch.Tensor:
    """The samples of every segment, concatenated: [sum n, *sample_shape] float32 on ``backend.device``.

    Segment k's rows equal ``sample_run(backend, ..., seed=seed_k)``'s samples ``first_k .. first_k + n_k - 1``
    (bitwise on a batch-invariant runtime: see the module docstring). No NaN/Inf watch here: a caller serving
    several requests checks each segment's rows itself, so one bad run does not fail the others."""
    executor = SegmentedExecutor(segments)
    dev = backend.device
    x = torch.cat(
        [
            initial_noise(s.seed, (s.n, *plan.sample_shape), sample_offset=s.first, device=dev)
            for _, _, s in executor.spans
        ]
    )
    # a conditional model's classes, cycled over each segment's own global sample indices (as ddpm run does)
    y = (
        None
        if plan.classes is None
        else torch.cat([plan.class_rows(s.first, s.n, dev) for _, _, s in executor.spans])
    )
    with torch.no_grad():
        return run_reverse(backend, x, plan, kernel=executor, y=y)
