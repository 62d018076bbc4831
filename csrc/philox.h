// Philox4x32-10 and the Box-Muller map to N(0, 1), shared verbatim by the CPU and CUDA kernels.
//
// docs/design.md, "Noise": key = (seed mod 2^32, seed div 2^32); counter = (element_in_sample / 4, sample_index,
// step_index, stream); element j of a sample takes output word j mod 4 after Box-Muller on the pairs
// (w0, w1), (w2, w3): u = (w + 0.5) 2^-32, r = sqrt(-2 ln u_a), z_a = r cos(2 pi u_b), z_b = r sin(2 pi u_b).
//
// Everything here is plain float/uint32 arithmetic with no libm calls, so that `#pragma omp simd` loops over it
// vectorise on the CPU (libm's scalar log/sin/cos would not) and the untestable-here CUDA build runs exactly the
// code the CPU tests check. The transcendentals are polynomial approximations fitted for this file (weighted
// minimax by Lawson's iteration in float64, see fit_polynomials.py); each argument is reduced EXACTLY in integer
// arithmetic first, which is what keeps the result within a few float32 ulp of the float64 formula everywhere:
//   * ln u for u -> 1 is computed from v = 1 - u, which is exact from ~w (u itself would round to 1 - 2^-24);
//   * 2 pi u_b is reduced to the nearest quarter turn in integers, leaving |theta| <= pi/4 with full relative
//     precision, so sin(theta) stays accurate as theta -> 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DDPM_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define DDPM_HD inline __attribute__((always_inline))
#else
#define DDPM_HD inline
#endif

namespace ddpm {

// Philox4x32 constants (Salmon et al., SC'11, Random123 philox.h): round multipliers and Weyl key increments.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

// The noise streams (counter word 3).
constexpr uint32_t kStreamStep = 0;     // z of every reverse step
constexpr uint32_t kStreamInitial = 1;  // x_T

// One Philox round: two 32x32 -> 64-bit products, then the Feistel-like mix with the round key.
DDPM_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  // High and low halves written separately: GCC recognises the first form as a vector high-part multiply
  // (vpmuludq + shuffle); one 64-bit product used twice made it fall back to 64-bit lanes and vpmullq.
  const uint32_t hi0 = static_cast<uint32_t>((static_cast<uint64_t>(kPhiloxM0) * c0) >> 32);
  const uint32_t hi1 = static_cast<uint32_t>((static_cast<uint64_t>(kPhiloxM1) * c2) >> 32);
  const uint32_t lo0 = kPhiloxM0 * c0;
  const uint32_t lo1 = kPhiloxM1 * c2;
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// One Philox4x32-10 block, in place: (c0, c1, c2, c3) <- Philox(counter, key = (k0, k1)). The ten rounds are
// written out (the key is bumped between rounds, not before the first): a loop here would leave an inner loop
// in the callers' `omp simd` loops, which GCC then refuses to vectorise.
DDPM_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0 += kPhiloxW0, k1 += kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 += kPhiloxW0, k1 += kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 += kPhiloxW0, k1 += kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 += kPhiloxW0, k1 += kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 += kPhiloxW0, k1 += kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 += kPhiloxW0, k1 += kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 += kPhiloxW0, k1 += kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 += kPhiloxW0, k1 += kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 += kPhiloxW0, k1 += kPhiloxW1);
}

DDPM_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

DDPM_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// log1p(f) for f in [sqrt(1/2) - 1, sqrt(2) - 1] as f - f^2/2 + f^3 P(f); |rel. error| < 6e-9 in exact
// arithmetic (0.1 ulp), so float32 evaluation error dominates (about 1 ulp).
DDPM_HD float log1p_reduced(float f) {
  const float P = 0.333333317f + f * (-0.250008211f + f * (0.200012268f + f * (-0.166233565f +
                  f * (0.142017592f + f * (-0.131601919f + f * (0.127615733f + f * -0.0763446708f))))));
  const float f2 = f * f;
  return f + (f2 * f * P - 0.5f * f2);
}

