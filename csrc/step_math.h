// The affine form of one reverse step (docs/design.md, "The step"), shared by the CPU and CUDA kernels:
//   x0_hat = clip(p x + q m, -clip, clip),   x_prev = a x + b x0_hat [+ c h] + sigma z,
// where h is the previous step's x0_hat (multistep solvers such as DPM-Solver++(2M), Lu et al. 2022 eq. 15;
// c = 0 for DDPM and DDIM, and then h is never read). The optional operands (docs/design.md, "Operands of the
// step") change three of its inputs: m -> u + S (m - u) (guidance), clip -> the sample's threshold s with a
// division by s (dynamic thresholding), sigma -> exp(lv0 + lv1 v) (learned-range variance).
#pragma once

#include "philox.h"  // DDPM_HD, bits_float

namespace ddpm {

DDPM_HD float x0_hat(float x, float m, float p, float q, float clip) {
  float x0 = p * x + q * m;
  // Comparisons, not fminf/fmaxf: a NaN passes through (as torch.clamp lets it), which the sampling loop's
  // finiteness check then reports; the CPU loop still vectorises to min/max/blend.
  x0 = x0 < -clip ? -clip : x0;
  x0 = x0 > clip ? clip : x0;
  return x0;
}

// Classifier-free guidance (Ho & Salimans 2022, diffusers' convention): the model output used is u + S (m - u),
// with u the unconditional output and S the guidance scale; evaluated as ddpm.step's caller writes it in torch.
DDPM_HD float guided(float m, float u, float scale) { return u + scale * (m - u); }

// a x + b x0 + sigma z: the single-step samplers, in the order of operations ddpm.step uses.
DDPM_HD float affine(float x, float x0, float z, float a, float b, float sigma) { return a * x + b * x0 + sigma * z; }

// a x + b x0 + c h + sigma z: the multistep form, summed left to right as the torch reference does.
DDPM_HD float affine_history(float x, float x0, float h, float z, float a, float b, float c, float sigma) {
  return a * x + b * x0 + c * h + sigma * z;
}

// e^x in float32 with no libm call, so that the CPU's `omp simd` loops vectorise it (and CUDA runs the same code).
// Cody-Waite reduction: k = round(x / ln 2) (the 1.5 * 2^23 rounding trick), r = x - k ln 2 with ln 2 split so that
// k ln2_hi is exact, |r| <= ln(2)/2; e^r = 1 + r + r^2 E(r), E the weighted minimax fit of fit_polynomials.py
// (relative error < 3.1e-9 in exact arithmetic, so the float32 evaluation, about 1 ulp, dominates); then times
// 2^k as two powers of two that are each a normal float, so that e^x underflows gradually to 0 and overflows to
// +inf as expf does. x is clamped first by comparisons, so a NaN passes through.
DDPM_HD float exp_f32(float x) {
  // Two plain selects (they vectorise to max/min; a nested one made GCC evaluate the polynomial twice).
  float xc = x < -104.0f ? -104.0f : x;  // e^-104 rounds to 0
  xc = xc > 89.0f ? 89.0f : xc;          // e^89 overflows to +inf
  // 1.5 * 2^23 + round(x / ln 2): k sits in the low mantissa bits, so it is read from the bits (integer arithmetic:
  // no float -> int conversion, which a NaN would make undefined; a NaN gives some k and stays NaN through r).
  const float shifted = xc * 1.44269504f + 12582912.0f;
  const float kf = shifted - 12582912.0f;  // |k| <= 150
  const int32_t k = static_cast<int32_t>(float_bits(shifted) - 0x4B400000u);
  const float r = (xc - kf * 0.693145752f) - kf * 1.42860677e-6f;
  const float E = 0.499999935f + r * (0.166665207f + r * (0.0416683874f + r * (0.00836871013f + r * 0.00138146121f)));
  const float er = 1.0f + (r + r * r * E);
  const int32_t k1 = k >> 1, k2 = k - k1;  // floor(k / 2) (arithmetic shift): each in [-75, 64], normal 2^k
  return er * bits_float(static_cast<uint32_t>(k1 + 127) << 23) * bits_float(static_cast<uint32_t>(k2 + 127) << 23);
}

// Learned-range variance (Nichol & Dhariwal 2021 eq. 15): sigma = exp(lv0 + lv1 v) with lv0 = (min_log + max_log)/4,
// lv1 = (max_log - min_log)/4 from the table row, v the model's variance output (ddpm.schedule.coefficient_table).
DDPM_HD float learned_sigma(float v, float lv0, float lv1) { return exp_f32(lv0 + lv1 * v); }

}  // namespace ddpm
