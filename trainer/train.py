"""The training loop: Ho et al. Algorithm 1 with AdamW, LR warmup, gradient clipping and an EMA of the weights.

    repeat: x0 ~ data, t ~ Uniform{0..T-1}, eps ~ N(0, I)
            x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps                       (q_sample)
            loss = || target(x0, eps, t) - model(x_t, t) ||^2              (eps, x0 or v target)

Reproducibility without RNG state: the random draws of step k (flips, t, eps, a class-conditional run's label
dropout: trainer/conditional.py, then the network's dropout) come from torch's global RNG re-seeded with a hash
of (seed, k), and batch k's indices from a permutation keyed by (seed, epoch).
So the whole random stream is a function of (seed, step), and ``--resume`` continues EXACTLY from the
training-state file (weights, EMA, AdamW moments, step, losses) — same loss trajectory as an uninterrupted run.

Run directory: model.safetensors (EMA weights + metadata), train_state.pt (resume point; loaded with
weights_only=True), config.json, samples.png (+ samples/step_*.png), loss.csv, loss.png. All writes atomic.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddpm.devices import resolve_device
from ddpm.diffusion import q_sample, training_target
from ddpm.errors import ArtifactError, InvalidArgumentError, TrainingError
from ddpm.io import write_text_atomic
from ddpm.models import build_model, count_params, preset_config
from ddpm.schedule import Prediction, Schedule

from .checkpoint import (
    CHECKPOINT_NAME,
    STATE_NAME,
    STATE_VERSION,
    check_optimizer_state,
    check_run_folder,
    load_train_state,
    save_checkpoint,
    save_train_state,
)
from .conditional import attach_labels, classes_meta, drop_labels
from .config import TrainConfig, jsonable_config
from .data import Dataset, load_dataset
from .distributed import DistContext, process_group
from .preview import draw_preview, plot_loss, preview_count, write_loss_csv, write_previews
from .progress import TrainProgress
from .report import Estimator, run_header
from .tblog import TensorBoardLog, require_tensorboard

__all__ = ["TrainConfig", "train", "STATE_NAME"]


def step_seed(seed: int, k: int, stream: int = 0) -> int:
    """A 64-bit seed hashed from (seed, stream, k) by SeedSequence, so nearby steps are unrelated.
    Stream 0: the random draws of training step k; stream 1: the permutation of epoch k."""
    return int(np.random.SeedSequence([seed, stream, k]).generate_state(1, np.uint64)[0])


class BatchOrder:
    """Indices of batch k without hidden state: epochs are permutations keyed by (seed, epoch); a batch never
    straddles two epochs (drop-last). A dataset smaller than the batch is sampled with replacement."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.b, self.seed = n, batch_size, seed
        self.per_epoch = max(1, n // batch_size)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def indices(self, k: int) -> torch.Tensor:
        epoch, j = divmod(k - 1, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch, stream=1))
            self._perm = (
                torch.randperm(self.n, generator=g)
                if self.n >= self.b
                else torch.randint(0, self.n, (self.per_epoch * self.b,), generator=g)
            )
            self._epoch = epoch
        return self._perm[j * self.b : (j + 1) * self.b]


def _lr_at(cfg: TrainConfig, k: int) -> float:
    """Linear warm-up to the peak, then constant (Ho et al.; the LR at step k does not depend on --iters, so
    extending a run with --resume --iters N follows the same curve) or cosine decay to 0 at step ``iters``."""
    if cfg.warmup and k < cfg.warmup:
        return cfg.lr * k / cfg.warmup
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.iters - cfg.warmup)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (k - cfg.warmup) / span)))
    return cfg.lr


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, k: int) -> None:
    # Ramp (1 + k) / (10 + k): early EMA weights follow the fast-changing model instead of its random init.
    d = min(decay, (1.0 + k) / (10.0 + k))
    ema_p = list(ema.parameters())
    torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - d)


def _model_config(cfg: TrainConfig, ds: Dataset, classes: int) -> dict[str, Any]:
    extra = {} if cfg.dropout is None else {"dropout": cfg.dropout}
    if classes:
        extra["num_classes"] = classes
    if ds.is_image:
        c, h, w = ds.sample_shape
        if h != w:
            raise InvalidArgumentError(f"images must be square, got {h}x{w}; pass --image-size")
        try:
            return preset_config(cfg.model, in_channels=c, image_size=h, **extra)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"--model {cfg.model} with {cfg.data} ({c}x{h}x{w}): {e}") from None
    if cfg.model != "mlp":
        raise InvalidArgumentError(
            f"--model {cfg.model} is an image UNet; {cfg.data} holds vectors: use --model mlp"
        )
    if "dropout" in extra:
        raise InvalidArgumentError("--dropout applies to UNet presets only")
    return preset_config("mlp", dim=ds.sample_shape[0])


