"""The HTTP shell of ``ddpm serve``: Starlette routes over a :class:`Service` (docs/design.md, "Serving").

    POST /v1/samples   JSON {model, num_samples, seed, sampler, steps, clip, eta, spacing, variance, format}
    POST /v1/denoise   multipart: image (a file) + model, t | sigma, add_noise, seed, steps, ... , format
    GET  /v1/models    each model's metadata, its recommended and default sampling; the limits
    GET  /healthz      200 while serving, 503 while draining
    GET  /metrics      Prometheus text

What happens here: bodies read with a cap (Content-Length first, then while streaming, within a time limit),
parsed into one validated value (serve/request.py), handed to the service, the answer encoded. What does not:
batching (serve/batcher.py), sampling (ddpm.runtime). Every refusal is a 4xx with ``{"error": "one line"}``.

Why Starlette (on uvicorn) and not FastAPI: FastAPI's value is pydantic request models and OpenAPI pages, and here
the request body's one validator is ``SamplingOptions`` (the core has no pydantic: docs/design.md,
"Reliability"); a second schema would word every error twice and drift. Starlette is the small, well-kept ASGI
toolkit FastAPI itself is built on (routing, streaming request bodies, multipart via python-multipart); uvicorn
is the reference ASGI server (h11 / httptools, graceful shutdown), and Ray Serve runs the same ASGI app.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ddpm.errors import DDPMError, InvalidArgumentError
from ddpm.options import SamplingOptions
from ddpm.runtime.sampling import image_shape

from .batcher import Closed
from .encode import MEDIA_TYPES, encode_denoised, encode_samples
from .limits import Limits
from .metrics import CONTENT_TYPE
from .models import engine_names, open_models
from .request import RequestError, decode_image, parse_denoise_form, parse_sample_request
from .service import Service

__all__ = ["app", "build_app", "Guard", "ROUTES"]

ROUTES = ("/v1/samples", "/v1/denoise", "/v1/models", "/healthz", "/metrics")
_CLOSE = {"Connection": "close"}  # the rest of a refused body is not read: the connection cannot be reused
INLINE_VALUES = 1 << 14  # answers of up to this many values are encoded on the event loop, larger in a thread


def app(
    engines: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    *,
    limits: Limits | None = None,
    options: SamplingOptions | None = None,
    token: str | None = None,
) -> Guard:
    """The ASGI app serving ``engines`` (``{name: path}``, or paths named by their stem): every model opened
    once and warmed up now, closed at the app's lifespan shutdown. ``options``: the server's device, threads,
    runtime and precision (requests choose the sampling fields); ``token``: require ``Authorization: Bearer``.
    ``ddpm serve``, the tests and a user's own ASGI server all use this factory."""
    limits = limits or Limits()
    base = (options or SamplingOptions()).replace(recommended=True, batch=limits.max_batch)
    hosts = open_models(engine_names(engines), base, max_batch=limits.max_batch)
    try:
        service = Service(hosts, limits)
    except BaseException:
        for h in hosts.values():
            h.close()
        raise
    return build_app(service, token=token)


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())[:1000]}, status, headers=dict(headers or {}))


def build_app(service: Service, *, token: str | None = None) -> Guard:
    """The routes over an existing service, behind the :class:`Guard` (auth, drain, metrics)."""
    limits = service.limits

    async def samples(request: Request) -> Response:
        body = await read_body(request, limits.max_body_bytes, limits.body_timeout_s)
        req = parse_sample_request(body, models=service.models, base=service.base, limits=limits)
        x, settings, precision = await service.sample(req)
        if req.format == "png" or x.numel() > INLINE_VALUES:
            data = await run_in_threadpool(encode_samples, x, req.format, settings, precision)
        else:  # a small npz or JSON costs less than the hop to a thread
            data = encode_samples(x, req.format, settings, precision)
        return Response(
            data, media_type=MEDIA_TYPES[req.format], headers={"X-DDPM-Settings": json.dumps(settings)}
        )

    async def denoise(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError("send the image as multipart/form-data (a file field named image)", 415)
        body = await read_body(request, limits.max_upload_bytes, limits.body_timeout_s)
        fields, image = await read_form(request.scope, body, limits.max_upload_bytes)
        req = parse_denoise_form(
            fields, image, models=service.models, base=service.base.replace(recommended=False)
        )
        service.check_denoise(req)
        shape = image_shape(service.hosts[req.model].meta, source=f"model {req.model!r}")
        x = await run_in_threadpool(decode_image, req.image, shape, limits.max_image_pixels)
        result = await service.denoise(req, x)
        settings = {"model": req.model, "seed": req.options.seed, "add_noise": req.add_noise}
        data = await run_in_threadpool(encode_denoised, result, req.format, settings)
        return Response(data, media_type=MEDIA_TYPES[req.format])

    async def models(request: Request) -> Response:
        infos = [h.info() for h in service.hosts.values()]
        return JSONResponse({"models": infos, "limits": limits.table()})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": service.models})

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette):
        yield
        await run_in_threadpool(service.close, 2.0)

    routes = [
        Route("/v1/samples", samples, methods=["POST"]),
        Route("/v1/denoise", denoise, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers: dict[Any, Any] = {HTTPException: _http_error, DDPMError: _ddpm_error, Exception: _internal}
    return Guard(Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan), service, token)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, exc.detail, exc.headers)


