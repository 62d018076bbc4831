"""What one ``ddpm serve`` process accepts: every cap in one frozen value, checked once when the server starts.

The caps bound the work and memory a single request can ask for; the queue bound and the timeouts bound what
many requests together can (docs/design.md, "Serving", the limits table).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ddpm.errors import InvalidArgumentError
from ddpm.validate import MAX_NUM_SAMPLES, MAX_TIMESTEPS

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    """Caps of one server (each is a ``ddpm serve`` flag of the same name, ``--max-batch`` ...).

    Attributes:
        max_batch: rows of one merged reverse loop (requests are merged up to it; longer ones are split).
        max_wait_ms: how long the oldest waiting request may wait for others to fill a batch.
        max_queue: samples waiting per model; a request that does not fit gets 429 with Retry-After.
        max_samples: num_samples of one request.
        max_steps: sampling steps of one request (after the model's recommendation filled them in).
        max_body_bytes: a JSON request body; refused (413) from Content-Length or while it streams in.
        max_upload_bytes: a multipart body of /v1/denoise (the image file and its fields).
        max_image_pixels: width x height of an uploaded image, checked from its header before decoding.
        body_timeout_s: the whole body must arrive within this (a body that trickles in gets 408).
        timeout_s: a request's queueing plus computing; past it the request gets 503 and its rows are dropped.
        drain_s: after SIGTERM, how long in-flight requests may take before the process exits anyway.
    """

    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_samples: int = 256
    max_steps: int = 1000
    max_body_bytes: int = 64 << 10
    max_upload_bytes: int = 8 << 20
    max_image_pixels: int = 1 << 22
    body_timeout_s: float = 10.0
    timeout_s: float = 60.0
    drain_s: float = 30.0

    def __post_init__(self) -> None:
        ints = {
            "max_batch": (1, 1 << 16),
            "max_queue": (1, 1 << 24),
            "max_samples": (1, MAX_NUM_SAMPLES),
            "max_steps": (1, MAX_TIMESTEPS),
            "max_body_bytes": (256, 1 << 30),
            "max_upload_bytes": (1024, 1 << 30),
            "max_image_pixels": (1, 1 << 28),
        }
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InvalidArgumentError(f"{_flag(name)} must be an integer in {lo}..{hi}, got {v!r}")
        for name in ("max_wait_ms", "body_timeout_s", "timeout_s", "drain_s"):
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            if not ok or v < 0 or (v == 0 and name != "max_wait_ms"):
                raise InvalidArgumentError(f"{_flag(name)} must be a finite number > 0, got {v!r}")
        if self.max_samples > self.max_queue:
            raise InvalidArgumentError(
                f"--max-samples ({self.max_samples}) must be <= --max-queue ({self.max_queue}): a request "
                "larger than the queue could never be admitted"
            )

    def replace(self, **changes: Any) -> Limits:
        return dataclasses.replace(self, **changes)

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    def table(self) -> dict[str, Any]:
        """The caps as a plain dict (``GET /v1/models`` shows them)."""
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
