"""``ddpm.noise``: the counter-based Philox4x32-10 + Box-Muller noise (re-exported from ddpm.runtime.noise)."""

from __future__ import annotations

from ddpm.runtime.noise import *  # noqa: F403 - this module is the public alias of runtime.noise
from ddpm.runtime.noise import __all__  # noqa: F401
