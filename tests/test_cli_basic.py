"""The CLI entry: help, the schedule command, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ddpm.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "schedule" in out


def test_help_does_not_import_heavy_modules():
    code = "import sys; from ddpm import cli; bad = [m for m in ('torch', 'onnxruntime', 'tensorrt') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_schedule_table_and_plot(tmp_path, capsys):
    png = tmp_path / "s.png"
    assert (
        main(["schedule", "--kind", "cosine", "--timesteps", "1000", "--steps", "20", "--plot", str(png)])
        == 0
    )
    out = capsys.readouterr().out
    assert "alphabar" in out and "999" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "args, match",
    [
        (["schedule", "--kind", "foo"], "unknown schedule kind 'foo'"),
        (["schedule", "--steps", "0"], "steps must be in 1..1000"),
        (["schedule", "--timesteps", "0"], "timesteps T must be an integer >= 1"),
        (["schedule", "--plot", "/nonexistent-dir/x.png"], "does not exist"),
    ],
)
def test_bad_input_one_line_exit_2(args, match, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_console_script_exit_code(tmp_path):
    exe = str(Path(sys.executable).with_name("ddpm"))
    r = subprocess.run([exe, "schedule", "--steps", "5000"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "steps must be in" in r.stderr
