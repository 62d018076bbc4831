"""diffusers folders as artifacts (ddpm/diffusers_folder.py, ddpm/diffusers_scheduler.py): layouts, weights,
every scheduler setting against diffusers' own scheduler, the CLI (info / import / export), and bad folders.

Folders are written locally by diffusers (``save_pretrained``); nothing reaches the network. The network's
forward parity is tests/test_diffusers_model.py; here a folder's loaded model is compared with the diffusers
model that wrote it (same tolerance, 1e-4 normwise).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _hostile import assert_one_line, cli, leftovers
from test_diffusers_model import BASE as UNET  # the small two-level UNet2DModel of the parity tests
from test_diffusers_model import TOL

from ddpm.artifacts import artifact_kind, read_metadata
from ddpm.checkpoint import load_model
from ddpm.cli import main
from ddpm.diffusers_folder import is_diffusers_folder, read_folder
from ddpm.errors import InvalidArgumentError
from ddpm.metadata import output_shape, schedule_from_meta
from ddpm.runtime.backends import open_backend

diffusers = pytest.importorskip("diffusers")  # the oracle, and the writer of the test folders


def unet(gen: torch.Generator, **over) -> torch.nn.Module:
    """A small diffusers UNet2DModel with every parameter randomly perturbed."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = diffusers.UNet2DModel(**{**UNET, **over}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def pipeline(folder: Path, model, scheduler=None, ema=None) -> Path:
    scheduler = scheduler or diffusers.DDPMScheduler(num_train_timesteps=100)
    diffusers.DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(folder)
    if ema is not None:  # the layout of diffusers' training example: the EMA network beside the main one
        ema.save_pretrained(folder / "unet_ema")
    return folder


