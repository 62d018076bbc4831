"""What ``ddpm bench`` measures (:class:`BenchConfig`), checked before minutes of measuring."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ddpm.artifacts import artifact_kind, read_metadata
from ddpm.cliutil import parse_int_list
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.options import RUNTIMES, SamplingOptions
from ddpm.precision import parse_precision
from ddpm.runtime.sampling import plan_run

__all__ = ["BenchConfig"]


@dataclass
class BenchConfig:
    """What to measure.

    engines: checkpoints / ONNX files / TensorRT engines (all of one model family or not: each is baselined
        against its own architecture).
    batches: batch sizes.  steps: loop length (None = the model's T).  sampler: the engine loop's sampler
        (any name ddpm.Sampler accepts); the eager baseline is always the DDPM loop.
    ckpt: checkpoint for the eager baseline when an engine is not itself a checkpoint; without it the baseline
        is the same architecture (from the engine's metadata) with random weights — the latency is the same.
    repeats: timed calls per forward measurement (>= 3: a median and a p90 of fewer mean little).
    loop_budget_s: time one loop measurement may take before it is timed over fewer steps and scaled.
    threads: CPU threads of every runtime, the eager baseline and the fused kernel (None: the cores this process
        may use, ddpm.devices.default_cpu_threads).
    runtimes / precisions: restrict the runtime x precision comparison (None: every one available here).
    classes / guidance: a class-conditional engine's classes and classifier-free guidance scale, as ``ddpm run``
        takes them (guided: every stage evaluates the 2N-row forward; the eager baseline combines in torch).
    """

    engines: list[Path]
    batches: list[int] = field(default_factory=lambda: [1, 64])
    steps: int | None = None
    sampler: str = "ddpm"
    device: str = "auto"
    ckpt: Path | None = None
    repeats: int = 20
    loop_budget_s: float = 20.0
    cuda_graph: bool = False
    threads: int | None = None
    seed: int = 0
    command: str = ""
    runtimes: list[str] | None = None
    precisions: list[str] | None = None
    classes: str | None = None
    guidance: float | None = None

    def check(self) -> None:
        """Every option, and every engine with the sampling options and batch sizes through the checks ``ddpm run``
        makes (``ddpm.runtime.sampling.plan_run``), before minutes of measuring."""
        if not self.engines:
            raise InvalidArgumentError("give at least one --engine")
        for e in self.engines:
            if not Path(e).exists():
                raise ArtifactError(f"engine file {str(e)!r} does not exist")
        sampling = self.sampling  # validated as ddpm run validates its options
        if self.repeats < 3:
            raise InvalidArgumentError(f"--repeats must be >= 3, got {self.repeats}")
        if not self.loop_budget_s > 0:
            raise InvalidArgumentError(f"--loop-budget must be > 0 seconds, got {self.loop_budget_s}")
        if self.ckpt is not None and artifact_kind(self.ckpt) not in ("checkpoint", "diffusers"):
            raise InvalidArgumentError(
                f"--ckpt {str(self.ckpt)!r} must be a checkpoint or a diffusers folder"
            )
        batches = parse_int_list(self.batches, option="--batch")
        known = {r for rs in RUNTIMES.values() for r in rs}
        for r in self.runtimes or []:
            if r not in known:
                raise InvalidArgumentError(f"unknown runtime {r!r}; allowed: {', '.join(sorted(known))}")
        for p in self.precisions or []:
            parse_precision(p)
        for e in self.engines:
            plan_run(read_metadata(e), sampling, batches)

    @property
    def sampling(self) -> SamplingOptions:
        """The engine loop's sampling options (what ``ddpm run`` would be given)."""
        return SamplingOptions.from_cli(
            steps=self.steps, sampler=self.sampler, seed=self.seed, device=self.device, threads=self.threads,
            cuda_graph=self.cuda_graph, classes=self.classes, guidance=self.guidance,
        )  # fmt: skip