def train(
    cfg: TrainConfig, *, on_step: Callable[[int, float], None] | None = None, dist_backend: str | None = None
) -> Path:
    """Train a denoiser; returns the checkpoint path (``cfg.out / "model.safetensors"``).

    ``on_step(k, loss)`` is called after each optimisation step (tests use it to interrupt a run).
    Under torchrun the run is data parallel (trainer/distributed.py): ``cfg.batch_size`` stays the global batch
    and rank 0 writes every file; ``dist_backend`` (nccl | gloo) overrides the device's default.
    """
    cfg = cfg.checked()  # the data-independent checks; the preset and its defaults follow the data
    if cfg.log_dir is not None:
        require_tensorboard()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with process_group(cfg.device, dist_backend) as dist:  # torchrun: DDP (trainer/distributed.py)
            return _train(cfg, on_step, dist)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, on_step: Callable[[int, float], None] | None, dist: DistContext) -> Path:
    out = Path(cfg.out)
    check_run_folder(out, resume=cfg.resume, overwrite=cfg.overwrite)
    device = dist.device(resolve_device(cfg.device))
    ds = load_dataset(cfg.data, image_size=cfg.image_size, flip=cfg.flip).to(device)
    ds, labels = attach_labels(ds, cfg.data) if cfg.cond == "class" else (ds, None)
    cfg, origin = cfg.resolved(ds.sample_shape, device.type)
    state = None
    if cfg.resume:  # options left out take the saved run's values (another device may pick another preset)
        trajectory = json.loads(json.dumps(cfg.trajectory()))
        state = load_train_state(
            out / STATE_NAME, trajectory=trajectory, iters=cfg.iters, defaults=set(origin)
        )
        cfg = dataclasses.replace(cfg, **state["inherited"])
        origin.update(dict.fromkeys(state["inherited"], "the resumed run"))
    dist.check_batch(cfg.batch_size, cfg.grad_accum)
    schedule = Schedule.create(cfg.schedule, cfg.timesteps)
    model_cfg = _model_config(cfg, ds, labels.count if labels is not None else 0)

    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_model(model_cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    start = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
        except (
            RuntimeError,
            ValueError,
            KeyError,
            TypeError,
            IndexError,
        ) as e:  # the ways torch says "misfit"
            raise ArtifactError(f"{out / STATE_NAME}: does not fit this model ({str(e)[:120]})") from None
        check_optimizer_state(opt, out / STATE_NAME)
        start, losses = int(state["step"]), [float(v) for v in state["losses"].tolist()]

    # DDP under torchrun: it broadcasts rank 0's (resumed) weights, then averages gradients over the ranks
    net = dist.wrap(model, device)
    meta = {
        "schedule": schedule.config,
        "prediction": str(Prediction.parse(cfg.prediction)),
        "dataset": cfg.data,
        "ema_decay": cfg.ema_decay,
        # what the previews were drawn with: `ddpm run` uses it unless told otherwise
        "sampling": {k: v for k, v in cfg.preview(ds.is_image).items() if k != "n"},
        **dist.facts(cfg.batch_size),
    }
    if labels is not None:
        meta["classes"] = classes_meta(labels, cfg.p_uncond)
    order = BatchOrder(len(ds), cfg.batch_size, cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    # losses and gradient norms not yet copied to the host (one sync per flush, not per step)
    pending: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    tb = TensorBoardLog(cfg.log_dir if dist.is_main else None)
    saved_step = [start if state is not None else None]  # the last checkpoint on disk from this run
    last_flush = [time.monotonic()]

    def flush() -> None:
        last_flush[0] = time.monotonic()
        if pending:
            values = dist.mean(torch.stack(pending)).tolist()  # the global-batch loss on every rank
            grad_norms = torch.stack(norms).tolist()
            pending.clear()
            norms.clear()
            bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
            if bad is not None:
                _diverged(out, cfg, len(losses) + bad + 1, f"the loss is {values[bad]}", saved_step[0])
            first = len(losses) + 1
            losses.extend(values)
            if tb.writer is not None:
                lrs = [_lr_at(cfg, k) for k in range(first, first + len(values))]
                tb.scalars(first, loss=values, lr=lrs, grad_norm=grad_norms)

    def save(k: int) -> None:
        flush()
        # The preview doubles as a divergence check: weights that sample to NaN/Inf are never saved.
        x, nrow = draw_preview(ema, schedule, cfg, ds.sample_shape, device, previews.n)
        if x is not None and not bool(torch.isfinite(x).all()):
            _diverged(out, cfg, k, "the EMA weights sample to NaN/Inf", saved_step[0])
        # The folder appears with the first good save: a run that fails before it leaves nothing behind.
        out.mkdir(parents=True, exist_ok=True)
        facts = dist.facts(cfg.batch_size)  # world_size and per-rank batch, beside the options
        write_text_atomic(out / "config.json", json.dumps({**jsonable_config(cfg), **facts}, indent=2) + "\n")
        save_checkpoint(out / CHECKPOINT_NAME, ema, {**meta, "step": k})
        if x is not None:
            write_previews(out, x, cfg, k, nrow)
            tb.images(k, x, nrow)
        tb.flush()
        write_loss_csv(out / "loss.csv", losses)
        plot_loss(out / "loss.png", losses, title=f"{cfg.data}: training loss")
        # The resume point goes last: it never refers to outputs that were not written.
        blob = {
            "version": STATE_VERSION,
            "step": k,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "losses": torch.tensor(losses, dtype=torch.float32),
            "trajectory": json.dumps(cfg.trajectory()),
        }
        save_train_state(out / STATE_NAME, blob)
        saved_step[0] = k

    previews = preview_count(ema, ds.sample_shape, cfg.sample_steps, device, cfg.num_samples)
    model.train()
    params = count_params(model)
    desc = run_header(
        cfg,
        origin,
        n_data=len(ds),
        sample_shape=ds.sample_shape,
        params=params,
        device=device,
        threads=torch.get_num_threads(),
        start=start,
        previews=previews,
        classes=labels.names if labels is not None else None,
    )
    timer = Estimator(cfg, start, params, ds.sample_shape, device)
    show = cfg.progress and dist.is_main
    try:
        with TrainProgress(desc, total=cfg.iters, start=start, enabled=show) as bar:
            for k in range(start + 1, cfg.iters + 1):
                loss, norm = _step(cfg, k, ds, order, schedule, net, opt, autocast, dist, device, labels)
                _ema_update(ema, model, cfg.ema_decay, k)
                pending.append(loss)
                norms.append(norm)
                estimate = timer.due(k)
                # every 25 steps, and every 2 s at least: slow steps still report
                if (
                    on_step is not None
                    or len(pending) >= 25
                    or k == cfg.iters
                    or estimate
                    or (time.monotonic() - last_flush[0] > 2.0)
                ):
                    flush()
                    bar.update(k, losses[-1])
                if estimate and show:
                    for line in timer.report(k):
                        bar.log(line)
                if on_step is not None:
                    on_step(k, losses[-1])
                if k == cfg.iters or (cfg.save_every and k % cfg.save_every == 0):
                    save(k) if dist.is_main else flush()  # rank 0 writes; every rank joins the loss mean
    finally:
        tb.close()
    return out / CHECKPOINT_NAME


def _step(
    cfg, k, ds, order, schedule, net, opt, autocast, dist, device, labels
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step k: returns the batch loss and the gradient norm before clipping (on device).

    With ``grad_accum`` > 1 this rank's rows are split into micro-batches whose gradients add up to the whole
    batch's (each loss weighted by its share of the rows), so the step is the same, with less activation
    memory; under DDP only the last micro-batch all-reduces. ``labels`` (a conditional run's ClassLabels): the
    network also gets the rows' classes, after label dropout."""
    idx = order.indices(k)
    torch.manual_seed(step_seed(cfg.seed, k))  # flips, t, eps, dropout (and label dropout) of this step
    x0 = ds.batch(idx)
    t = torch.randint(0, cfg.timesteps, (x0.shape[0],), device=device)
    eps = torch.randn_like(x0)
    parts = [x0, t, eps]
    if labels is not None:  # drawn after these: the draws above are an unconditional run's, unchanged
        parts.append(drop_labels(ds.labels[idx.to(ds.labels.device)], cfg.p_uncond, labels.count))
    parts = dist.shard(*parts)  # drawn for the global batch, then this rank's rows
    for g in opt.param_groups:
        g["lr"] = _lr_at(cfg, k)
    opt.zero_grad(set_to_none=True)
    rows = parts[0].shape[0]
    n = cfg.grad_accum
    chunks = list(zip(*(p.tensor_split(n) for p in parts), strict=True))
    total = torch.zeros((), device=device)
    for j, (xj, tj, ej, *yj) in enumerate(chunks):
        x_t = q_sample(schedule, xj, tj, ej)
        target = training_target(schedule, cfg.prediction, xj, tj, ej)
        sync = j == len(chunks) - 1 or not hasattr(net, "no_sync")
        with autocast, contextlib.nullcontext() if sync else net.no_sync():
            pred = net(x_t, tj, *yj)
            loss = F.mse_loss(pred.float(), target) * (xj.shape[0] / rows)  # float32 even under bf16 autocast
            loss.backward()
        total += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    opt.step()
    return total, norm.detach()


def _diverged(out: Path, cfg: TrainConfig, k: int, what: str, saved: int | None) -> None:
    # Nothing is saved after this: the checkpoint on disk stays the last one with finite loss and samples.
    kept = (
        f"kept the last good checkpoint {out / CHECKPOINT_NAME} (step {saved})"
        if saved is not None
        else "nothing of this run was saved"
    )
    raise TrainingError(f"training diverged at step {k}: {what} (--lr {cfg.lr:g} too high?); {kept}")
