"""``ddpm serve``: exported models behind HTTP, in this process (uvicorn) or as a Ray Serve deployment (--ray).

The command parses its options into one :class:`Limits` and one :class:`ddpm.SamplingOptions`, builds the app
with the same factory users mount (``ddpm.serve.app``) and runs it. Only typer is imported at module level.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from ddpm.errors import InvalidArgumentError, MissingDependencyError

__all__ = ["register", "read_token", "require"]


# what each mode imports (module names), and the extra that installs them
_NEEDS = {
    "serve": ("starlette", "uvicorn", "prometheus_client", "python_multipart"),
    "ray": ("starlette", "uvicorn", "prometheus_client", "python_multipart", "ray"),
}


def require(extra: str) -> None:
    """MissingDependencyError naming the missing packages and the install line, before anything loads."""
    missing = [m for m in _NEEDS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        flag = " --ray" if extra == "ray" else ""
        raise MissingDependencyError(
            f"ddpm serve{flag} needs {', '.join(missing)}; install them with: pip install 'ddpm[{extra}]'"
        )


def read_token(path: Path) -> str:
    """The bearer token: the file's text without surrounding whitespace; refused when empty or huge."""
    try:
        data = Path(path).read_bytes()[: 1 << 16]
    except OSError as e:
        raise InvalidArgumentError(f"--token-file {str(path)!r}: {e.strerror or e}") from None
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"--token-file {str(path)!r} must hold an ASCII token") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise InvalidArgumentError(
            f"--token-file {str(path)!r} must hold one token of at least 16 characters without spaces "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return token


def register(app: typer.Typer) -> None:
    """Add ``ddpm serve`` to the CLI."""

    @app.command("serve")
    def serve_cmd(
        engine: Annotated[
            list[str],
            typer.Option(help="a model to serve: PATH (named by its stem) or NAME=PATH; repeat for more"),
        ],
        host: Annotated[
            str, typer.Option(help="address to bind (127.0.0.1: this machine only)")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="TCP port")] = 8000,
        max_batch: Annotated[int, typer.Option(help="rows of one merged reverse loop (1: no merging)")] = 64,
        max_wait_ms: Annotated[
            float, typer.Option(help="how long a request waits for others to merge")
        ] = 5.0,
        max_queue: Annotated[int, typer.Option(help="samples waiting per model before 429")] = 1024,
        max_samples: Annotated[int, typer.Option(help="num_samples of one request")] = 256,
        max_steps: Annotated[int, typer.Option(help="sampling steps of one request")] = 1000,
        max_body_bytes: Annotated[int, typer.Option(help="JSON request body")] = 64 << 10,
        max_upload_bytes: Annotated[int, typer.Option(help="multipart body of /v1/denoise")] = 8 << 20,
        max_image_pixels: Annotated[int, typer.Option(help="width x height of an uploaded image")] = 1 << 22,
        body_timeout_s: Annotated[float, typer.Option(help="a body must arrive within this")] = 10.0,
        timeout_s: Annotated[float, typer.Option(help="a request's queueing and computing, then 503")] = 60.0,
        drain_s: Annotated[float, typer.Option(help="after SIGTERM: time for in-flight requests")] = 30.0,
        token_file: Annotated[
            Path | None,
            typer.Option(help="require `Authorization: Bearer <the file's token>` (not /healthz)"),
        ] = None,
        device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
        threads: Annotated[int | None, typer.Option(help="CPU inference threads per model")] = None,
        runtime: Annotated[
            str | None, typer.Option(help="ONNX files: onnxruntime (default; bitwise merging) | openvino")
        ] = None,
        precision: Annotated[
            str | None, typer.Option(help="fp32 | bf16 | fp16 (default: the artifact's)")
        ] = None,
        access_log: Annotated[bool, typer.Option(help="log every request (uvicorn's access log)")] = False,
        ray: Annotated[
            bool, typer.Option("--ray", help="deploy on Ray Serve instead of serving here")
        ] = False,
        address: Annotated[
            str | None,
            typer.Option(help="--ray: the cluster (auto | ray://HOST:10001); default: start a local one"),
        ] = None,
        replicas: Annotated[int, typer.Option(help="--ray: replicas of the deployment")] = 1,
        replica_cpus: Annotated[float, typer.Option(help="--ray: CPUs reserved per replica")] = 1.0,
    ) -> None:
        """Serve models over HTTP with dynamic batching: POST /v1/samples, POST /v1/denoise, GET /v1/models,
        /healthz, /metrics. Merged requests get bitwise the `ddpm run` answer (onnxruntime on CPU)."""
        require("ray" if ray else "serve")
        from ddpm.options import SamplingOptions

        from .limits import Limits
        from .models import engine_names

        limits = Limits(
            max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, max_samples=max_samples,
            max_steps=max_steps, max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes,
            max_image_pixels=max_image_pixels, body_timeout_s=body_timeout_s, timeout_s=timeout_s, drain_s=drain_s,
        )  # fmt: skip
        options = SamplingOptions.from_cli(
            device=device,
            threads=threads,
            runtime=runtime,
            precision=precision,
            recommended=True,
            batch=max_batch,
        )
        if not 0 <= port <= 65535:
            raise InvalidArgumentError(f"--port must be in 0..65535, got {port}")
        token = None if token_file is None else read_token(token_file)
        engines = {name: path.resolve() for name, path in engine_names(engine).items()}
        if ray:
            from .ray_app import run_on_ray

            if replicas < 1 or replica_cpus <= 0:
                raise InvalidArgumentError("--replicas must be >= 1 and --replica-cpus > 0")
            run_on_ray(
                engines, limits=limits, options=options, token=token, address=address, replicas=replicas,
                replica_cpus=replica_cpus, host=host, port=port,
            )  # fmt: skip
            return
        if address is not None or replicas != 1:
            raise InvalidArgumentError("--address and --replicas apply to --ray only")
        from .asgi import app as make_app
        from .server import bind, serve_forever

        sock = bind(host, port)  # before the models load: a port in use fails in a second, not after warm-up
        try:
            guard = make_app(engines, limits=limits, options=options, token=token)
        except BaseException:
            sock.close()
            raise
        serve_forever(guard, sock, drain_s=drain_s, access_log=access_log)
