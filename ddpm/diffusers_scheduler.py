"""A diffusers scheduler config as our training facts: schedule, prediction, variance, recommended sampling.

The training-time forward process is mapped exactly (tested against diffusers' own ``alphas_cumprod``):
``beta_schedule`` linear -> our "linear", scaled_linear -> "scaled_linear", squaredcos_cap_v2 -> "cosine",
``trained_betas`` -> "custom"; ``prediction_type`` epsilon / sample / v_prediction -> eps / x0 / v;
``variance_type`` fixed_small(_log) / fixed_large / learned_range -> ``variance``. The scheduler's class only
sets the recommended sampling (``metadata["sampling"]``): DDPMScheduler -> ddpm over all T steps, DDIMScheduler
-> ddim 50, DPMSolverMultistepScheduler -> dpm++2m 20 (dpm++2m-sde for its SDE algorithms); clip =
``clip_sample_range`` when ``clip_sample``. What changes the process in a way our sampler does not reproduce
(thresholding, zero-terminal-SNR rescaling, other schedules or classes) is refused with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ArtifactError, InvalidArgumentError
from .schedule import Schedule
from .validate import MAX_TIMESTEPS, Bool, Float, Int, ListOf, Optional, Record, SchemaError, Str, check

__all__ = ["SCHEDULERS", "scheduler_facts"]

# scheduler class -> the sampler we recommend and how many steps (None: all T, ancestral as trained).
SCHEDULERS = {
    "DDPMScheduler": ("ddpm", None),
    "DDIMScheduler": ("ddim", 50),
    "DPMSolverMultistepScheduler": ("dpm++2m", 20),
}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# fixed_small_log is fixed_small's variance computed in log space; "learned" and fixed_large_log are refused.
_VARIANCES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "learned_range": "learned_range",
}
# diffusers' scheduler defaults for the keys read here (the ones a config.json may leave out).
_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "variance_type": None, "clip_sample": False,
    "clip_sample_range": 1.0, "thresholding": False, "rescale_betas_zero_snr": False, "algorithm_type": "dpmsolver++",
}  # fmt: skip
_CLASS_DEFAULTS = {
    "DDPMScheduler": {"variance_type": "fixed_small", "clip_sample": True},
    "DDIMScheduler": {"clip_sample": True},
}
_SCHEDULER_SPEC = Record(
    {
        "num_train_timesteps": Int(1, MAX_TIMESTEPS),
        "beta_start": Float(0, 1, True, True),
        "beta_end": Float(0, 1, True, True),
        "beta_schedule": Str(max_len=64),
        "trained_betas": Optional(ListOf(Float(0, 1, True, True), 1, MAX_TIMESTEPS)),
        "prediction_type": Str(max_len=64),
        "variance_type": Optional(Str(max_len=64)),
        "clip_sample": Bool(),
        "clip_sample_range": Float(0, 1e30, open_lo=True),
        "thresholding": Bool(),
        "rescale_betas_zero_snr": Bool(),
        "algorithm_type": Str(max_len=64),
    },
    extra=True,
)


def scheduler_facts(sched: dict[str, Any], path: Path, model: dict[str, Any]) -> dict[str, Any]:
    """schedule, prediction, variance and the recommended sampling from a scheduler config."""
    cls = sched.get("_class_name")
    if cls not in SCHEDULERS:
        raise ArtifactError(
            f"{path}: scheduler _class_name {cls!r:.60} is not supported; allowed: {', '.join(SCHEDULERS)}"
        )
    known = {**_SCHEDULER_DEFAULTS, **_CLASS_DEFAULTS.get(cls, {})}
    try:
        cfg = check(
            _SCHEDULER_SPEC, {**known, **{k: v for k, v in sched.items() if k in known}}, "scheduler config"
        )
    except SchemaError as e:
        raise ArtifactError(f"{path}: {e}") from None

    def refuse(key: str, why: str) -> ArtifactError:
        return ArtifactError(f"{path}: {key} = {cfg[key]!r:.60} is not supported{why}")

    if cfg["thresholding"]:
        raise refuse("thresholding", " yet (dynamic thresholding of x0, Saharia et al. 2022)")
    if cfg["rescale_betas_zero_snr"]:
        raise refuse(
            "rescale_betas_zero_snr", " (zero terminal SNR: alphabar_T = 0 has no eps-to-x0 conversion)"
        )
    steps = cfg["num_train_timesteps"]
    try:
        schedule = _schedule(cfg, refuse)
    except InvalidArgumentError as e:
        raise ArtifactError(f"{path}: {e}") from None
    if cfg["prediction_type"] not in _PREDICTIONS:
        raise refuse("prediction_type", f"; allowed: {', '.join(_PREDICTIONS)}")
    variance = "fixed_small" if cfg["variance_type"] is None else _VARIANCES.get(cfg["variance_type"])
    if variance is None:
        raise refuse("variance_type", f"; allowed: {', '.join(_VARIANCES)}")
    learned = model["out_channels"] == 2 * model["in_channels"]
    if learned != (variance == "learned_range"):
        raise ArtifactError(
            f"{path}: variance_type {cfg['variance_type']!r} does not fit the UNet, which outputs "
            f"{model['out_channels']} channels for {model['in_channels']} (learned_range models, and only they, "
            "output twice the input channels)"
        )
    sampler, n = SCHEDULERS[cls]
    if cls == "DPMSolverMultistepScheduler" and cfg["algorithm_type"].startswith("sde-"):
        sampler = "dpm++2m-sde"
    clip = cfg["clip_sample_range"] if cfg["clip_sample"] and cls != "DPMSolverMultistepScheduler" else None
    return {
        "schedule": schedule.config,
        "prediction": _PREDICTIONS[cfg["prediction_type"]],
        "variance": variance,
        "sampling": {"sampler": sampler, "steps": min(n or steps, len(schedule)), "clip": clip},
    }


def _schedule(cfg: dict[str, Any], refuse: Any) -> Schedule:
    """Our schedule for diffusers' betas: trained_betas -> custom, linear, scaled_linear, squaredcos_cap_v2 ->
    cosine (the same alphabar, Nichol & Dhariwal's s = 0.008 and the 0.999 cap)."""
    steps = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        if len(cfg["trained_betas"]) != steps:
            raise refuse(
                "trained_betas", f" with {len(cfg['trained_betas'])} betas for num_train_timesteps {steps}"
            )
        return Schedule.from_betas(cfg["trained_betas"])
    kind = cfg["beta_schedule"]
    if kind == "linear":
        return Schedule.linear(steps, cfg["beta_start"], cfg["beta_end"])
    if kind == "scaled_linear":
        return Schedule.scaled_linear(steps, cfg["beta_start"], cfg["beta_end"])
    if kind == "squaredcos_cap_v2":
        return Schedule.cosine(steps)
    raise refuse("beta_schedule", "; allowed: linear, scaled_linear, squaredcos_cap_v2 (or trained_betas)")