async def _ddpm_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, RequestError):
        return error(exc.status, str(exc), exc.headers)
    if isinstance(exc, Closed):
        return error(503, str(exc), {"Retry-After": "1"})
    if isinstance(exc, InvalidArgumentError):
        return error(400, str(exc))
    return error(500, f"{type(exc).__name__}: {exc}")  # the model failed (SamplingError, ArtifactError)


async def _internal(request: Request, exc: Exception) -> Response:
    return error(500, f"internal error: {type(exc).__name__}")


async def read_body(request: Request, cap: int, timeout: float) -> bytes:
    """The body, at most ``cap`` bytes, within ``timeout`` seconds: 413 from a Content-Length over the cap
    before a byte is read, or as soon as the streamed bytes pass it; 408 for a body that trickles in."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise RequestError(f"Content-Length must be a number of bytes, got {length[:40]!r}", 400, _CLOSE)
        if len(length.strip()) > 18 or int(length) > cap:  # (int() refuses strings of 4300+ digits)
            raise RequestError(
                f"the body is {length.strip()[:40]} bytes; this endpoint takes at most {cap}", 413, _CLOSE
            )
    chunks: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise RequestError(f"the body passed {cap} bytes, the most this endpoint takes", 413, _CLOSE)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"the body did not arrive within {timeout:g} s", 408, _CLOSE) from None
    except ClientDisconnect:
        raise RequestError("the client closed the connection before its body arrived", 400, _CLOSE) from None
    return b"".join(chunks)


async def read_form(scope: Any, body: bytes, cap: int) -> tuple[dict[str, str], bytes]:
    """A multipart body already read (and capped) -> (text fields, the bytes of the file field ``image``)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, receive).form(max_files=1, max_fields=32, max_part_size=cap)
    except (MultiPartException, HTTPException) as e:
        raise RequestError(f"not a valid multipart form: {getattr(e, 'detail', None) or e}") from None
    try:
        image, fields = None, {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image" or image is not None:
                    raise RequestError(f"one file is taken, in the field 'image'; got a file in {key!r}")
                image = await value.read()
            elif key in fields:
                raise RequestError(f"field {key!r} given twice")
            else:
                fields[key] = value
    finally:
        await form.close()
    if image is None:
        raise RequestError("no image: send the image file in the multipart field 'image'")
    return fields, image


class Guard:
    """The outer ASGI layer: counts every answer (route, status, latency), refuses all but /healthz without the
    bearer token (401, nothing else runs), and answers 503 while the server drains. ``service`` is exposed for
    ``ddpm serve`` (drain) and for tests."""

    def __init__(self, inner: Any, service: Service, token: str | None) -> None:
        self.inner, self.service = inner, service
        self._auth = None if token is None else b"Bearer " + token.encode()
        self._pid = str(os.getpid()).encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        service, metrics = self.service, self.service.metrics
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        status = 500
        start = time.perf_counter()

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # which process answered: replicas behind one address (Ray Serve) are told apart by it
                message = {**message, "headers": [*message.get("headers", ()), (b"x-ddpm-pid", self._pid)]}
            await send(message)

        service.in_flight += 1
        metrics.in_flight.inc()
        try:
            if service.draining:
                await error(503, "the server is stopping", {"Retry-After": "1", **_CLOSE})(
                    scope, receive, send_status
                )
            elif self._auth is not None and path != "/healthz" and not self._authorized(scope):
                resp = error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer", **_CLOSE})
                await resp(scope, receive, send_status)
            else:
                await self.inner(scope, receive, send_status)
        finally:
            service.in_flight -= 1
            metrics.in_flight.dec()
            metrics.observe(route, status, time.perf_counter() - start)

    def _authorized(self, scope: Any) -> bool:
        given = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
        # constant time in the token's content: compare_digest over the whole header value
        return len(given) == 1 and hmac.compare_digest(given[0], self._auth or b"")
