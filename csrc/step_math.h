// The affine form of one reverse step (DESIGN.md), shared by the CPU and CUDA kernels:
//   x0_hat = clip(p x + q m, -c, c),   x_prev = a x + b x0_hat + sigma z.
#pragma once

#include "philox.h"  // DDPM_HD

namespace ddpm {

DDPM_HD float affine(float x, float m, float z, float a, float b, float p, float q, float sigma, float clip) {
  float x0 = p * x + q * m;
  // Comparisons, not fminf/fmaxf: a NaN passes through (as torch.clamp lets it), which the sampling loop's
  // finiteness check then reports; the CPU loop still vectorises to min/max/blend.
  x0 = x0 < -clip ? -clip : x0;
  x0 = x0 > clip ? clip : x0;
  return a * x + b * x0 + sigma * z;
}

}  // namespace ddpm
