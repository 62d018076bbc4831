"""What fixes a reverse run's numbers, apart from the model and x: :class:`ReversePlan` (the schedule, the
prediction, the sampler, variance, eta, clip and seed) and its coefficient table, built once per run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from .diffusion import DynamicThreshold
from .errors import InvalidArgumentError
from .options import SamplingOptions
from .schedule import NUM_COEFS_LEARNED, Prediction, Sampler, Schedule, Variance

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the package supports 3.10
    from typing_extensions import Self

__all__ = ["ReversePlan", "rows32"]


@dataclass(frozen=True)
class ReversePlan:
    """Everything that fixes a reverse run's numbers except the model and x (see :meth:`create`).

    Attributes:
        schedule: the (possibly respaced) schedule; entry i feeds the model ``schedule.timesteps[i]``.
        prediction / sampler / variance / eta: select the [steps, 6] coefficient table (a, b, c, p, q, sigma).
        clip: the bound on x0_hat (math.inf = no clipping), or a DynamicThreshold.
        seed: the Philox key, 0 <= seed < 2^64.
        guidance: classifier-free guidance scale S (diffusers' convention: m = m_u + S (m_c - m_u)); 1 = plain
            conditional (one forward of N rows), 0 = the null class only, anything else one forward of 2N rows.
        null: the null class's index (what the unconditional half is fed); None when the model has none.
    """

    schedule: Schedule
    prediction: Prediction = Prediction.EPS
    sampler: Sampler = Sampler.DDPM
    variance: Variance = Variance.FIXED_SMALL
    eta: float = 0.0
    clip: float | DynamicThreshold = math.inf
    seed: int = 0
    guidance: float = 1.0
    null: int | None = None

    @classmethod
    def create(
        cls,
        schedule: Schedule,
        options: SamplingOptions | None = None,
        *,
        prediction: Prediction | str = "eps",
        null: int | None = None,
        **extra: Any,
    ) -> Self:
        """The plan of ``options`` (validated when they were made; unset fields take the plain defaults: ddpm,
        no clipping, fixed_small) on ``schedule``; ``extra`` fields are a subclass's (ddpm.runtime's
        SamplingPlan adds the sample shape and the kernel name). The table is built here, once."""
        if not isinstance(schedule, Schedule):
            raise InvalidArgumentError(f"schedule must be a ddpm.Schedule, got {type(schedule).__name__}")
        opts = (options or SamplingOptions()).with_defaults()
        plan = cls(
            schedule=schedule,
            prediction=Prediction.parse(prediction),
            sampler=opts.sampler,
            variance=opts.variance,
            eta=opts.eta,
            clip=opts.clip,
            seed=opts.seed,
            guidance=1.0 if opts.guidance is None else opts.guidance,
            null=null,
            **extra,
        )
        if plan.guidance != 1.0 and null is None:
            raise InvalidArgumentError(
                f"guidance {plan.guidance:g} needs the model's null class (a model trained with label dropout); "
                "this one has none"
            )
        plan.table  # noqa: B018 - build (and let the solver validate) the table now, not inside the loop
        return plan

    @property
    def steps(self) -> int:
        return len(self.schedule)

    @cached_property
    def table(self) -> np.ndarray:
        """[steps, 6] float64 (a, b, c, p, q, sigma), read-only; row i is step i (0 = cleanest)."""
        return self.schedule.coefficients(self.prediction, self.sampler, self.variance, self.eta)

    @cached_property
    def rows32(self) -> list[tuple[float, ...]]:
        """The table cast once to float32 (what the kernels compute with), one tuple per step."""
        return rows32(self.table)

    @property
    def clip_or_none(self) -> float | DynamicThreshold | None:
        return self.clip if isinstance(self.clip, DynamicThreshold) or not math.isinf(self.clip) else None

    @property
    def guided(self) -> bool:
        """True when a step evaluates both halves (conditional and null) in one forward of 2N rows."""
        return self.guidance not in (0.0, 1.0)

    @property
    def learned_variance(self) -> bool:
        """True when the table is 8 wide: ddpm with the model's learned-range variance (sigma per element)."""
        return self.table.shape[1] == NUM_COEFS_LEARNED


def rows32(table: np.ndarray) -> list[tuple[float, ...]]:
    return [tuple(float(v) for v in row) for row in table.astype(np.float32)]
