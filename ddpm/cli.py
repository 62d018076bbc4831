"""The `ddpm` command line. Commands are thin: they parse options and call a library function.

Heavy imports (torch, onnxruntime, tensorrt) happen inside the command bodies, so `ddpm --help` is fast and
works without them. ``main`` is the one place that turns the project's exceptions into one line on stderr and
exit code 2 (``DDPM_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import importlib
import os
import sys
import typer

from .cliutil import invocation, record_invocation
from .errors import DDPMError

app = typer.Typer(
    name="ddpm",
    help="DDPM toolkit: train -> export (ONNX/TensorRT) -> run (fused step kernel) -> bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Modules that add their commands with `register(app)`; each imports only typer at module level.
_COMMAND_MODULES = (
    "ddpm.trainer.cli",
    "ddpm.export.cli",
    "ddpm.runtime.cli_run",
    "ddpm.runtime.cli_bench",
    "ddpm.runtime.cli_schedule",
    "ddpm.runtime.cli_image",
    "ddpm.trainer.cli_eval",
)


@app.command("version")
def version_cmd() -> None:
    """Versions of ddpm and its runtimes, and how the compiled extension was built."""
    from .build_facts import build_facts

    for k, v in build_facts().items():
        typer.echo(f"{k:>22}: {v}")


def _register_commands() -> None:
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that part of the project is not built yet
                continue
            raise
        mod.register(app)


_register_commands()


__all__ = ["app", "main", "entry", "invocation"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    record_invocation(argv)
    debug = os.environ.get("DDPM_DEBUG", "") not in ("", "0")
    try:
        # Standalone mode: typer prints usage errors itself (exit 2) and raises SystemExit.
        app(args=argv, prog_name="ddpm")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("ddpm: interrupted", file=sys.stderr)
        return 130
    except (DDPMError, OSError) as e:
        if debug:
            raise
        msg = str(e) if isinstance(e, DDPMError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        print(f"ddpm: error: {msg}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
