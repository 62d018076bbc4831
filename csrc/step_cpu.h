// CPU kernels of ddpm._C: the fused reverse step and the noise generator (declarations).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ddpm::cpu {

// out = a x + b x0 + c h + sigma z with x0 = clip(p x + q m, -clip, clip), over n samples of d elements each
// (row-major [n, d], float32, contiguous); z = normal(seed, step, stream 0, global sample sample_offset + row).
// With a history buffer h (same layout), h <- x0 in the same pass, after its old value is read; c == 0 never
// reads h (it may hold garbage). out may be x or m (in place); h overlaps none of x, m, out.
// sigma == 0 skips the noise; clip = +inf disables clipping.
// Optional operands (nullptr: absent; docs/design.md, "Operands of the step"), read row by row: sample k of m, u
// and v starts at element k * (its stride) and its d elements are contiguous (so m may be out[:, :C] of a
// learned-variance model's [n, 2C, ...] output).
//   u (uncond): m is replaced by u + guidance (m - u), classifier-free guidance, before x0 is formed;
//   thresholds ([n]): x0 = clamp(p x + q m, -s_k, s_k) / s_k with s_k = thresholds[k] instead of the clip
//     (dynamic thresholding; clip is +inf then);
//   v (variance): sigma is replaced by exp(lv0 + lv1 v) per element where the row's sigma != 0 (learned range).
struct StepArgs {
  const float* x;
  const float* m;
  float* out;
  float* h;            // nullptr: no history
  const float* u;      // nullptr: no guidance
  const float* v;      // nullptr: the row's sigma
  const float* thr;    // nullptr: the static clip
  int64_t n;
  int64_t d;
  int64_t m_stride, u_stride, v_stride;  // elements between samples (>= d)
  float a, b, c, p, q, sigma, lv0, lv1, clip, guidance;
  uint64_t seed;
  uint32_t step;
  uint32_t sample_offset;
};

// thresholds[k] = clamp(quantile(|x0_k|, ratio), 1, max_value) for each sample k, with x0 = p x + q m (m guided as
// in StepArgs when u is given) and torch.quantile's default linear interpolation: rank r = ratio (d - 1) in float32,
// lerp(sorted[floor r], sorted[ceil r], r - floor r) as torch.lerp evaluates it. A sample holding a NaN gets NaN.
struct ThresholdArgs {
  const float* x;
  const float* m;
  const float* u;  // nullptr: no guidance
  float* out;      // [n]
  int64_t n;
  int64_t d;
  int64_t m_stride, u_stride;
  float p, q, guidance, ratio, max_value;
};

// out[n, d] = the N(0, 1) draws of (seed, step, stream) for global samples sample_offset .. sample_offset + n - 1.
struct NormalArgs {
  float* out;
  int64_t n;
  int64_t d;
  uint64_t seed;
  uint32_t step;
  uint32_t stream;
  uint32_t sample_offset;
};

void fused_step(const StepArgs& args);
void dynamic_thresholds(const ThresholdArgs& args);
void normal(const NormalArgs& args);

// out[count, 4] = the Philox words of counters (c0 + i, sample, step, stream), i < count, under the key of `seed`,
// computed by the dispatched variant's Philox (a test hook: SIMD Philox vs Random123's known answers).
void philox_words(uint32_t* out, uint32_t c0, uint32_t count, uint32_t sample, uint32_t step, uint32_t stream,
                  uint64_t seed);

// Tensors with fewer elements than this run on one thread (a fork/join costs more than it saves there).
int64_t parallel_threshold();
void set_parallel_threshold(int64_t elements);

// Which instruction set the kernels dispatch to ("avx512", "avx2", "baseline"): the best this CPU runs unless
// set_simd_target chose another (tests run every variant; "" restores the automatic choice).
const char* simd_target();
std::vector<std::string> simd_targets();
void set_simd_target(const std::string& name);

}  // namespace ddpm::cpu
