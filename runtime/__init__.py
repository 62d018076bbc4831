"""ddpm.runtime: schedule math, samplers, kernels front, backends, bench and the CLI."""