// -2 ln u for u = (w + 0.5) 2^-32 in (0, 1), accurate to a few float32 ulp for every w.
DDPM_HD float neg2_log_uniform(uint32_t w) {
  const bool upper = (w >> 31) != 0;      // u >= 1/2: work with v = 1 - u = (~w + 0.5) 2^-32 instead
  const uint32_t a = upper ? ~w : w;      // < 2^31, so the signed int -> float conversion (which every SIMD
  const float x = static_cast<float>(static_cast<int32_t>(a)) * 0x1p-32f + 0x1p-33f;  // ISA has) suffices
  // Lower half (x = u < 1/2): u = 2^e m with m in [sqrt(1/2), sqrt(2)) by shifting the exponent field.
  const uint32_t ix = float_bits(x) + (0x3f800000u - 0x3f3504f3u);  // 0x3f3504f3 = sqrt(1/2)
  const int32_t e_lo = static_cast<int32_t>(ix >> 23) - 127;
  const float f_lo = bits_float((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;  // exact (Sterbenz)
  // Upper half (x = v): u = 1 - v in [1/2, 1). For v <= 1 - sqrt(1/2): e = 0, f = u - 1 = -v exactly;
  // otherwise u in [1/2, sqrt(1/2)): e = -1, f = 2u - 1 = 1 - 2v, also exact.
  const bool near_one = x <= 0.292893219f;
  const float f_up = near_one ? -x : 1.0f - 2.0f * x;
  const float f = upper ? f_up : f_lo;
  const float e = upper ? (near_one ? 0.0f : -1.0f) : static_cast<float>(e_lo);
  // ln 2 split so that e * ln2_hi is exact for |e| <= 40.
  const float ln_u = e * 0.693145752f + (e * 1.42860677e-6f + log1p_reduced(f));
  return -2.0f * ln_u;
}

// cos and sin of 2 pi (w + 0.5) 2^-32, to about 1-2 float32 ulp (relative, also near zero).
DDPM_HD void sincos_2pi_uniform(uint32_t w, float& c, float& s) {
  const uint32_t k = (w + 0x20000000u) >> 30;                        // nearest quarter turn, 0..3 (wraps)
  const int32_t d = static_cast<int32_t>(w - (k << 30));             // in [-2^29, 2^29)
  const float t = (static_cast<float>(d) + 0.5f) * 1.46291807e-9f;   // 2 pi / 2^32; |t| <= pi/4
  const float t2 = t * t;
  const float st = t + t * t2 * (-0.166666546f + t2 * (0.00833216075f + t2 * -0.000195152812f));
  const float ct = 1.0f + t2 * (-0.5f + t2 * (0.0416666457f + t2 * (-0.00138873162f + t2 * 2.44331547e-05f)));
  // Rotate by k quarter turns: (cos, sin)(k pi/2 + t) = (ct, st), (-st, ct), (-ct, -st), (st, -ct).
  const bool odd = (k & 1u) != 0;
  const float c0 = odd ? st : ct;
  const float s0 = odd ? ct : st;
  c = (((k + 1u) & 2u) != 0) ? -c0 : c0;
  s = ((k & 2u) != 0) ? -s0 : s0;
}

// Box-Muller on the word pairs (w0, w1) and (w2, w3): z0, z1 = r_a (cos, sin)(2 pi u1), z2, z3 from (w2, w3).
DDPM_HD void box_muller4(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, float& z0, float& z1, float& z2,
                         float& z3) {
  const float ra = sqrtf(neg2_log_uniform(w0));
  float ca, sa;
  sincos_2pi_uniform(w1, ca, sa);
  const float rb = sqrtf(neg2_log_uniform(w2));
  float cb, sb;
  sincos_2pi_uniform(w3, cb, sb);
  z0 = ra * ca;
  z1 = ra * sa;
  z2 = rb * cb;
  z3 = rb * sb;
}

// The four normals of counter (group, sample, step, stream) under key (k0, k1), element order j mod 4.
DDPM_HD void normal4(uint32_t group, uint32_t sample, uint32_t step, uint32_t stream, uint32_t k0, uint32_t k1,
                     float& z0, float& z1, float& z2, float& z3) {
  uint32_t w0 = group, w1 = sample, w2 = step, w3 = stream;
  philox4x32_10(w0, w1, w2, w3, k0, k1);
  box_muller4(w0, w1, w2, w3, z0, z1, z2, z3);
}

}  // namespace ddpm
