"""Shared fixtures; `gpu`/`trt` tests skip (never fake) when the hardware or package is missing.

Nothing may reach the network: the Hugging Face hub's offline switches are set for the whole session (tests build
diffusers models locally). Under pytest-xdist (`make test` runs `-n <cores>`), each worker computes on one torch
thread, and the reference models of the quality tests (tests/_reference.py) start training in a background
process as the session starts, while the workers run everything else; the tests that need them run last.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
from _reference import REFERENCES, reference  # noqa: E402

REFERENCE_FIXTURES = {f"{name}_reference" for name in REFERENCES}
# The longest tests on the reference models, longest first (seconds each in a `make test` on 2 cores: 47, 29, 16,
# 16, 15, 14); the others follow in their files' order.
LONGEST_FIRST = (
    "test_digits_denoising_and_inversion",
    "test_the_null_class_draws_digits_like_an_unconditional_model",
    "test_dpm_solver_at_20_steps_lands_on_the_roll_as_well_as_ddpm_1000",
    "test_onnx_run_lands_on_the_roll",
    "test_swissroll_samples_lie_on_the_roll",
    "test_digits_classifier_recognises_samples",
)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pytest_configure(config):
    worker = hasattr(config, "workerinput")
    if worker:
        import torch

        torch.set_num_threads(1)  # two workers on two cores: their OpenMP pools must not fight
        return
    # The controller (or a plain run): one seed and one folder for the session's reference models. Seed 0: the
    # quality bars were measured on seed-0 models (the sampling seeds of the tests stay fresh and random);
    # DDPM_REFERENCE_SEED=random (or a number) trains others.
    seed = os.environ.get("DDPM_REFERENCE_SEED", "0")
    os.environ["DDPM_REFERENCE_SEED"] = str(random.randrange(2**31)) if seed == "random" else seed
    if "DDPM_REFERENCE_DIR" not in os.environ:
        os.environ["DDPM_REFERENCE_DIR"] = tempfile.mkdtemp(prefix="ddpm-references-")
        config._ddpm_reference_dir = os.environ["DDPM_REFERENCE_DIR"]  # ours: removed at the end
    xdist = getattr(config.option, "numprocesses", None)
    slow_excluded = "not slow" in (config.option.markexpr or "")
    if xdist and not slow_excluded:  # train them beside the workers, from the first second
        # one process per model: the longest no longer waits for the others (they share the cores with the
        # workers either way; what matters is that none is left to train when the tests that need it run)
        root = Path(os.environ["DDPM_REFERENCE_DIR"])
        config._ddpm_pretrain = [
            subprocess.Popen(
                [sys.executable, str(_HERE / "_reference.py"), str(root), os.environ["DDPM_REFERENCE_SEED"], name],
                stdout=open(root / f"{name}.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            )
            for name in REFERENCES
        ]  # fmt: skip


def pytest_unconfigure(config):
    for proc in getattr(config, "_ddpm_pretrain", []):
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
    folder = getattr(config, "_ddpm_reference_dir", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    has_cuda = _has_cuda()
    has_trt = has_cuda and importlib.util.find_spec("tensorrt") is not None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    skip_trt = pytest.mark.skip(reason="needs TensorRT and a CUDA GPU (tensorrt not importable or no GPU)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "trt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)

    # Tests on the trained reference models last: by then the background training is done. Among them the longest
    # start first, so that the two workers end together (the last one used to run alone for ~25 s).
    def order(item) -> tuple[bool, int]:
        on_reference = bool(REFERENCE_FIXTURES & set(getattr(item, "fixturenames", ())))
        name = getattr(item, "originalname", item.name)
        return on_reference, LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=order)


def _reference_fixture(name: str):
    @pytest.fixture(scope="session")
    def fixture() -> Path:
        seed = int(os.environ["DDPM_REFERENCE_SEED"])
        print(f"\n{name} reference model: training seed {seed}")
        return reference(name, Path(os.environ["DDPM_REFERENCE_DIR"]), seed)

    fixture.__name__ = f"{name}_reference"
    fixture.__doc__ = (
        f"The checkpoint of the default {name} model, trained once per session (tests/_reference.py)."
    )
    return fixture


digits_reference = _reference_fixture("digits")
swissroll_reference = _reference_fixture("swissroll")
digits_cond_reference = _reference_fixture("digits_cond")


@pytest.fixture
def rng(request):
    """A fresh generator with a random seed, printed (with the test's name) so a failure can be replayed:
    correctness tests must hold on any random input."""
    import numpy as np

    seed = random.randrange(2**63)
    print(f"\n{request.node.name}: rng seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def torch_gen(request):
    """A fresh torch generator with a random seed, printed (with the test's name) so a failure can be replayed."""
    import torch

    seed = random.randrange(2**63)
    print(f"\n{request.node.name}: torch seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test: small models only pay overhead for more, and the suite shares
    2 cores with other jobs (the OpenMP pool spins against them)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
