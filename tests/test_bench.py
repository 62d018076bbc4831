"""`ddpm bench`: a real (tiny) measurement end to end, its JSON/markdown/plot, and bad input.

No wall-clock assertions: the test checks that every figure exists, is positive and finite, that ratios are
consistent with the medians they come from, and that each floor is below the measurement it bounds.
"""

from __future__ import annotations

import json
import math

import pytest
from _runtime_models import shared_artifacts

from ddpm.cli import main


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def test_bench_tiny_unet(artifacts, tmp_path, capsys):
    ckpt, onnx = artifacts["unet"]
    js, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    rc = main(
        [
            "bench",
            "--engine",
            str(onnx),
            "--ckpt",
            str(ckpt),
            "--batch",
            "1,3",
            "--steps",
            "20",
            "--device",
            "cpu",
            "--repeats",
            "3",
            "--loop-budget",
            "2",
            "--json",
            str(js),
            "--md",
            str(md),
            "--plot",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "speed-up vs eager" in out and "fused kernel" in out
    report = json.loads(js.read_text())
    assert report["command"].startswith("ddpm bench")
    assert report["machine"]["cpu"] and report["machine"]["torch"]
    assert len(report["results"]) == 2  # 1 engine x 2 batches
    assert {r["backend"] for r in report["results"]} == {"onnxruntime"}
    for res in report["results"]:
        assert res["steps"] == 20 and 2 <= res["loop_steps_timed"] <= 20
        assert res["model_flops"] > 0 and res["samples_per_s"] > 0
        stages = {(r["stage"], r.get("baseline", False)) for r in res["rows"]}
        assert stages >= {
            ("forward", True),
            ("forward", False),
            ("update", True),
            ("update", False),
            ("loop", True),
            ("loop", False),
        }
        base = {r["stage"]: r["median_s"] for r in res["rows"] if r.get("baseline")}
        for r in res["rows"]:
            assert r["median_s"] > 0 and math.isfinite(r["median_s"]) and r["p90_s"] >= r["median_s"]
            assert 0 < r["p10_s"] <= r["median_s"] and 0 < r["cpu"]["share"] <= 1
            assert r["speedup"] == pytest.approx(base[r["stage"]] / r["median_s"], rel=1e-9)
            assert r["floor_s"] is not None and 0 < r["floor_s"]
    # a verdict, or why it is withheld (the machine running the tests may be busy: either is right here)
    assert report["verdict"] in ("met", "missed", "withheld")
    assert (report["verdict"] == "withheld") == report["trust"]["busy"] == bool(report["verdict_reasons"])
    assert report["threads"]["torch_intra_op"] == report["threads"]["onnxruntime_intra_op"]
    assert md.read_text().startswith("Machine:") and "verdict" in md.read_text()
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, match",
    [
        (["--engine", "/nonexistent/unet.onnx"], "does not exist"),
        (["--batch", "0,4"], "--batch must be a comma-separated list of positive integers"),
        (["--batch", "a,b"], "--batch must be a comma-separated list of positive integers"),
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--steps", "5000"], "steps must be an integer in 1..1000"),
        (["--json", "/nonexistent-dir/x.json"], "does not exist"),
    ],
)
def test_bench_bad_input(artifacts, args, match, capsys):
    _, onnx = artifacts["mlp"]
    base = ["bench", "--engine", str(onnx), "--device", "cpu", "--repeats", "3"]
    if args[0] == "--engine":
        base = ["bench", "--device", "cpu"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
