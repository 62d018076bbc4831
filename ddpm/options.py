"""Sampling options: one frozen value, validated once where it is made, then handed inward whole.

Every front door makes one (the ``ddpm run`` / ``denoise`` / ``interpolate`` / ``bench`` commands, the keyword
API ``ddpm.sample(...)``, an HTTP request body) and every layer below it trusts it: strings have become enums,
numbers are in range, and impossible combinations were refused with a message naming the option. Variants are
``dataclasses.replace(options, seed=...)``, which validates again. (improved-diffusion's ``script_util`` is the
model: strings become objects in one place; docs/design.md, "Sampling options".)

Fields left at None are *unset*: :meth:`SamplingOptions.resolve` fills them from the artifact's recommendation
(``recommended=True``, what ``ddpm run`` does) or from the plain defaults (DDPM, all T steps, no clipping).

Adding an option is one field here (its default, its check in ``_CHECKS``) plus its use where it acts.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .diffusion import DynamicThreshold, check_clip
from .errors import InvalidArgumentError
from .metadata import class_info, recommended_sampling
from .noise import check_seed
from .precision import Precision, parse_precision
from .schedule import Sampler, Spacing, Variance
from .validate import MAX_NUM_SAMPLES, MAX_TIMESTEPS

__all__ = [
    "KERNELS",
    "RUNTIMES",
    "MAX_THREADS",
    "OptionError",
    "SamplingOptions",
    "check_num_samples",
    "check_device_name",
    "cli_classes",
]

# How a step executes (ddpm/loop.py): the fused C++/CUDA kernel, or the plain torch reference step.
KERNELS = ("fused", "reference")
# artifact kind -> the runtimes that can run it, its default first (ddpm.artifacts names the kinds)
RUNTIMES: dict[str, tuple[str, ...]] = {
    "checkpoint": ("torch",),
    "diffusers": ("torch",),
    "onnx": ("onnxruntime", "openvino"),
    "tensorrt": ("tensorrt",),
}
# CPU threads: far above any machine's cores, below a typo that would spawn a thread per sample.
MAX_THREADS = 1024
# Classes: a conditional model has at most MAX_CLASSES (ImageNet has 1000); a --class list cycles over samples.
MAX_CLASSES = 100_000
MAX_CLASS_LIST = 65_536


class OptionError(InvalidArgumentError):
    """An option is out of range. ``option`` is its field name; :meth:`for_cli` words it as the flag."""

    def __init__(self, option: str, text: str) -> None:
        self.option, self.text = option, text
        super().__init__(f"{option} {text}")

    def for_cli(self) -> InvalidArgumentError:
        """The same message naming ``--the-flag`` instead of the field."""
        return InvalidArgumentError(f"--{self.option.replace('_', '-')} {self.text}")


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise OptionError(name, f"must be an integer in {lo}..{hi}, got {value!r}") from None
    if not lo <= v <= hi:
        raise OptionError(name, f"must be an integer in {lo}..{hi}, got {v}")
    return v


def check_num_samples(n: Any, name: str = "num_samples") -> int:
    """How many samples a run draws: 1 .. 2^32 (sample indices are 32-bit Philox counter words)."""
    try:
        if isinstance(n, bool):
            raise TypeError
        v = operator.index(n)
    except TypeError:
        raise OptionError(name, f"must be an integer >= 1, got {n!r}") from None
    if v < 1:
        raise OptionError(name, f"must be >= 1, got {v}")
    if v > MAX_NUM_SAMPLES:
        raise OptionError(name, f"must be <= {MAX_NUM_SAMPLES}, got {v}")
    return v


def cli_classes(by_number_or_name: str | None, by_name: str | None) -> str | None:
    """``--class`` and ``--class-names`` as one ``classes`` text (only one may be given)."""
    if by_number_or_name is not None and by_name is not None:
        raise InvalidArgumentError("give --class or --class-names, not both")
    if by_name is not None and any(p.strip().isdigit() for p in by_name.split(",")):
        raise InvalidArgumentError(
            f"--class-names takes the model's class names, got {by_name!r}; numbers go to --class"
        )
    return by_number_or_name if by_number_or_name is not None else by_name


def check_device_name(device: Any) -> str:
    """``auto | cpu | cuda | cuda:N``, by syntax only (whether the GPU exists is asked when a backend opens)."""
    spec = str(device).strip().lower()
    if spec in ("auto", "cpu", "cuda"):
        return spec
    head, _, index = spec.partition(":")
    if head == "cuda" and index.isdigit():
        return f"cuda:{int(index)}"
    raise InvalidArgumentError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N")


def _enum(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    # the enums' own parse errors already name the option and list the allowed values
    return lambda value: None if value is None else parse(value)


def _steps(value: Any) -> int:
    # the model's T bounds it too; that is checked when the plan meets the artifact (SamplingPlan.for_artifact)
    try:
        return _int("steps", value, 1, MAX_TIMESTEPS)
    except OptionError:
        raise OptionError(
            "steps",
            f"must be an integer >= 1 (and at most the model's T, <= {MAX_TIMESTEPS}), got {value!r}",
        ) from None


def _batch(value: Any) -> int:
    # no fixed upper bound: batch x one sample's values is capped when the sample shape is known
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise OptionError("batch", f"must be an integer >= 1, got {value!r}") from None
    if v < 1:
        raise OptionError("batch", f"must be >= 1, got {v}")
    return v


def _classes(value: Any) -> tuple[int | str, ...]:
    """``7``, ``"0,1,2"``, ``["cat", "dog"]`` -> a non-empty tuple of class numbers (>= 0) and names."""
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    else:
        items = list(value) if isinstance(value, (list, tuple, range)) else [value]
    out: list[int | str] = []
    for item in items:
        if isinstance(item, bool):
            raise OptionError("class", f"must be class numbers or names, got {value!r}")
        if isinstance(item, str):
            item = item.strip()
            if not item or len(item) > 256:
                raise OptionError("class", f"must be class numbers or names (comma-separated), got {value!r}")
            out.append(int(item) if item.isdigit() else item)
        else:
            try:
                out.append(_int("classes", item, 0, MAX_CLASSES))
            except OptionError:
                raise OptionError(
                    "class", f"must be class numbers in 0..{MAX_CLASSES} or names, got {value!r}"
                ) from None
    if not out or len(out) > MAX_CLASS_LIST:
        raise OptionError("class", f"must name 1..{MAX_CLASS_LIST} classes, got {len(out)}")
    return tuple(out)


def _guidance(value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise OptionError("guidance", f"must be a finite number, got {value!r}") from None
    if not math.isfinite(v) or abs(v) > 1e6:
        raise OptionError("guidance", f"must be a finite number (|S| <= 1e6), got {value!r}")
    return v


def _threads(value: Any) -> int:
    try:
        return _int("threads", value, 1, MAX_THREADS)
    except OptionError:
        raise OptionError("threads", f"must be an integer >= 1 and <= {MAX_THREADS}, got {value!r}") from None


def _eta(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OptionError("eta", f"must be a finite number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise OptionError("eta", f"must be a finite number >= 0, got {v}")
    return v


def _clip(value: Any) -> float | DynamicThreshold | None:
    if value is None or isinstance(value, DynamicThreshold):
        return value
    if isinstance(value, str) and value.strip().lower().startswith("dynamic"):
        return DynamicThreshold.parse(value)  # its errors name the text and the form it takes
    if isinstance(value, bool):
        raise OptionError("clip", f"must be a positive number (inf: no clipping), got {value!r}")
    try:
        return check_clip(value)
    except (InvalidArgumentError, TypeError, ValueError):
        raise OptionError(
            "clip", f"must be a positive number, inf (no clipping) or dynamic:RATIO[:MAX], got {value!r}"
        ) from None


def _seed(value: Any) -> int:
    try:
        return check_seed(value)
    except InvalidArgumentError:
        raise OptionError("seed", f"must be an integer in [0, 2^64), got {value!r}") from None


def _kernel(value: Any) -> str:
    name = str(value).strip().lower()
    if name not in KERNELS:
        raise InvalidArgumentError(f"unknown kernel {value!r}; allowed: {', '.join(KERNELS)}")
    return name


def _runtime(value: Any) -> str | None:
    if value is None or str(value).strip().lower() == "auto":
        return None
    name = str(value).strip().lower()
    known = list(dict.fromkeys(r for rs in RUNTIMES.values() for r in rs))
    if name not in known:
        raise InvalidArgumentError(f"unknown runtime {value!r}; allowed: auto, {', '.join(known)}")
    return name


def _flag(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise OptionError(name, f"must be true or false, got {value!r}")
        return value

    return check


# field -> its check: returns the normalised value or raises OptionError naming the field
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "sampler": _enum(Sampler.parse),
    "steps": lambda v: None if v is None else _steps(v),
    "spacing": _enum(Spacing.parse),
    "eta": _eta,
    "variance": _enum(Variance.parse),
    "clip": _clip,
    "seed": _seed,
    "kernel": _kernel,
    "runtime": _runtime,
    "precision": _enum(parse_precision),
    "device": check_device_name,
    "batch": lambda v: _batch(v),
    "threads": lambda v: None if v is None else _threads(v),
    "cuda_graph": _flag("cuda_graph"),
    "compile": _flag("compile"),
    "recommended": _flag("recommended"),
    "classes": lambda v: None if v is None else _classes(v),
    "guidance": lambda v: None if v is None else _guidance(v),
}


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample, whatever the artifact: validated on construction (:class:`OptionError` names the field).

    Attributes:
        sampler: ddpm | ddim | dpm++2m | dpm++2m-sde; None: the model's recommendation, else ddpm.
        steps: sampling steps N (respaced; <= the model's T, checked against it when the plan is made);
            None: the recommendation, else all T.
        spacing: which N timesteps (uniform | trailing | logsnr); None: the sampler's default.
        eta: DDIM's eta (0 deterministic); the multistep solvers need 0.
        variance: fixed_small | fixed_large | learned_range (DDPM's reverse variance); None: the model's own.
        clip: bound on the predicted x0 (math.inf: none), or a :class:`ddpm.diffusion.DynamicThreshold`
            (``"dynamic:0.995"``: Imagen's per-sample thresholding); None: the recommendation, else none.
        seed: the Philox key, 0 <= seed < 2^64.
        kernel: fused (the C++/CUDA kernel) | reference (plain torch ``ddpm.step``).
        runtime: None (the artifact's default) | onnxruntime | openvino | torch | tensorrt.
        precision: the network's arithmetic fp32 | bf16 | fp16; None: the artifact's own.
        device: auto | cpu | cuda | cuda:N.  batch: samples per reverse loop call.
        threads: CPU inference threads (None: the usable cores).  cuda_graph / compile: GPU graph replay,
            torch.compile of a checkpoint.
        recommended: unset fields take the artifact's recommendation (its training previews' sampler, steps,
            clip), as ``ddpm run`` does; otherwise the plain defaults.
        classes: the class of each sample, cycled over the global sample index (sample k gets
            classes[k % len]): numbers, or names a conditional model records; None: a conditional model samples
            its null class (unconditionally), an unconditional one needs none.
        guidance: classifier-free guidance scale S, m = m_u + S (m_c - m_u) (diffusers' convention: 1 = plain
            conditional, 0 = unconditional); None: 1.
    """

    sampler: Sampler | None = None
    steps: int | None = None
    spacing: Spacing | None = None
    eta: float = 0.0
    variance: Variance | None = None
    clip: float | DynamicThreshold | None = None
    seed: int = 0
    kernel: str = "fused"
    runtime: str | None = None
    precision: Precision | None = None
    device: str = "auto"
    batch: int = 64
    threads: int | None = None
    cuda_graph: bool = False
    compile: bool = False
    recommended: bool = False
    classes: tuple[int | str, ...] | None = None
    guidance: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _CHECKS[f.name](getattr(self, f.name)))
        # combinations known without the artifact
        if self.sampler is not None and self.sampler.multistep and self.eta != 0.0:
            raise OptionError(
                "eta",
                f"applies to the ddim sampler only; sampler {self.sampler} needs eta = 0, got {self.eta} "
                f"(use {Sampler.DPMPP_2M_SDE} for a stochastic multistep sampler)",
            )
        if self.cuda_graph and self.kernel != "fused":
            raise OptionError(
                "cuda_graph", "records the fused kernel; it cannot be combined with --kernel reference"
            )
        if self.cuda_graph and self.device == "cpu":
            raise OptionError("cuda_graph", "needs a CUDA device; this run is on cpu")

    @classmethod
    def from_cli(cls, **fields: Any) -> SamplingOptions:
        """Options from command-line values: a bad one is reported by its flag (``--steps must ...``)."""
        try:
            return cls(**fields)
        except OptionError as e:
            raise e.for_cli() from None

    def replace(self, **changes: Any) -> SamplingOptions:
        """``dataclasses.replace``: a variant, validated like the original."""
        return dataclasses.replace(self, **changes)

    def with_defaults(self, *, variance: Variance | str = Variance.FIXED_SMALL) -> SamplingOptions:
        """The plain defaults in place of unset fields: ddpm, no clipping, ``variance``; steps stays None."""
        return self.replace(
            sampler=Sampler.DDPM if self.sampler is None else self.sampler,
            clip=math.inf if self.clip is None else self.clip,
            variance=variance if self.variance is None else self.variance,
        )

    def resolve(self, meta: dict[str, Any]) -> tuple[SamplingOptions, dict[str, Any]]:
        """Concrete options for an artifact's (validated) metadata, and what was taken from its recommendation.

        sampler / steps / clip left unset take the artifact's ``sampling`` recommendation when ``recommended``
        (``ddpm.metadata.recommended_sampling``), else ddpm / None (all T steps) / inf; variance left unset is
        the model's own (metadata ``variance``, fixed_small when absent). The result has a sampler, a variance
        and a clip; steps may stay None (= T) and spacing None (= the sampler's default)."""
        rec = recommended_sampling(meta) if self.recommended else {}
        taken = {k: v for k, v in rec.items() if getattr(self, k) is None}
        picked = self.replace(
            sampler=taken.get("sampler", self.sampler),
            steps=taken.get("steps", self.steps),
            clip=math.inf if "clip" in taken and taken["clip"] is None else taken.get("clip", self.clip),
            classes=_class_indices(meta, self.classes, self.guidance),
        )
        return picked.with_defaults(variance=meta.get("variance", Variance.FIXED_SMALL)), taken


