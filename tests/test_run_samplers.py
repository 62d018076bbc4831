"""The sampler option end to end: ``ddpm run --sampler`` and ``ddpm bench --sampler`` reach ``ddpm.reverse``
with every sampler ``ddpm.Sampler`` offers, multistep ones (a history buffer) included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _runtime_models import make_checkpoint

from ddpm.cli import main
from ddpm.runtime.sampling import sample
from ddpm.schedule import Sampler


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("samplers"), "mlp")


@pytest.mark.parametrize("sampler", [s.value for s in Sampler])
def test_run_writes_what_sample_returns_for_every_sampler(ckpt, sampler, tmp_path, capsys):
    npz = tmp_path / "s.npz"
    args = ["run", "--engine", str(ckpt), "--steps", "12", "--num-samples", "5", "--batch", "2"]
    code = main([*args, "--sampler", sampler, "--npz", str(npz), "--no-progress", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"sampling {sampler} 12/1000 steps" in out
    want = sample(ckpt, 5, steps=12, batch=2, sampler=sampler, device="cpu", threads=1)
    got = np.load(npz)["arr_0"]
    np.testing.assert_array_equal(got, want.numpy())
    if sampler != "ddpm":
        assert not np.array_equal(got, sample(ckpt, 5, steps=12, batch=2, device="cpu", threads=1).numpy())


def test_bench_loop_runs_the_sampler_asked_for(ckpt, tmp_path, capsys):
    js = tmp_path / "b.json"
    args = ["bench", "--engine", str(ckpt), "--batch", "2", "--steps", "10", "--device", "cpu"]
    code = main([*args, "--repeats", "3", "--loop-budget", "1", "--sampler", "dpm++2m", "--json", str(js)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(js.read_text())
    assert report["config"]["sampler"] == "dpm++2m"
    (res,) = report["results"]
    assert res["sampler"] == "dpm++2m"
    # one engine loop row per runtime x precision compared (torch fp32, torch bf16 here); the eager rows run the
    # plain DDPM loop on purpose (the baseline)
    loop = [r for r in res["rows"] if r["stage"] == "loop" and not r["impl"].startswith("eager")]
    assert loop and all("dpm++2m" in r["impl"] for r in loop), [r["impl"] for r in res["rows"]]


def test_bench_rejects_an_unknown_sampler(ckpt, capsys):
    assert main(["bench", "--engine", str(ckpt), "--device", "cpu", "--sampler", "euler"]) == 2
    err = capsys.readouterr().err
    assert "unknown sampler 'euler'" in err and "Traceback" not in err
