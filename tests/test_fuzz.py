"""Property tests: mutate every metadata field of every artifact kind, every train_state field and the CLI's
numeric options by type, size, sign and nesting. Whatever the input, ``ddpm`` exits 0 or 2 with exactly one
stderr line, no traceback, nothing left in the output folder, and bounded memory.

Memory: the CLI runs in-process (a subprocess per example costs ~2 s of imports), under a temporary soft
``RLIMIT_AS`` of the process's current address space + 4 GiB, so a bomb fails as MemoryError (exit 1: a
failing test) instead of swapping the CI machine. Examples are derandomized, so CI sees the same inputs.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from _hostile import (
    MLP,
    assert_one_line,
    leftovers,
    raw_strings,
    valid_meta,
    write_checkpoint,
    write_engine,
    write_onnx,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddpm.cli import main

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,  # derandomized: nothing to replay, and nothing written into the tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MEMORY_CAP = 4 << 30

# Hostile JSON values: wrong types, sizes and signs, NaN, deep nesting.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, -(10**30)]),
    st.integers(),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 0.5, 1.5]),
    st.text(max_size=20),
    st.sampled_from(["abc", "", "1000", "eps", "unet", "linear"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_deep = st.integers(min_value=17, max_value=5000).map(
    lambda n: json.loads("[" * min(n, 900) + "]" * min(n, 900))
)
_hostile = st.one_of(_values, _deep, st.sampled_from([list(range(200_001)), [0.01] * 100_001]))

# Every field, with the dotted path inside the metadata it lives at.
_FIELDS = [
    "format", "model", "schedule", "prediction", "sample_shape", "dataset", "step", "ema_decay",
    "model.arch", "model.dim", "model.hidden", "model.time_dim", "model.depth", "model.in_channels",
    "model.image_size", "model.channel_mult", "model.dropout", "model.base_channels",
    "schedule.kind", "schedule.timesteps", "schedule.beta_start", "schedule.beta_end", "schedule.betas",
    "schedule.steps", "schedule.s",
]  # fmt: skip


@contextlib.contextmanager
def memory_cap(extra: int = MEMORY_CAP):
    """Soft RLIMIT_AS = what the process maps now + ``extra``; restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    limit = mapped + extra if hard == resource.RLIM_INFINITY else min(hard, mapped + extra)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _mutate(meta: dict, field: str, value) -> dict:
    meta = json.loads(json.dumps(meta))
    head, _, sub = field.partition(".")
    if sub:
        meta[head][sub] = value
    else:
        meta[head] = value
    return meta


def _strings(meta: dict) -> dict[str, str]:
    """The on-disk map of ``meta`` without validation (strings stay strings, everything else JSON)."""
    json_keys = {"model", "schedule", "sample_shape", "step", "ema_decay"}
    return {k: v if isinstance(v, str) and k not in json_keys else json.dumps(v) for k, v in meta.items()}


def _cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with memory_cap():
        code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _check(code: int, err: str) -> None:
    assert code in (0, 2), (code, err)
    assert_one_line(code, err, expect=code)