def _class_indices(meta: dict[str, Any], classes: tuple[int | str, ...] | None, guidance: float | None):
    """The classes as indices of the artifact's (``ddpm.metadata.class_info``), checked: none for an
    unconditional model; the null class when a conditional one is given none (unconditional sampling, if it was
    trained with label dropout); guidance only where the null class was trained. The null index itself is
    accepted (it asks for unconditional samples, and it is what an already resolved value holds)."""
    info = class_info(meta)
    if info is None:
        if classes is not None:
            raise OptionError("class", "needs a class-conditional model; this one is unconditional")
        if guidance not in (None, 1.0):
            raise OptionError("guidance", "needs a class-conditional model; this one is unconditional")
        return None
    if guidance not in (None, 1.0) and (info.null is None or not info.p_uncond):
        why = (
            "its metadata knows no null class" if info.null is None else f"classes.p_uncond = {info.p_uncond}"
        )
        raise OptionError(
            "guidance", f"needs a model trained with label dropout (an unconditional null class); {why}"
        )
    if classes is None:
        if info.null is None:
            raise OptionError(
                "class", f"this model is class-conditional ({info.count} classes): give --class"
            )
        return (info.null,)
    try:
        return tuple(c if c == info.null and isinstance(c, int) else info.index_of(c) for c in classes)
    except InvalidArgumentError as e:
        extra = "" if info.null is None else f" ({info.null}: the null class, unconditional)"
        raise OptionError("class", str(e).removeprefix("class ") + extra) from None