def max_rel(ref: torch.nn.Module, ours: torch.nn.Module, gen: torch.Generator, t_max: int = 100) -> float:
    x = torch.randn(3, ref.config.in_channels, *[ref.config.sample_size] * 2, generator=gen)
    t = torch.randint(0, t_max, (3,), generator=gen)
    with torch.no_grad():
        want, got = ref(x, t).sample, ours(x, t)
    assert got.shape == want.shape
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A pipeline folder with a perturbed 3-channel UNet and a 100-step DDPM scheduler."""
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    model = unet(gen)
    return pipeline(tmp_path_factory.mktemp("pipe") / "ddpm-small", model), model


# ---- layouts and weights ----


def test_pipeline_folder_loads_as_our_native_network(small_folder, torch_gen):
    folder, ref = small_folder
    assert is_diffusers_folder(folder) and artifact_kind(folder) == "diffusers"
    model, meta = load_model(folder)
    assert type(model).__name__ == "UNet2D" and meta["model"]["arch"] == "unet2d"
    assert meta["sample_shape"] == [3, 16, 16] and meta["dataset"] == "diffusers:ddpm-small"
    assert meta["source"] == {**meta["source"], "format": "diffusers", "weights_kind": "main"}
    assert meta["source"]["weights"] == "unet/diffusion_pytorch_model.safetensors"
    assert read_metadata(folder) == meta
    assert max_rel(ref, model, torch_gen) <= TOL


def test_bare_model_folder_finds_or_is_given_its_scheduler(tmp_path, torch_gen, capsys):
    ref = unet(torch_gen)
    ref.save_pretrained(tmp_path / "unet")
    sched = diffusers.DDIMScheduler(num_train_timesteps=200)
    sched.save_config(tmp_path / "elsewhere")
    code, err = cli(["info", tmp_path / "unet"], capsys)
    assert_one_line(code, err, match="--scheduler-config")
    meta = read_folder(
        tmp_path / "unet", scheduler_config=tmp_path / "elsewhere"
    ).meta  # a folder or the file
    assert meta["sampling"]["sampler"] == "ddim" and meta["schedule"]["timesteps"] == 200
    sched.save_config(tmp_path / "scheduler")  # ../scheduler/, the pipeline layout without model_index.json
    assert read_folder(tmp_path / "unet").meta["sampling"]["sampler"] == "ddim"
    out = tmp_path / "m.safetensors"
    args = [
        "import",
        tmp_path / "unet",
        "--out",
        out,
        "--scheduler-config",
        tmp_path / "elsewhere/scheduler_config.json",
    ]
    assert cli(args, capsys)[0] == 0
    assert max_rel(ref, load_model(out)[0], torch_gen, 200) <= TOL


def test_bin_weights_load_through_weights_only(tmp_path, torch_gen):
    ref = unet(torch_gen)
    ref.save_pretrained(tmp_path, safe_serialization=False)
    diffusers.DDPMScheduler(num_train_timesteps=100).save_config(tmp_path)  # scheduler_config.json beside
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    model, meta = load_model(tmp_path)
    assert meta["source"]["weights"] == "diffusion_pytorch_model.bin"
    assert max_rel(ref, model, torch_gen) <= TOL


def test_sharded_safetensors(tmp_path, torch_gen):
    ref = unet(torch_gen)
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_config(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model, meta = load_model(tmp_path)
    assert meta["source"]["weights"].endswith(".safetensors.index.json")
    assert max_rel(ref, model, torch_gen) <= TOL


def test_ema_weights_are_preferred_and_named(tmp_path, torch_gen, capsys):
    trained, ema = unet(torch_gen), unet(torch_gen)
    folder = pipeline(tmp_path / "p", trained, ema=ema)
    model, meta = load_model(folder)
    assert meta["source"]["weights"] == "unet_ema/diffusion_pytorch_model.safetensors"
    assert meta["source"]["weights_kind"] == "ema" and max_rel(ema, model, torch_gen) <= TOL
    model, meta = load_model(folder, weights="main")
    assert meta["source"]["weights_kind"] == "main" and max_rel(trained, model, torch_gen) <= TOL
    # diffusers' variant naming in one folder: diffusion_pytorch_model.ema.safetensors
    ema.save_pretrained(tmp_path / "v", variant="ema")
    trained.save_pretrained(tmp_path / "v")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_config(tmp_path / "v")
    model, meta = load_model(tmp_path / "v")
    assert meta["source"]["weights"] == "diffusion_pytorch_model.ema.safetensors"
    assert max_rel(ema, model, torch_gen) <= TOL
    capsys.readouterr()
    assert main(["info", "--json", str(tmp_path / "v")]) == 0
    assert json.loads(capsys.readouterr().out)["file_facts"]["weights_kind"] == "ema"
    _bad_import(tmp_path / "p/unet", capsys, "no EMA weights", "--weights", "ema")


def test_a_run_folder_is_not_a_diffusers_folder(tmp_path, small_folder):
    (tmp_path / "config.json").write_text(
        json.dumps({"model": "tiny", "iters": 10})
    )  # what `ddpm train` writes
    assert not is_diffusers_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert not is_diffusers_folder(tmp_path)  # our checkpoint wins


# ---- scheduler settings -> metadata, and the schedule against diffusers' alphas_cumprod ----

DDPM, DDIM, DPM = "DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"
SCHEDULER_CASES = [
    (
        DDPM,
        {},
        {"kind": "linear", "prediction": "eps", "variance": "fixed_small", "sampling": ("ddpm", 1000, 1.0)},
    ),
    (
        DDPM,
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"kind": "scaled_linear"},
    ),
    (DDPM, {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 4000}, {"kind": "cosine"}),
    (
        DDPM,
        {"trained_betas": np.linspace(1e-4, 0.05, 300).tolist(), "num_train_timesteps": 300},
        {"kind": "custom"},
    ),
    (DDPM, {"prediction_type": "sample"}, {"prediction": "x0"}),
    (DDPM, {"prediction_type": "v_prediction"}, {"prediction": "v"}),
    (DDPM, {"variance_type": "fixed_small_log"}, {"variance": "fixed_small"}),
    (DDPM, {"variance_type": "fixed_large"}, {"variance": "fixed_large"}),
    (DDPM, {"variance_type": "learned_range"}, {"variance": "learned_range"}),
    (DDPM, {"clip_sample": False}, {"sampling": ("ddpm", 1000, None)}),
    (DDPM, {"clip_sample_range": 2.5, "num_train_timesteps": 500}, {"sampling": ("ddpm", 500, 2.5)}),
    (
        DDIM,
        {"prediction_type": "v_prediction"},
        {"prediction": "v", "variance": "fixed_small", "sampling": ("ddim", 50, 1.0)},
    ),
    (DDIM, {"num_train_timesteps": 30, "clip_sample": False}, {"sampling": ("ddim", 30, None)}),
    (DPM, {}, {"sampling": ("dpm++2m", 20, None)}),
    (
        DPM,
        {"algorithm_type": "sde-dpmsolver++", "beta_schedule": "scaled_linear"},
        {"sampling": ("dpm++2m-sde", 20, None)},
    ),
    (DPM, {"variance_type": "learned_range"}, {"variance": "learned_range"}),
]


@pytest.fixture(scope="module")
def bare_unets(tmp_path_factory) -> dict[str, Path]:
    """Model folders (no scheduler): 3 -> 3 channels, and 3 -> 6 (learned variance)."""
    gen = torch.Generator().manual_seed(0)
    root = tmp_path_factory.mktemp("bare")
    for name, over in (("plain", {}), ("learned", {"out_channels": 6})):
        unet(gen, **over).save_pretrained(root / name)
    return {"plain": root / "plain", "learned": root / "learned"}


@pytest.mark.parametrize("cls, kwargs, expect", SCHEDULER_CASES)
def test_scheduler_settings_become_metadata(cls, kwargs, expect, bare_unets, tmp_path):
    sched = getattr(diffusers, cls)(**kwargs)
    sched.save_config(tmp_path)
    learned = expect.get("variance") == "learned_range"
    meta = read_folder(bare_unets["learned" if learned else "plain"], scheduler_config=tmp_path).meta
    assert meta["schedule"]["kind"] == expect.get("kind", meta["schedule"]["kind"])
    assert meta["prediction"] == expect.get("prediction", meta["prediction"])
    assert meta["variance"] == expect.get("variance", meta["variance"])
    if "sampling" in expect:
        sampler, steps, clip = expect["sampling"]
        assert meta["sampling"] == {"sampler": sampler, "steps": steps, "clip": clip}
    assert meta["source"]["scheduler_class"] == cls
    assert output_shape(meta) == [6 if learned else 3, 16, 16]
    # The forward process itself: betas to float32 rounding (diffusers evaluates linspace, and the square of
    # scaled_linear, in float32: a few roundings, doubled by the square; <= 8 ulp), alphas_cumprod within the
    # error of diffusers' float32 running product over T factors (T ulp). Ours are float64.
    ours = schedule_from_meta(meta)
    theirs_b, theirs_ab = sched.betas.double().numpy(), sched.alphas_cumprod.double().numpy()
    assert len(ours) == len(theirs_b)
    np.testing.assert_allclose(ours.betas, theirs_b, rtol=8 * 2.0**-24, atol=0)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs_ab, rtol=len(ours) * 2.0**-24, atol=0)


# ---- the CLI: info, import (then no diffusers), export ----


def test_info_table_and_json_say_which_weights(small_folder, capsys):
    folder, _ = small_folder
    capsys.readouterr()
    assert main(["info", "--json", str(folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "diffusers" and info["file_facts"]["layout"] == "pipeline"
    assert info["file_facts"]["weights_kind"] == "main" and info["bytes"] > 0
    assert main(["info", str(folder)]) == 0
    table = capsys.readouterr().out
    assert "weights_kind" in table and "source.scheduler_class" in table and "unet2d" in table


def test_import_then_run_without_diffusers(small_folder, tmp_path, torch_gen, capsys):
    folder, ref = small_folder
    out = tmp_path / "imported.safetensors"
    code, err = cli(["import", folder, "--out", out], capsys)
    assert code == 0, err
    x = torch.randn(2, 3, 16, 16, generator=torch_gen)
    t = torch.tensor([0, 99])
    with torch.no_grad():
        want = ref(x, t).sample
    np.savez(tmp_path / "io.npz", x=x.numpy(), t=t.numpy(), want=want.numpy())
    script = f"""
