"""``ddpm diffuse``, ``ddpm denoise``, ``ddpm interpolate``: image in, image out (runtime/img2img.py).

Each command reads image files (converted and resized to the model's sample shape, one stderr line per change),
calls one library function, and writes a labelled PNG (and ``--npz``). Only typer is imported at module level:
``ddpm --help`` loads no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ddpm.errors import InvalidArgumentError
from ddpm.io import atomic_path, check_writable

if TYPE_CHECKING:
    from ddpm.options import SamplingOptions

__all__ = ["register", "parse_timesteps"]


def parse_timesteps(text: str) -> list[int]:
    """``"0,50,999"`` -> [0, 50, 999] for ``--t`` (range checked against the schedule later)."""
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InvalidArgumentError(f"--t must be comma-separated integer timesteps, got {text!r}") from None
    if not values:
        raise InvalidArgumentError(f"--t must name at least one timestep, got {text!r}")
    return values


def _check_out(out: Path, npz: Path | None) -> None:
    """Output paths checked before the work: no denoising only to fail at the write."""
    if out.suffix.lower() != ".png":
        raise InvalidArgumentError(f"--out {str(out)!r} must be a .png file (use --npz for arrays)")
    check_writable(out, what="--out")
    if npz is not None:
        if npz.suffix.lower() != ".npz":
            raise InvalidArgumentError(f"--npz {str(npz)!r} must end in .npz")
        check_writable(npz, what="--npz")


def _load(paths: list[Path], shape: Any) -> Any:
    """Images [N, C, H, W] in [-1, 1]; each conversion or resize reported on stderr (never silent)."""
    import torch

    from ddpm.images import load_image

    images = []
    for p in paths:
        x, note = load_image(p, shape)
        if note is not None:
            typer.echo(f"{p}: {note}", err=True)
        images.append(x)
    if shape is None and len({tuple(x.shape) for x in images}) > 1:
        raise InvalidArgumentError("without --engine, the images must share one size and mode")
    return torch.cat(images)


def _save_npz(path: Path, images: Any, **extra: Any) -> None:
    """arr_0: uint8 [N, H, W, C] as ``ddpm run --npz`` writes; the float32 values and facts beside it."""
    import numpy as np

    from ddpm.images import to_uint8_nhwc

    arrays = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in extra.items()}
    with atomic_path(path, what="--npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=to_uint8_nhwc(images), **arrays)
    typer.echo(f"wrote {path}")


def diffuse_command(
    images: list[Path], *, t: str, schedule: str, timesteps: int, engine: Path | None, seed: int,
    out: Path, npz: Path | None,
) -> None:  # fmt: skip
    """The body of ``ddpm diffuse``."""
    from ddpm.artifacts import read_metadata
    from ddpm.forward import diffuse, snr_db
    from ddpm.images import save_image_table
    from ddpm.metadata import schedule_from_meta
    from ddpm.schedule import Schedule

    from .img2img import image_shape

    ts = parse_timesteps(t)
    _check_out(out, npz)
    if engine is not None:
        meta = read_metadata(engine)
        sched, shape = schedule_from_meta(meta), image_shape(meta, source=str(engine))
    else:
        sched, shape = Schedule.create(schedule, timesteps), None
    x0 = _load(images, shape)
    xt = diffuse(x0, ts, schedule=sched, seed=seed)  # [K, N, C, H, W]
    snr = [snr_db(sched, v) for v in ts]
    labels = [f"t={v}\n{s:+.1f} dB" for v, s in zip(ts, snr, strict=True)]
    kind = sched.config.get("kind", "custom")
    title = (
        f"x_t = sqrt(ab) x0 + sqrt(1-ab) eps, seed {seed}\n{kind}, T={sched.num_timesteps}; SNR = ab/(1-ab)"
    )
    save_image_table(
        xt.transpose(0, 1), out, col_labels=labels, row_labels=[p.name for p in images], title=title
    )
    typer.echo(f"wrote {out}")
    if npz is not None:
        _save_npz(npz, xt.flatten(0, 1), x_t=xt, t=ts, snr_db=snr)


def denoise_command(
    engine: Path, images: list[Path], options: SamplingOptions, *, t: int | None, sigma: float | None,
    add_noise: bool, out: Path, npz: Path | None,
) -> None:  # fmt: skip
    """The body of ``ddpm denoise``."""
    import torch

    from ddpm.images import save_image_table

    from .img2img import denoise_run, image_shape
    from .sampling import open_engine

    _check_out(out, npz)
    if not images:
        raise InvalidArgumentError("give at least one --image")
    with open_engine(engine, options) as backend:
        x = _load(images, image_shape(backend.meta, source=str(engine)))
        r = denoise_run(backend, x, t, options, sigma=sigma, add_noise=add_noise)
    level = f"sigma={sigma:g} -> t={r.t}" if sigma is not None else f"t={r.t}"
    if add_noise:
        cells, cols = torch.stack([r.images, r.noisy, r.denoised], 1), ["input", f"x_t ({level})", "denoised"]
    else:
        cells, cols = torch.stack([r.images, r.denoised], 1), [f"noisy input ({level})", "denoised"]
    sampler = r.sampler
    title = f"{sampler}, {r.steps} steps from t={r.t}, seed {options.seed}"
    save_image_table(cells, out, col_labels=cols, row_labels=[p.name for p in images], title=title)
    typer.echo(f"wrote {out}")
    if npz is not None:
        _save_npz(npz, r.denoised, denoised=r.denoised, noisy=r.noisy, t=r.t)
    typer.echo(f"denoised {len(images)} image(s): {r.steps} {sampler} steps from t={r.t} [{r.description}]")


def interpolate_command(
    engine: Path, a: Path, b: Path, options: SamplingOptions, *, t: int, n: int, encode: str, out: Path,
    npz: Path | None,
) -> None:  # fmt: skip
    """The body of ``ddpm interpolate``."""
    import numpy as np
    import torch

    from ddpm.images import save_image_table

    from .img2img import image_shape, interpolate
    from .sampling import open_engine

    _check_out(out, npz)
    with open_engine(engine, options) as backend:
        ends = _load([a, b], image_shape(backend.meta, source=str(engine)))
        row = interpolate(backend, ends[0], ends[1], t, n, options, encode=encode)
    weights = np.linspace(0.0, 1.0, n)
    cells = torch.cat([ends[:1], row, ends[1:]])[None]
    cols = ["A", *(f"w={w:.2f}" for w in weights), "B"]
    how = "same-noise lerp" if encode == "noise" else "DDIM inversion + slerp"
    save_image_table(cells, out, col_labels=cols, title=f"interpolation at t={t}: {how}, seed {options.seed}")
    typer.echo(f"wrote {out}")
    if npz is not None:
        _save_npz(npz, row, images=row, weights=weights, t=t)


_Engine = Annotated[
    Path, typer.Option(help="unet.onnx, unet.trt (+ .json sidecar) or a .safetensors checkpoint")
]
_Seed = Annotated[int, typer.Option(help="Philox seed: forward eps (stream 1) and reverse noise (stream 0)")]
_Steps = Annotated[
    int | None, typer.Option(help="reverse steps N <= t+1: timesteps 0..t respaced to N (default: all t+1)")
]
_Clip = Annotated[
    str | None,
    typer.Option(
        help="clip predicted x0 to [-C, C], or dynamic:RATIO[:MAX] (dynamic thresholding); default: none"
    ),
]
_Class = Annotated[
    str | None,
    typer.Option(
        "--class", help="class-conditional models: the class of every image (numbers or names; a list cycles)"
    ),
]
_Guidance = Annotated[
    float | None, typer.Option(help="classifier-free guidance scale S (1 = plain conditional; needs --class)")
]
_Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
_Threads = Annotated[int | None, typer.Option(help="CPU inference threads (default: all available)")]
_Npz = Annotated[Path | None, typer.Option(help="npz: arr_0 uint8 NHWC outputs, float32 values beside it")]


def register(app: typer.Typer) -> None:
    """Add ``ddpm diffuse``, ``ddpm denoise`` and ``ddpm interpolate`` to the CLI."""

    @app.command("diffuse")
    def diffuse_cmd(
        images: Annotated[list[Path], typer.Argument(help="image files (PNG, JPEG, ...)")],
        t: Annotated[str, typer.Option("--t", help="timesteps, comma-separated")] = "0,50,100,250,500,999",
        schedule: Annotated[str, typer.Option(help="linear | cosine (without --engine)")] = "linear",
        timesteps: Annotated[int, typer.Option(help="T of the schedule (without --engine)")] = 1000,
        engine: Annotated[
            Path | None, typer.Option(help="take the schedule and image shape from this model")
        ] = None,
        seed: _Seed = 0,
        out: Annotated[Path, typer.Option(help="PNG: one row per image, one column per t")] = Path(
            "diffuse.png"
        ),
        npz: Annotated[Path | None, typer.Option(help="npz: x_t float32 [K, N, C, H, W], t, snr_db")] = None,
    ) -> None:
        """The forward process: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps of each image at each --t, with its SNR."""
        diffuse_command(
            images, t=t, schedule=schedule, timesteps=timesteps, engine=engine, seed=seed, out=out, npz=npz
        )

    @app.command("denoise")
    def denoise_cmd(
        engine: _Engine,
        image: Annotated[list[Path], typer.Option(help="image file(s), repeat for more")],
        t: Annotated[int | None, typer.Option("--t", help="noise level as a timestep 0..T-1")] = None,
        sigma: Annotated[
            float | None,
            typer.Option(help="noise level as pixel-space std in [-1, 1] units (instead of --t)"),
        ] = None,
        add_noise: Annotated[
            bool,
            typer.Option("--add-noise/--noisy", help="noise a clean image first (SDEdit) / already noisy"),
        ] = True,
        steps: _Steps = None,
        sampler: Annotated[
            str | None,
            typer.Option(
                help="ddpm | ddim | dpm++2m | dpm++2m-sde. Default: with --add-noise (SDEdit: edit an image into a "
                "new sample that keeps its layout) ddpm over all t+1 steps, a posterior sample; with --noisy "
                "(restore an image that is noisy already) ddim over at most 50 steps, which follows the model's "
                "estimate of the clean image: on held-out digits at t=500 stochastic ddpm was classified right "
                "less often than the noisy input, ddim clearly more (README, 'Image in, image out')"
            ),
        ] = None,
        eta: Annotated[float, typer.Option(help="DDIM eta")] = 0.0,
        clip: _Clip = None,
        class_: _Class = None,
        guidance: _Guidance = None,
        seed: _Seed = 0,
        device: _Device = "auto",
        threads: _Threads = None,
        out: Annotated[Path, typer.Option(help="PNG: input | noisy | denoised per image")] = Path(
            "denoise.png"
        ),
        npz: _Npz = None,
    ) -> None:
        """Denoise: the reverse process from timestep t, on a clean image noised to t (SDEdit) or a noisy one."""
        from ddpm.options import SamplingOptions

        if (t is None) == (sigma is None):
            raise InvalidArgumentError("give the noise level as exactly one of --t or --sigma")
        options = SamplingOptions.from_cli(
            steps=steps, sampler=sampler, eta=eta, clip=clip, seed=seed, device=device, threads=threads,
            classes=class_, guidance=guidance,
        )  # fmt: skip
        denoise_command(engine, image, options, t=t, sigma=sigma, add_noise=add_noise, out=out, npz=npz)

    @app.command("interpolate")
    def interpolate_cmd(
        engine: _Engine,
        a: Annotated[Path, typer.Option("--a", help="first image")],
        b: Annotated[Path, typer.Option("--b", help="last image")],
        t: Annotated[int, typer.Option("--t", help="encode to this timestep (T-1: x_T)")] = 500,
        n: Annotated[int, typer.Option("--n", help="images from A to B, ends included")] = 8,
        encode: Annotated[
            str,
            typer.Option(
                help="noise: same-noise x_t, lerp (Ho et al.) | ddim: inversion, slerp (Song et al.)"
            ),
        ] = "noise",
        steps: _Steps = None,
        sampler: Annotated[
            str | None, typer.Option(help="decoding sampler (default: ddpm for noise, ddim for ddim)")
        ] = None,
        clip: _Clip = None,
        class_: _Class = None,
        guidance: _Guidance = None,
        seed: _Seed = 0,
        device: _Device = "auto",
        threads: _Threads = None,
        out: Annotated[Path, typer.Option(help="PNG: A, the n images, B")] = Path("interpolate.png"),
        npz: _Npz = None,
    ) -> None:
        """Interpolate between two images through the model's latent x_t."""
        from ddpm.options import SamplingOptions

        options = SamplingOptions.from_cli(
            steps=steps, sampler=sampler, clip=clip, seed=seed, device=device, threads=threads, classes=class_,
            guidance=guidance,
        )  # fmt: skip
        interpolate_command(engine, a, b, options, t=t, n=n, encode=encode, out=out, npz=npz)
