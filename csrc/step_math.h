// The affine form of one reverse step (docs/design.md, "The step"), shared by the CPU and CUDA kernels:
//   x0_hat = clip(p x + q m, -clip, clip),   x_prev = a x + b x0_hat [+ c h] + sigma z,
// where h is the previous step's x0_hat (multistep solvers such as DPM-Solver++(2M), Lu et al. 2022 eq. 15;
// c = 0 for DDPM and DDIM, and then h is never read).
#pragma once

#include "philox.h"  // DDPM_HD

namespace ddpm {

DDPM_HD float x0_hat(float x, float m, float p, float q, float clip) {
  float x0 = p * x + q * m;
  // Comparisons, not fminf/fmaxf: a NaN passes through (as torch.clamp lets it), which the sampling loop's
  // finiteness check then reports; the CPU loop still vectorises to min/max/blend.
  x0 = x0 < -clip ? -clip : x0;
  x0 = x0 > clip ? clip : x0;
  return x0;
}

// a x + b x0 + sigma z: the single-step samplers, in the order of operations ddpm.step uses.
DDPM_HD float affine(float x, float x0, float z, float a, float b, float sigma) { return a * x + b * x0 + sigma * z; }

// a x + b x0 + c h + sigma z: the multistep form, summed left to right as the torch reference does.
DDPM_HD float affine_history(float x, float x0, float h, float z, float a, float b, float c, float sigma) {
  return a * x + b * x0 + c * h + sigma * z;
}

}  // namespace ddpm