import sys
sys.modules["diffusers"] = None  # `import diffusers` now raises ImportError
import numpy as np, torch
from ddpm.checkpoint import load_model
from ddpm.cli import main
from ddpm.runtime.backends import open_backend
io = np.load({str(tmp_path / "io.npz")!r})
model, meta = load_model({str(out)!r})
assert meta["source"]["format"] == "diffusers" and meta["model"]["arch"] == "unet2d"
with open_backend({str(out)!r}, device="cpu") as backend:
    got = backend(torch.from_numpy(io["x"]), torch.from_numpy(io["t"])).numpy()
err = np.abs(got - io["want"]).max() / np.abs(io["want"]).max()
assert err <= {TOL}, err
assert main(["info", {str(out)!r}]) == 0
print("ok", err)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


def test_class_conditional_folder_imports_exports_and_runs_with_y(tmp_path, torch_gen, capsys):
    """num_class_embeds K: our UNet2D with diffusers' class table; classes with no known null class."""
    ref = unet(torch_gen, num_class_embeds=4)
    folder = pipeline(tmp_path / "cond", ref)
    out, onnx_path = tmp_path / "cond.safetensors", tmp_path / "cond.onnx"
    assert cli(["import", folder, "--out", out], capsys)[0] == 0
    meta = read_metadata(out)
    assert meta["classes"] == {"count": 4, "null": None, "names": None, "p_uncond": None}
    assert meta["model"]["num_class_embeds"] == 4 and read_metadata(folder)["classes"] == meta["classes"]
    code, err = cli(["export", "--ckpt", out, "--out", onnx_path], capsys)
    assert code == 0, err
    x = torch.randn(5, 3, 16, 16, generator=torch_gen)
    t = torch.randint(0, 100, (5,), generator=torch_gen)
    y = torch.tensor([0, 1, 2, 3, 1])
    with torch.no_grad():
        want = ref(x, t, class_labels=y).sample
    for engine in (folder, out, onnx_path):
        with open_backend(engine, device="cpu") as backend:
            got = backend(x, t, y)
            assert float((got - want).abs().max() / want.abs().max()) <= TOL
            with pytest.raises(
                InvalidArgumentError, match=r"y holds class 4; this model's classes are 0\.\.3$"
            ):
                backend(x, t, torch.tensor([0, 1, 2, 3, 4]))  # no null class: 4 is no class


