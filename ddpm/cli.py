"""The `ddpm` command line. Commands are thin: they parse options and call a library function.

Heavy imports (torch, onnxruntime, tensorrt) happen inside the command bodies, so `ddpm --help` is fast and
works without them. ``main`` is the one place that turns the project's exceptions into one line on stderr and
exit code 2 (``DDPM_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

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
    "ddpm.bench.cli",
    "ddpm.runtime.cli_schedule",
    "ddpm.runtime.cli_image",
    "ddpm.evaluation.cli",
    "ddpm.runtime.cli_merge",
    "ddpm.serve.cli",
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C: every ``finally`` and atomic write cleans up on the way out."""


_SIGTERM_SEEN: list[bool] = []  # typer turns every KeyboardInterrupt into exit 130; this tells SIGTERM apart


def _on_sigterm(signum: int, frame: object) -> None:
    _SIGTERM_SEEN.append(True)
    raise Terminated


def _one_line(text: str, width: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 internal error, 2 bad input, 130 interrupted, 143 SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    record_invocation(argv)
    debug = os.environ.get("DDPM_DEBUG", "") not in ("", "0")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    _SIGTERM_SEEN.clear()
    try:
        # Not standalone: typer returns the exit code of --help / typer.Exit and raises usage errors, which are
        # printed below as one line like every other error.
        code = app(args=argv, prog_name="ddpm", standalone_mode=False)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Terminated:
        code = 130
    except KeyboardInterrupt:
        print("ddpm: interrupted", file=sys.stderr)
        return 130
    except typer.TyperException as e:  # click's usage errors (bad option value, unknown option) and Abort
        msg = _one_line(e.format_message()) if hasattr(e, "format_message") else "aborted"
        if msg:  # no_args_is_help has printed the help already
            print(f"ddpm: error: {msg} (see --help)", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except (DDPMError, OSError) as e:
        if debug:
            raise
        msg = str(e) if isinstance(e, DDPMError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        print(f"ddpm: error: {_one_line(msg, 1000)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug, not bad input: exit 1, the traceback only on request
        if debug:
            raise
        print(
            f"ddpm: internal error: {type(e).__name__}: {_one_line(e, 200)}; set DDPM_DEBUG=1 for the traceback",
            file=sys.stderr,
        )
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if _SIGTERM_SEEN:
        print("ddpm: terminated (SIGTERM); partial outputs removed", file=sys.stderr)
        return 143
    return code if isinstance(code, int) else 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