@pytest.fixture(scope="module")
def work():
    d = Path(tempfile.mkdtemp(prefix="ddpm_fuzz_"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _fresh(work: Path) -> Path:
    d = Path(tempfile.mkdtemp(dir=work))
    return d


@FUZZ
@given(
    kind=st.sampled_from(["checkpoint", "onnx", "tensorrt"]), field=st.sampled_from(_FIELDS), value=_hostile
)
def test_fuzz_artifact_metadata(work, capsys, kind, field, value):
    d = _fresh(work)
    meta = _mutate(valid_meta(), field, value)
    if kind == "checkpoint":
        path = write_checkpoint(d / "m.safetensors", _strings(meta))
    elif kind == "onnx":
        path = write_onnx(d / "m.onnx", _strings(meta))
    else:
        head = field.partition(".")[0]
        path = write_engine(d / "m.trt", **{head: meta[head]})
    inputs = set(d.iterdir())
    _check(*_cli(["info", path], capsys))
    if kind != "tensorrt":  # info and run must agree
        code, err = _cli(["run", "--engine", path, "--steps", "1", "--num-samples", "2", "--no-progress",
                          "--out", d / "s.png"], capsys)  # fmt: skip
        _check(code, err)
        if code == 2:
            assert set(d.iterdir()) == inputs
    assert leftovers(d) == []


@FUZZ
@given(field=st.sampled_from(["profile", "compute_capability", "engine_bytes", "gpu_name", "tensorrt_version",
                              "precision", "version_compatible", "hardware_compat", "engine_sha256"]),
       value=_hostile)  # fmt: skip
def test_fuzz_sidecar_facts(work, capsys, field, value):
    d = _fresh(work)
    _check(*_cli(["info", write_engine(d / "e.trt", **{field: value})], capsys))


@pytest.fixture(scope="module")
def trained(work):
    out = work / "trained"
    args = [
        "train",
        "--data",
        "swissroll",
        "--out",
        out,
        "--iters",
        "2",
        "--batch-size",
        "8",
        "--sample-steps",
        "2",
    ]
    assert main([str(a) for a in args] + ["--num-samples", "8", "--no-progress", "--threads", "1"]) == 0
    return out


_STATE_FIELDS = ["version", "step", "model", "ema", "optimizer", "losses", "trajectory", "optimizer.state",
                 "optimizer.param_groups"]  # fmt: skip


@settings(FUZZ, max_examples=25)
@given(
    field=st.sampled_from(_STATE_FIELDS),
    value=st.one_of(_hostile, st.sampled_from([torch.tensor(1), torch.zeros(3, 3)])),
)
def test_fuzz_train_state(trained, work, capsys, field, value):
    d = _fresh(work) / "run"
    shutil.copytree(trained, d)
    state = torch.load(d / "train_state.pt", weights_only=True)
    head, _, sub = field.partition(".")
    if sub:
        state[head][sub] = value
    else:
        state[head] = value
    torch.save(state, d / "train_state.pt")
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    args = ["train", "--data", "swissroll", "--out", d, "--iters", "3", "--batch-size", "8", "--sample-steps", "2",
            "--num-samples", "8", "--no-progress", "--threads", "1", "--resume"]  # fmt: skip
    code, err = _cli(args, capsys)
    _check(code, err)
    if code == 2:
        assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before
    assert leftovers(d) == []


_OPTION_VALUES = ["0", "-1", "99999999999999999999", "1e308", "nan", "inf", "-inf", "abc", "", "0.5", "1"]
_OPTIONS = {
    "run": ["--steps", "--num-samples", "--batch", "--seed", "--eta", "--clip", "--threads"],
    "info": [],
    "schedule": ["--timesteps", "--steps", "--rows"],
    "train": ["--iters", "--batch-size", "--lr", "--warmup", "--weight-decay", "--grad-clip", "--ema-decay",
              "--image-size", "--timesteps", "--dropout", "--save-every", "--sample-steps", "--num-samples",
              "--seed", "--threads"],
    "export": ["--opset", "--batch"],
    "bench": ["--steps", "--repeats", "--threads", "--batch"],
}  # fmt: skip


def _base_args(cmd: str, d: Path, ckpt: Path) -> list:
    return {
        "run": ["run", "--engine", ckpt, "--out", d / "s.png", "--no-progress", "--num-samples", "2", "--steps", "2"],
        "info": ["info", ckpt],
        "schedule": ["schedule", "--plot", d / "p.png"],
        "train": ["train", "--data", "swissroll", "--out", d / "run", "--iters", "1", "--batch-size", "8",
                  "--sample-steps", "2", "--num-samples", "8", "--no-progress", "--threads", "1"],
        "export": ["export", "--ckpt", ckpt, "--out", d / "u.onnx"],
        "bench": ["bench", "--engine", ckpt, "--steps", "2", "--repeats", "1"],
    }[cmd]  # fmt: skip


@settings(FUZZ, max_examples=60)
@given(cmd_opt=st.sampled_from([(c, o) for c, opts in _OPTIONS.items() for o in opts]),
       value=st.sampled_from(_OPTION_VALUES))  # fmt: skip
def test_fuzz_cli_options(trained, work, capsys, cmd_opt, value):
    cmd, opt = cmd_opt
    if value in ("1", "0.5") and cmd in ("export", "bench"):
        return  # valid values there run a full export / benchmark: covered by their own tests
    d = _fresh(work)
    args = [*_base_args(cmd, d, trained / "model.safetensors"), opt, value]
    code, err = _cli(args, capsys)
    _check(code, err)
    if code == 2:
        assert list(d.iterdir()) == []
    assert leftovers(d) == []


def test_memory_cap_catches_a_bomb():
    # The guard itself can fail: a 5 GiB allocation under it is refused.
    with memory_cap(), pytest.raises(MemoryError):
        bytearray(5 << 30)
    assert MLP["arch"] == "mlp" and raw_strings()["format"] == "ddpm/1"