# ---- bad folders: one line on stderr, exit 2, nothing written ----


def _bad_import(folder: Path, capsys, match: str, *extra) -> None:
    out = folder.parent / "never.safetensors"
    assert_one_line(*cli(["import", folder, "--out", out, *extra], capsys), match=match)
    assert not out.exists() and leftovers(folder.parent) == []


def _write(folder: Path, config: dict, scheduler: dict | None = None, weights: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **config}))
    sched = {"_class_name": "DDPMScheduler", "num_train_timesteps": 100, **(scheduler or {})}
    (folder / "scheduler_config.json").write_text(json.dumps(sched))
    if weights:
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not read before the configs pass")
    return folder


def test_cross_attention_unet_is_refused(tmp_path, capsys):
    cond = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, cross_attention_dim=8,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    cond.save_pretrained(tmp_path / "cond")
    diffusers.DDPMScheduler().save_config(tmp_path / "cond")
    _bad_import(tmp_path / "cond", capsys, "_class_name 'UNet2DConditionModel' is not supported")


@pytest.mark.parametrize(
    "config, scheduler, match",
    [
        ({**UNET, "num_class_embeds": 0}, {}, "num_class_embeds must be an integer in 1..100000"),
        ({**UNET, "class_embed_type": "timestep"}, {}, "class_embed_type = 'timestep' is not supported"),
        (
            {**UNET, "class_embed_type": "identity", "num_class_embeds": 4},
            {},
            "class_embed_type = 'identity'",
        ),
        (
            {**UNET, "down_block_types": ["SkipDownBlock2D", "DownBlock2D"]},
            {},
            "down_block_types[0] = 'SkipDownBlock2D'",
        ),
        ({**UNET, "block_out_channels": "many"}, {}, "block_out_channels must be a list"),
        ({**UNET, "sample_size": 16.5}, {}, "sample_size must be an integer or [H, W]"),
        ({**UNET, "encoder_hid_dim": 4}, {}, "unknown key(s) encoder_hid_dim"),
        (UNET, {"_class_name": "PNDMScheduler"}, "scheduler _class_name 'PNDMScheduler' is not supported"),
        (UNET, {"thresholding": True}, "thresholding = True is not supported yet"),
        (UNET, {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr = True is not supported"),
        (UNET, {"beta_schedule": "sigmoid"}, "beta_schedule = 'sigmoid' is not supported"),
        (UNET, {"variance_type": "learned"}, "variance_type = 'learned' is not supported"),
        (UNET, {"variance_type": "learned_range"}, "does not fit the UNet, which outputs 3 channels"),
        ({**UNET, "out_channels": 6}, {}, "variance_type 'fixed_small' does not fit the UNet"),
        (
            UNET,
            {"prediction_type": "flow_prediction"},
            "prediction_type = 'flow_prediction' is not supported",
        ),
        (UNET, {"num_train_timesteps": "1000"}, "num_train_timesteps must be an integer"),
    ],
)
def test_bad_configs_are_one_line(tmp_path, capsys, config, scheduler, match):
    _bad_import(_write(tmp_path / "m", config, scheduler), capsys, match)


def test_config_without_weights(tmp_path, capsys):
    _bad_import(_write(tmp_path / "m", UNET, weights=False), capsys, "no weights beside config.json")


def test_weights_that_do_not_fit_the_config(tmp_path, torch_gen, capsys):
    from safetensors.torch import load_file, save_file

    ref = unet(torch_gen)
    ref.save_pretrained(tmp_path / "m")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_config(tmp_path / "m")
    weights = tmp_path / "m/diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "conv_in.bias"}, weights)
    _bad_import(tmp_path / "m", capsys, "weights do not match the config (missing ['conv_in.bias']")
    save_file({**state, "conv_in.bias": torch.zeros(17)}, weights)
    _bad_import(tmp_path / "m", capsys, "conv_in.bias is [17], the config makes it [16]")
    weights.write_bytes(b"\x00" * 64)
    _bad_import(tmp_path / "m", capsys, "not a readable safetensors file")


def test_latent_pipeline_is_refused(tmp_path, capsys):
    tmp_path.joinpath("model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "LDMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "vqvae": ["diffusers", "VQModel"],
            }
        )
    )
    _bad_import(tmp_path, capsys, "has a vqvae component")


