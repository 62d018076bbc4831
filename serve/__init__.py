"""ddpm.serve: ``ddpm serve`` — exported models behind an HTTP endpoint, with dynamic batching that keeps every
answer bitwise the ``ddpm run`` answer (docs/design.md, "Serving").

    from ddpm.serve import app
    asgi_app = app({"digits": "unet.onnx"})          # mount it in any ASGI server (uvicorn, hypercorn, Ray Serve)

Layers: serve/asgi.py (the HTTP shell: routes, body caps, auth, drain) -> serve/service.py -> serve/batcher.py
(the batching core, no HTTP) -> ddpm.runtime.segments (one reverse loop, one segment per request piece).
Names are exported lazily, so ``ddpm --help`` imports none of starlette, torch or onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["app", "build_app", "Batcher", "Limits", "Metrics", "Service", "SampleRequest", "RequestError"]

_WHERE = {
    "app": "asgi",
    "build_app": "asgi",
    "Batcher": "batcher",
    "Limits": "limits",
    "Metrics": "metrics",
    "Service": "service",
    "SampleRequest": "request",
    "RequestError": "request",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ddpm.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
