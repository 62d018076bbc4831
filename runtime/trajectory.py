"""``ddpm run --trajectory``: x_t and the predicted x0 every few steps of a sampling run, as an image table.

:class:`TrajectoryRecorder` wraps the backend (``sample_run``'s ``model_hook``), so it sees the exact x and model
output m of each step without another model call, and never slows a run that does not ask for it.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ddpm.errors import InvalidArgumentError
from ddpm.images import save_image_table
from ddpm.loop import ReversePlan
from ddpm.schedule import COEF_P, COEF_Q

from .sampling import image_shape

__all__ = ["TrajectoryRecorder"]


class _Recording:
    """A backend that shows each call's (x, m) to a :class:`TrajectoryRecorder`; everything else is the
    backend's. ``capturable`` is False: a CUDA graph would replay the call without this Python wrapper."""

    capturable = False

    def __init__(self, backend: Any, recorder: TrajectoryRecorder) -> None:
        self._backend, self._recorder = backend, recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = self._backend(x, t)
        self._recorder.see(x, m)
        return m


class TrajectoryRecorder:
    """``ddpm run --trajectory``: x_t and x0_hat = clip(p_i x + q_i m) (docs/design.md, "The step") at steps
    i = start, start - K, ..., and 0, for the first ``keep`` samples.

    It wraps the backend (:meth:`hook`, ``sample_run``'s ``model_hook``), so it sees the exact x and model
    output m of each step without another model call; the loop calls the model once per step, in the order
    i = start .. 0 (ddpm.loop.StepExecutor), so the call count gives i. Nothing is copied at other steps, and
    a run without --trajectory never creates it.
    """

    def __init__(self, every: int | None = None, keep: int = 4) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise InvalidArgumentError(f"--every must be an integer >= 1, got {every!r}")
        self.every, self.keep = every, keep
        self.plan: ReversePlan | None = None
        self.columns: list[int] = []
        self._calls = self._have = self._take = 0
        self._seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def hook(self, backend: Any, plan: ReversePlan) -> _Recording:
        image_shape(backend.meta, source="--trajectory: the engine")
        steps = plan.steps
        every = self.every or max(1, steps // 8)
        self.plan, self.columns = plan, sorted({*range(steps - 1, -1, -every), 0}, reverse=True)
        return _Recording(backend, self)

    def see(self, x: torch.Tensor, m: torch.Tensor) -> None:
        plan = self.plan
        assert plan is not None, "TrajectoryRecorder.hook must run first"
        steps = plan.steps
        if self._calls % steps == 0:  # a batch begins: its first rows until `keep` samples are held
            self._take = min(self.keep - self._have, x.shape[0])
            self._have += self._take
        i = steps - 1 - self._calls % steps
        self._calls += 1
        if self._take > 0 and i in self.columns:
            row = plan.rows32[i]
            x0_hat = row[COEF_P] * x[: self._take] + row[COEF_Q] * m[: self._take]
            if math.isfinite(plan.clip):
                x0_hat = x0_hat.clamp(-plan.clip, plan.clip)
            self._seen.setdefault(i, []).append((x[: self._take].clone(), x0_hat))

    def cells(self) -> tuple[torch.Tensor, list[str], list[str]]:
        """[2 k, columns, C, H, W]: rows sample 0 x_t, sample 0 x0_hat, sample 1 x_t, ...; and the labels."""
        if self.plan is None or not self._seen:
            raise InvalidArgumentError("the trajectory recorder saw no sampling run")
        cols = [[torch.cat([pair[j] for pair in self._seen[i]]).cpu() for j in (0, 1)] for i in self.columns]
        grid = torch.stack([torch.stack(c) for c in cols], dim=2)  # [2 (x_t, x0_hat), k, columns, ...]
        k = grid.shape[1]
        grid = grid.transpose(0, 1).reshape(2 * k, len(self.columns), *grid.shape[3:])
        ts = self.plan.schedule.timesteps
        labels = [f"t={int(ts[i])}" for i in self.columns]
        return grid, labels, [f"#{j} {what}" for j in range(k) for what in ("x_t", "x0_hat")]

    def save(self, path: str | os.PathLike) -> os.PathLike:
        grid, cols, rows = self.cells()
        title = f"trajectory: x_t before step and predicted x0, every {self._every_label()}"
        return save_image_table(grid, path, col_labels=cols, row_labels=rows, title=title)

    def _every_label(self) -> str:
        return f"{self.columns[0] - self.columns[1]} steps" if len(self.columns) > 1 else "step"