HUGE = {**UNET, "block_out_channels": [8192] * 8, "layers_per_block": 64, "sample_size": 1024}
HUGE.update(down_block_types=["AttnDownBlock2D"] * 8, up_block_types=["AttnUpBlock2D"] * 8)


def test_hostile_config_json(tmp_path, capsys):
    folder = _write(tmp_path / "m", UNET)
    cfg = folder / "config.json"
    cfg.write_text("[" * 200 + "]" * 200)
    _bad_import(folder, capsys, "nests deeper than 16 levels")
    cfg.write_text(json.dumps({"_class_name": "UNet2DModel", **UNET}) + " " * (5 << 20))
    _bad_import(folder, capsys, "bytes; a real one is a few KB")
    cfg.write_text(json.dumps({"_class_name": "UNet2DModel", **UNET, "block_out_channels": [16, 1 << 40]}))
    _bad_import(folder, capsys, "block_out_channels[1] must be an integer in 1..8192")


def test_huge_channel_counts_are_refused_before_allocation(tmp_path):
    """~2e12 parameters described by a 1 KB file: refused from the config, the process stays small."""
    folder = _write(tmp_path / "m", HUGE)
    script = f"""
from ddpm.cli import main
code = main(["import", {str(folder)!r}, "--out", {str(tmp_path / "x.safetensors")!r}])
# VmHWM: this process's peak resident memory (ru_maxrss would also count the parent's, from before the exec)
hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
print("exit", code, "peak_mb", int(hwm.split()[1]) // 1024)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "exit 2" in res.stdout, res.stdout + res.stderr
    assert "parameters; at most" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert (
        int(res.stdout.split("peak_mb")[1]) < 1000
    )  # torch + the CLI: ~250 MB; 2.9e12 float32 would be 11 TB
    assert not (tmp_path / "x.safetensors").exists()
